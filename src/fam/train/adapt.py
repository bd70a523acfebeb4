"""Contrastive adaptation on query/target pairs: the VLM2Vec baseline and FAM's stage 2.

``L_adapt = L_task + λ L_rec`` (method.md §3): ``L_task`` is InfoNCE of query against target
embeddings with in-batch negatives and the data's hard negatives (method.md §1); ``L_rec`` is
the VEIN reconstruction loss, added when ``vein.enabled``. Without VEIN this is the VLM2Vec
recipe. :class:`ContrastiveModule` outputs the embeddings (and VEIN's sum over masked
tokens), :class:`ContrastiveLoss` is the loss over them. The VEIN decoders live only in the
training module: the exported model (a normal checkpoint directory, LoRA merged) holds no
trace of them.

VEIN's diagnostic (method.md §3.4): every step ``rec_loss_shuffled`` (L_rec with ``e``
shuffled across the batch, no gradient) next to ``rec_loss``; every ``run.log_every``
steps ``vein_grad_norm`` / ``task_grad_norm``, the norms of the gradients ``λ L_rec`` and
``L_task`` alone send into the trained backbone weights (plain steps; GradCache never holds
the whole graph). When the two losses are equal the log and ``train_metrics.json`` say
that VEIN teaches the model nothing.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from fam import distributed as dist_utils
from fam.backbones.base import BackboneAdapter, EncodedBatch
from fam.backbones.fastpath import frozen_vision_memo
from fam.config import AdaptConfig
from fam.data.mmeb import TrainPair, dataset_info, load_dataset_infos, load_train
from fam.data.types import MMItem
from fam.losses.contrastive import embedding_geometry, info_nce
from fam.losses.maxsim import late_interaction_nce
from fam.losses.vein import default_vein_layers, global_sums, vein_verdict
from fam.model import EmbeddingModel, merge_lora, save_lora, select_tokens
from fam.train.embedder import prepare_embedder
from fam.train.gradcache import chunk_bounds, split_encoded
from fam.train.runner import Recipe, StageParts, run_stage
from fam.train.trainer import InfoNote, TrainResult

log = logging.getLogger(__name__)

__all__ = ["PairBatch", "PairCollator", "ContrastiveModule", "ContrastiveLoss", "item_id",
           "vein_meta_tasks", "build_embedder", "AdaptRecipe", "run_adapt"]


@dataclass
class PairBatch:
    """A collated batch of training pairs.

    Attributes:
        query, target: encoded sides, B items each.
        neg: encoded hard negatives of the rows that have one (or None).
        neg_rows: (n_neg,) long, the rows ``neg`` belongs to (ascending).
        vein_query, vein_target: (B,) bool, VEIN eligibility of each side's sample.
        target_ids, neg_ids: (B,) int64 content ids of each row's target and hard negative
            (-1: none), so identical items in a batch are not used as each other's negatives.
        hard_negatives: the run uses the data's hard negatives: every batch then passes a
            negative block to the loss (all-masked when no row has one), so that under
            DDP/FSDP all ranks gather tensors of the same shapes even when only some ranks'
            local batches carry negatives (MMEB mixes subsets with and without).
    """

    query: EncodedBatch
    target: EncodedBatch
    neg: EncodedBatch | None
    neg_rows: torch.Tensor
    vein_query: torch.Tensor
    vein_target: torch.Tensor
    target_ids: torch.Tensor
    neg_ids: torch.Tensor
    hard_negatives: bool = False

    def to(self, device: torch.device) -> "PairBatch":
        return PairBatch(self.query.to(device), self.target.to(device),
                         self.neg.to(device) if self.neg is not None else None,
                         self.neg_rows.to(device), self.vein_query.to(device),
                         self.vein_target.to(device), self.target_ids.to(device),
                         self.neg_ids.to(device), self.hard_negatives)

    def split(self, size: int) -> list["PairBatch"]:
        """Row chunks ``[s, e)`` of each side; a chunk's hard negatives are its rows' (GradCache)."""
        out = []
        for s, e in chunk_bounds(self.query.batch_size, size):
            sel = ((self.neg_rows >= s) & (self.neg_rows < e)).nonzero().flatten()
            neg = None
            if self.neg is not None and sel.numel():
                # neg_rows is ascending (built row by row), so the selection is contiguous.
                neg = split_encoded(self.neg, int(sel[0]), int(sel[-1]) + 1)
            out.append(PairBatch(split_encoded(self.query, s, e), split_encoded(self.target, s, e),
                                 neg, self.neg_rows[sel] - s, self.vein_query[s:e],
                                 self.vein_target[s:e], self.target_ids[s:e], self.neg_ids[s:e],
                                 self.hard_negatives))
        return out


def item_id(item: MMItem | None) -> int:
    """A stable 63-bit content id of an item (same text, images and video = same id; -1 for
    None).

    Stable across processes (unlike ``hash``), so ids agree between DDP ranks.
    """
    if item is None:
        return -1
    visuals = "\x00".join(map(str, item.images + item.video))  # "" for a one-image item
    h = hashlib.blake2b(f"{item.text}\x00{item.image or ''}{visuals}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big") >> 1


class PairCollator:
    """Tokenises pairs with the adapter; loads images through the pair so errors name the row.

    Args:
        adapter: the backbone adapter.
        hard_negatives: encode the rows' ``neg_*`` sides.
        vein_meta_task: dataset -> meta-task, for the VEIN eligibility rule.
        vein_override: dataset -> forced eligibility (wins over the rule).
    """

    def __init__(self, adapter: BackboneAdapter, hard_negatives: bool = True,
                 vein_meta_task: dict[str, str] | None = None,
                 vein_override: dict[str, bool] | None = None):
        self.adapter = adapter
        self.hard_negatives = hard_negatives
        self.meta = vein_meta_task or {}
        self.override = vein_override or {}

    def _eligible(self, pair: TrainPair, has_image: bool) -> bool:
        from fam.losses.vein import vein_eligible
        return vein_eligible(has_image, self.meta.get(pair.dataset, "unknown"),
                             self.override.get(pair.dataset))

    def __call__(self, pairs: Sequence[TrainPair]) -> PairBatch:
        # Images as stored: the adapter pre-resizes and converts them (prepare_image).
        q_img = [p.load_image("query", rgb=False) for p in pairs]
        t_img = [p.load_image("pos", rgb=False) for p in pairs]
        query = self.adapter.encode([p.query for p in pairs], q_img)
        target = self.adapter.encode([p.pos for p in pairs], t_img)
        neg, rows = None, []
        if self.hard_negatives:
            rows = [i for i, p in enumerate(pairs) if p.neg is not None]
            if rows:
                neg = self.adapter.encode([pairs[i].neg for i in rows],
                                          [pairs[i].load_image("neg", rgb=False) for i in rows])
        vq = torch.tensor([self._eligible(p, im is not None) for p, im in zip(pairs, q_img)])
        vt = torch.tensor([self._eligible(p, im is not None) for p, im in zip(pairs, t_img)])
        tid = torch.tensor([item_id(p.pos) for p in pairs], dtype=torch.long)
        nid = torch.tensor([item_id(p.neg) if self.hard_negatives else -1 for p in pairs],
                           dtype=torch.long)
        return PairBatch(query, target, neg, torch.tensor(rows, dtype=torch.long), vq, vt,
                         tid, nid, self.hard_negatives)


class ContrastiveModule(nn.Module):
    """Embedding model + optional VEIN head; ``forward`` → named outputs.

    Outputs: ``q``, ``t`` (B, d) query and target embeddings; ``n`` (n_neg, d) the hard
    negatives' (rows ``batch.neg_rows``); with VEIN, ``rec_sum`` (the sum of the
    reconstruction terms over the masked image tokens of the batch's eligible samples, both
    sides) and ``rec_n`` (their count) — a sum, so GradCache can add it up over chunks
    (:mod:`fam.train.gradcache`) — and with the diagnostic ``rec_shuffled_sum`` (the same
    sum with ``e`` shuffled across the batch, detached); under DDP/FSDP with hard negatives
    on and none in this batch, ``placeholder`` (below).

    With a multi-vector head, also the token vectors of the same forwards (``q_tok``,
    ``t_tok``, ``n_tok``: ``(rows, L, D)`` at every position of the side's padded length, so
    GradCache's chunks concatenate) and which of them count (``*_tok_mask``).

    Args:
        embedder: the embedding model.
        vein: a :class:`fam.losses.vein.VeinHead` or None.
        vein_diagnose: also output ``rec_shuffled_sum``.
        multivector: a :class:`fam.model.multivector.MultiVectorHead` or None.
    """

    def __init__(self, embedder: EmbeddingModel, vein: nn.Module | None = None,
                 vein_diagnose: bool = False, multivector: nn.Module | None = None):
        super().__init__()
        self.embedder = embedder
        self.vein = vein
        self.vein_diagnose = vein_diagnose and vein is not None
        self.multivector = multivector

    def frozen_memo(self):
        """What GradCache may keep between a chunk's two passes: the frozen vision tower's
        outputs (:func:`fam.backbones.fastpath.frozen_vision_memo`; None when trained)."""
        return frozen_vision_memo(self.embedder.adapter)

    def grad_norm_params(self) -> list[nn.Parameter]:
        """The backbone's trained weights: where the diagnostic measures gradient norms."""
        return [p for p in self.embedder.parameters() if p.requires_grad]

    def _vein_layers(self) -> list[int]:
        return list(self.vein.layers) if self.vein is not None else []

    def _vein_loss(self, out, eligible: torch.Tensor) -> dict[str, torch.Tensor]:
        layers = self._vein_layers()
        hidden, valid = {}, None
        for l in layers:
            # (B, N, d) image tokens in raster order; rows without an image are all-padding
            # and are excluded through the sample mask.
            hidden[l], valid = select_tokens(out.hidden_states[l], out.image_mask)
        emb = {l: out.eos_state(l) for l in layers}
        sample = eligible & out.has_image & (valid.sum(1) >= 2)
        return self.vein(hidden, emb, valid, sample, shuffle_check=self.vein_diagnose)

    def forward_parts(self, batch: PairBatch, step: int = 0) -> Iterator[dict[str, Any]]:
        """:meth:`forward`'s outputs in parts, computed in the same order: the queries', the
        targets', the negatives' embeddings. GradCache back-propagates each part before the
        next is computed, so one side's graph is alive at a time instead of all three. With
        VEIN, a multi-vector head or the placeholder forward, the whole forward is one part."""
        if self.vein is not None or self.multivector is not None or (
                batch.neg is None and batch.hard_negatives and dist_utils.is_dist()):
            yield self.forward(batch, step)
            return
        yield {"q": self.embedder(batch.query, pooled_only=True).embedding}
        yield {"t": self.embedder(batch.target, pooled_only=True).embedding}
        if batch.neg is not None:
            yield {"n": self.embedder(batch.neg, pooled_only=True).embedding}

    def forward(self, batch: PairBatch, step: int = 0) -> dict[str, Any]:
        layers = self._vein_layers()
        # Pooled vectors only unless the multi-vector head reads the token states (VEIN's
        # layers turn the shortcut off by themselves); forward_parts does the same.
        po = self.multivector is None
        q = self.embedder(batch.query, layers, pooled_only=po)
        t = self.embedder(batch.target, layers, pooled_only=po)
        n_out = self.embedder(batch.neg, pooled_only=po) if batch.neg is not None else None
        n = n_out.embedding if n_out is not None else \
            t.embedding.new_zeros((0, t.embedding.shape[1]))
        out: dict[str, Any] = {"q": q.embedding, "t": t.embedding, "n": n}
        if self.multivector is not None:
            # The second reading of the same forwards (no extra pass).
            for key, side in (("q", q), ("t", t), ("n", n_out)):
                if side is not None:
                    out[f"{key}_tok"], out[f"{key}_tok_mask"] = self.multivector(side)
        if batch.neg is None and batch.hard_negatives and dist_utils.is_dist():
            # FSDP all-gathers each sharded block in every forward, so all ranks must run
            # the same forwards: a rank without negatives encodes a placeholder (its first
            # target) that enters the loss with weight 0 (no effect on values or gradients).
            out["placeholder"] = self.embedder(split_encoded(batch.target, 0, 1)).embedding
        if self.vein is not None:
            rq = self._vein_loss(q, batch.vein_query)
            rt = self._vein_loss(t, batch.vein_target)
            # Sum over the masked tokens of both sides and their count: L_rec is their mean.
            out["rec_sum"], out["rec_n"] = rq["sum"] + rt["sum"], rq["count"] + rt["count"]
            if self.vein_diagnose:
                out["rec_shuffled_sum"] = rq["sum_shuffled"] + rt["sum_shuffled"]
        return out


@dataclass
class ContrastiveLoss:
    """``L_adapt = L_task + λ L_rec`` (method.md §1, §3) over :class:`ContrastiveModule`'s outputs.

    ``L_rec`` is the mean over the masked tokens of the **global** batch: under DDP one
    all-reduce gives the global count ``N`` and sums, and each rank back-propagates
    ``λ · W · rec_sum / N`` (DDP averages the ranks' gradients;
    :func:`fam.losses.vein.global_mean`), so any number of ranks equals one process on the
    concatenated batch.

    Args:
        temperature: τ of InfoNCE.
        vein_weight: λ.
        mask_duplicates: identical targets/negatives of other rows are not negatives
            (see :func:`fam.losses.contrastive.info_nce`'s ``target_ids``).
        vein_memory: the VEIN variant (for the diagnostic's advice).
        grad_norm_every: every this many steps also return ``grad_terms`` (``task`` and
            ``vein``, with graph) for the trainer to measure the gradient each sends into
            the backbone (0: never).
        pooled_weight: weight of the pooled InfoNCE.
        mv_weight: weight of the late-interaction InfoNCE over the token vectors (used when
            the module outputs them; :func:`fam.losses.maxsim.late_interaction_nce`).
        mv_temperature, mv_similarity: its τ and MaxSim variant.
    """

    temperature: float = 0.02
    vein_weight: float = 1.0
    mask_duplicates: bool = True
    vein_memory: str = "unmasked"
    grad_norm_every: int = 0
    pooled_weight: float = 1.0
    mv_weight: float = 1.0
    mv_temperature: float = 0.02
    mv_similarity: str = "meanmaxsim"

    def __call__(self, q, t, n, rec_sum=None, rec_n: int = 0, rec_shuffled_sum=None,
                 placeholder=None, q_tok=None, q_tok_mask=None, t_tok=None, t_tok_mask=None,
                 n_tok=None, n_tok_mask=None, *, batch: PairBatch,
                 step: int = 0) -> dict[str, Any]:
        negs = mask = None
        if batch.neg_rows.numel() or batch.hard_negatives:
            # Row i's negative in slot i; rows without one are masked out (-inf scores).
            negs = t.new_zeros(t.shape)
            mask = torch.zeros(t.shape[0], dtype=torch.bool, device=t.device)
            if batch.neg_rows.numel():
                negs = negs.index_copy(0, batch.neg_rows, n.to(t.dtype))
                mask[batch.neg_rows] = True
        ids = self.mask_duplicates
        task = info_nce(q, t, self.temperature, negs, mask,
                        target_ids=batch.target_ids if ids else None,
                        negative_ids=batch.neg_ids if ids and negs is not None else None)
        loss = task["loss"]
        terms: dict[str, Any] = {"task_loss": task["loss"].detach(), "accuracy": task["accuracy"],
                                 **embedding_geometry(q, t)}
        if q_tok is not None:
            late = self._late(q_tok, q_tok_mask, t_tok, t_tok_mask, n_tok, n_tok_mask, batch)
            loss = self.pooled_weight * loss + self.mv_weight * late["loss"]
            terms.update(mv_loss=late["loss"].detach(), mv_accuracy=late["accuracy"])
        if placeholder is not None:  # FSDP placeholder forward: in the graph, weight 0
            loss = loss + 0.0 * placeholder.sum()
        terms["loss"] = loss
        if rec_sum is not None:
            # λ L_rec = λ Σ_tokens rec / N over the global batch (method.md §3); W / N per
            # rank because DDP averages the ranks' gradients. One all-reduce per step.
            sums = {"rec_loss": rec_sum.detach()}
            if rec_shuffled_sum is not None:
                sums["rec_loss_shuffled"] = rec_shuffled_sum.detach()
            total, sums = global_sums(int(rec_n), sums)
            rec = (self.vein_weight * dist_utils.world_size() / max(total, 1)) * rec_sum
            if self.grad_norm_every and (step + 1) % self.grad_norm_every == 0:
                terms["grad_terms"] = {"task": loss, "vein": rec}
            terms["loss"] = loss + rec
            for k, v in sums.items():
                terms[k] = torch.tensor(v / max(total, 1), dtype=torch.float64)
        return terms

    def _late(self, q_tok, q_mask, t_tok, t_mask, n_tok, n_mask, batch: PairBatch) -> dict:
        """Late-interaction InfoNCE; row ``i``'s hard negative in slot ``i`` (as the pooled)."""
        negs = neg_mask = rows = None
        b = t_tok.shape[0]
        if batch.neg_rows.numel() or batch.hard_negatives:
            width = n_tok.shape[1] if n_tok is not None else 1
            negs = t_tok.new_zeros((b, width, t_tok.shape[2]))
            neg_mask = torch.zeros(b, width, dtype=torch.bool, device=t_tok.device)
            rows = torch.zeros(b, dtype=torch.bool, device=t_tok.device)
            if batch.neg_rows.numel():
                negs = negs.index_copy(0, batch.neg_rows, n_tok.to(t_tok.dtype))
                neg_mask[batch.neg_rows] = n_mask.bool()
                rows[batch.neg_rows] = True
        ids = self.mask_duplicates
        return late_interaction_nce(q_tok, q_mask, t_tok, t_mask, self.mv_temperature, negs,
                                    neg_mask, rows, similarity=self.mv_similarity,
                                    target_ids=batch.target_ids if ids else None,
                                    negative_ids=batch.neg_ids if ids and negs is not None
                                    else None)

    def log_notes(self, metrics: dict[str, float]) -> list[str]:
        """Warnings about logged metrics: whether VEIN's loss depends on ``e`` at all."""
        note = vein_verdict(metrics.get("rec_loss"), metrics.get("rec_loss_shuffled"),
                            memory=self.vein_memory)
        if note is None:
            return []
        # The paper's VEIN ignoring e is what the ablation found: a diagnostic, not a warning.
        return [InfoNote(note) if self.vein_memory == "unmasked" else note]


def vein_meta_tasks(pairs: Sequence[TrainPair], data_dir: str | Path) -> dict[str, str]:
    """Meta-task of each training subset (unknown subsets count as non-VQA, with a warning)."""
    infos = load_dataset_infos(data_dir)
    out = {}
    for name in dict.fromkeys(p.dataset for p in pairs):
        try:
            out[name] = dataset_info(name, data_dir, infos).meta_task
        except Exception:  # noqa: BLE001 - metadata is optional for training subsets
            log.warning("VEIN: no meta-task known for subset %r; treating it as non-VQA "
                        "(set vein.eligible_override to change)", name)
            out[name] = "unknown"
    return out


def build_embedder(cfg: AdaptConfig) -> EmbeddingModel:
    """The embedding model of an adaptation run, with its trainable parameters set."""
    return prepare_embedder(cfg.model, cfg.run, max_text_tokens=cfg.max_text_tokens,
                            full_finetune=cfg.full_finetune, freeze_vision=cfg.freeze_vision,
                            lora=cfg.lora, backbone=cfg.backbone)


class AdaptRecipe(Recipe):
    """A fresh LoRA (or the LM weights) trained on query/target pairs, optionally with VEIN."""

    cfg: AdaptConfig

    @property
    def name(self) -> str:
        return "adapt" + ("+vein" if self.cfg.vein.enabled else "") + \
            ("+multivector" if self.cfg.multivector.enabled else "")

    def module(self) -> ContrastiveModule:
        from fam.losses.vein import VeinHead
        cfg = self.cfg
        emb = build_embedder(cfg)
        vein = None
        if cfg.vein.enabled:
            v = cfg.vein
            layers = list(v.layers) if v.layers is not None else default_vein_layers(
                sum(p.numel() for p in emb.adapter.model.parameters()), emb.num_layers)
            log.info("VEIN on layers %s (memory=%s, γ=%g, λ=%g, target %s)", layers, v.memory,
                     v.mask_ratio, v.weight, "V + PE" if v.target_pos else "V")
            # The head resolves the layers (fam.utils.layers) against hidden_states' length.
            vein = VeinHead(emb.adapter.hidden_size, layers, num_layers=emb.num_layers + 1,
                            gamma=v.mask_ratio, num_heads=v.num_heads,
                            detach_target=v.detach_target, dropout=v.dropout,
                            memory=v.memory, target_pos=v.target_pos, mask_init=v.mask_init,
                            visible_ratio=v.visible_ratio)
        head = None
        if cfg.multivector.enabled:
            from fam.model.multivector import MultiVectorHead
            m = cfg.multivector
            head = MultiVectorHead(emb.adapter.hidden_size, m.dim, m.tokens, m.similarity)
            head.to(emb.adapter.dtype)
            log.info("multi-vector: %s tokens, dim %s, %s, weight %g (pooled %g)", m.tokens,
                     m.dim or "hidden", m.similarity, m.weight, m.pooled_weight)
        return ContrastiveModule(emb, vein, vein_diagnose=cfg.vein.diagnose, multivector=head)

    def build(self) -> StageParts:
        cfg = self.cfg
        pairs = load_train(cfg.train_dir, cfg.image_root or None, cfg.subsets or None,
                           cfg.max_per_subset or None, seed=cfg.run.seed, split=cfg.split or None)
        module = self.module()
        meta = vein_meta_tasks(pairs, cfg.train_dir) if cfg.vein.enabled else {}
        collate = PairCollator(module.embedder.adapter, cfg.hard_negatives, meta,
                               dict(cfg.vein.eligible_override))
        v = cfg.vein
        m = cfg.multivector
        loss = ContrastiveLoss(cfg.temperature, v.weight, cfg.mask_duplicates, v.memory,
                               grad_norm_every=cfg.run.log_every if v.enabled and v.diagnose
                               else 0, pooled_weight=m.pooled_weight if m.enabled else 1.0,
                               mv_weight=m.weight, mv_temperature=m.temperature,
                               mv_similarity=m.similarity)
        return StageParts(module, loss, pairs, collate, gradcache_chunk=cfg.gradcache_chunk)

    def export(self, module: ContrastiveModule, final: Path, result: TrainResult) -> None:
        emb = module.embedder  # the VEIN head is dropped here
        if hasattr(emb.adapter.model, "peft_config"):
            # The adapter alone as well (a few MB; fam.model.load_lora puts it back on cfg.model).
            save_lora(emb, final.parent / "adapter")
        merge_lora(emb)
        emb.adapter.model.eval()
        emb.adapter.save_pretrained(final)
        if module.multivector is not None:
            from fam.model.multivector import save_multivector
            save_multivector(module.multivector, final)  # read back by load_multivector


def run_adapt(cfg: AdaptConfig) -> Path:
    """Train the embedding model; export it to ``<out_dir>/model`` (LoRA merged, no VEIN)."""
    return run_stage(cfg)
