"""Contrastive adaptation on query/target pairs: the VLM2Vec baseline and FAM's stage 2.

``L_adapt = L_task + λ L_rec`` (SPEC §3): ``L_task`` is InfoNCE of query against target
embeddings with in-batch negatives and the data's hard negatives (SPEC §1); ``L_rec`` is the
VEIN reconstruction loss, added when ``vein.enabled``. Without VEIN this is the VLM2Vec
recipe. The VEIN decoders live only in the training module: the exported model (a normal
checkpoint directory, LoRA merged) holds no trace of them.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from fam import distributed as dist_utils
from fam.backbones import load_backbone
from fam.backbones.base import BackboneAdapter, EncodedBatch
from fam.config import AdaptConfig, to_dict
from fam.data.mmeb import TrainPair, dataset_info, load_dataset_infos, load_train
from fam.data.types import MMItem
from fam.errors import ConfigError
from fam.losses.contrastive import info_nce
from fam.losses.vein import default_vein_layers, global_sums, grad_norms, vein_verdict
from fam.model import EmbeddingModel, apply_lora, merge_lora, save_lora, select_tokens
from fam.train.gradcache import GradCacheMixin, chunk_bounds, split_encoded
from fam.train.trainer import Trainer, enable_gradient_checkpointing, save_on_main_rank

log = logging.getLogger(__name__)


@dataclass
class PairBatch:
    """A collated batch of training pairs.

    Attributes:
        query, target: encoded sides, B items each.
        neg: encoded hard negatives of the rows that have one (or None).
        neg_rows: (n_neg,) long, the rows ``neg`` belongs to.
        vein_query, vein_target: (B,) bool, VEIN eligibility of each side's sample.
        target_ids, neg_ids: (B,) int64 content ids of each row's target and hard negative
            (-1: none), so identical items in a batch are not used as each other's negatives.
    """

    query: EncodedBatch
    target: EncodedBatch
    neg: EncodedBatch | None
    neg_rows: torch.Tensor
    vein_query: torch.Tensor
    vein_target: torch.Tensor
    target_ids: torch.Tensor
    neg_ids: torch.Tensor

    def to(self, device: torch.device) -> "PairBatch":
        return PairBatch(self.query.to(device), self.target.to(device),
                         self.neg.to(device) if self.neg is not None else None,
                         self.neg_rows.to(device), self.vein_query.to(device),
                         self.vein_target.to(device), self.target_ids.to(device),
                         self.neg_ids.to(device))


def item_id(item: MMItem | None) -> int:
    """A stable 63-bit content id of an item (same text and image = same id; -1 for None).

    Stable across processes (unlike ``hash``), so ids agree between DDP ranks.
    """
    if item is None:
        return -1
    h = hashlib.blake2b(f"{item.text}\x00{item.image or ''}".encode(), digest_size=8)
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
        q_img = [p.load_image("query") for p in pairs]
        t_img = [p.load_image("pos") for p in pairs]
        query = self.adapter.encode([p.query for p in pairs], q_img)
        target = self.adapter.encode([p.pos for p in pairs], t_img)
        neg, rows = None, []
        if self.hard_negatives:
            rows = [i for i, p in enumerate(pairs) if p.neg is not None]
            if rows:
                neg = self.adapter.encode([pairs[i].neg for i in rows],
                                          [pairs[i].load_image("neg") for i in rows])
        vq = torch.tensor([self._eligible(p, im is not None) for p, im in zip(pairs, q_img)])
        vt = torch.tensor([self._eligible(p, im is not None) for p, im in zip(pairs, t_img)])
        tid = torch.tensor([item_id(p.pos) for p in pairs], dtype=torch.long)
        nid = torch.tensor([item_id(p.neg) if self.hard_negatives else -1 for p in pairs],
                           dtype=torch.long)
        return PairBatch(query, target, neg, torch.tensor(rows, dtype=torch.long), vq, vt,
                         tid, nid)


class ContrastiveModule(GradCacheMixin, nn.Module):
    """Embedding model + optional VEIN head; ``forward`` returns the loss terms.

    With ``gradcache_chunk > 0`` the Trainer runs :meth:`train_step` (GradCache, see
    :mod:`fam.train.gradcache`): the cached representations are the query, target and
    hard-negative embeddings; VEIN runs inside each chunk's re-run.

    Args:
        embedder: the embedding model.
        temperature: τ of InfoNCE.
        vein: a :class:`fam.losses.vein.VeinHead` or None.
        vein_weight: λ.
        gradcache_chunk: GradCache chunk size in rows (0: off).
        mask_duplicates: identical targets/negatives of other rows are not negatives
            (see :func:`fam.losses.contrastive.info_nce`'s ``target_ids``).
        hard_negatives: the data's hard negatives are used. Then every (micro-)batch passes
            a negative block to the loss, all-masked when none of its rows has one, so that
            under DDP/FSDP all ranks gather tensors of the same shapes even when only some
            ranks' local batches carry negatives (MMEB mixes subsets with and without).
        vein_diagnose: VEIN's diagnostic (docs/vein.md): every step ``rec_loss_shuffled``
            (L_rec with ``e`` shuffled across the batch, no gradient), and every
            ``grad_norm_every`` steps ``vein_grad_norm`` / ``task_grad_norm``, the norms of
            the gradients ``λ L_rec`` and ``L_task`` alone send into the trained backbone
            weights (plain path only: GradCache never holds the whole graph).
        grad_norm_every: see ``vein_diagnose`` (0: never).

    L_rec is the mean over the masked tokens of the **global** batch
    (:func:`fam.losses.vein.global_mean`): under DDP it equals one process on the
    concatenated batch, in value and gradient.
    """

    gc_aux_name = "rec_loss"

    def __init__(self, embedder: EmbeddingModel, temperature: float = 0.02,
                 vein: nn.Module | None = None, vein_weight: float = 1.0,
                 gradcache_chunk: int = 0, mask_duplicates: bool = True,
                 hard_negatives: bool = False, vein_diagnose: bool = False,
                 grad_norm_every: int = 0):
        super().__init__()
        self.vein_diagnose = vein_diagnose and vein is not None
        self.grad_norm_every = grad_norm_every
        self.hard_negatives = hard_negatives
        self.mask_duplicates = mask_duplicates
        self.embedder = embedder
        self.temperature = temperature
        self.vein = vein
        self.vein_weight = vein_weight
        self.gradcache_chunk = gradcache_chunk

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

    def forward(self, batch: PairBatch, step: int = 0, mode: str = "loss") -> dict:
        """``mode="loss"``: the named loss terms. ``mode="reps"``: this batch's embeddings
        ``{"q", "t", "n"}`` ((B, d), (B, d), (n_neg, d)) and the VEIN sum ``aux`` over its
        masked tokens with their count ``aux_n`` (the GradCache protocol)."""
        layers = self._vein_layers()
        q = self.embedder(batch.query, layers)
        t = self.embedder(batch.target, layers)
        n = self.embedder(batch.neg).embedding if batch.neg is not None else \
            t.embedding.new_zeros((0, t.embedding.shape[1]))
        out = {"reps": {"q": q.embedding, "t": t.embedding, "n": n}, "aux": None, "aux_n": 0}
        if batch.neg is None and self.hard_negatives and dist_utils.is_dist():
            # FSDP all-gathers each sharded block in every forward, so all ranks must run
            # the same forwards: a rank without negatives encodes a placeholder (its first
            # target) that enters the loss with weight 0 (no effect on values or gradients).
            out["reps"]["p"] = self.embedder(split_encoded(batch.target, 0, 1)).embedding
        if self.vein is not None:
            rq = self._vein_loss(q, batch.vein_query)
            rt = self._vein_loss(t, batch.vein_target)
            # Sum over the masked tokens of both sides and their count: L_rec is their mean.
            out["aux"], out["aux_n"] = rq["sum"] + rt["sum"], rq["count"] + rt["count"]
            if self.vein_diagnose:
                out["aux_diag"] = {"rec_loss_shuffled": rq["sum_shuffled"] + rt["sum_shuffled"]}
        if mode == "reps":
            return out
        terms = self.gc_loss([out["reps"]], [batch], out["aux_n"])
        scale = terms.pop("aux_scale")
        if out["aux"] is not None:
            rec = scale * out["aux"]
            if self.grad_norm_every and (step + 1) % self.grad_norm_every == 0 \
                    and torch.is_grad_enabled():
                params = [p for p in self.embedder.parameters() if p.requires_grad]
                norms = grad_norms({"task": terms["loss"], "vein": rec}, params)
                terms["task_grad_norm"] = torch.tensor(norms["task"])
                terms["vein_grad_norm"] = torch.tensor(norms["vein"])
            terms["loss"] = terms["loss"] + rec
            terms.update(self.gc_aux_terms(out["aux"].detach(), out["aux_n"],
                                           out.get("aux_diag", {})))
        return terms

    def gc_aux_terms(self, aux_sum: torch.Tensor, aux_n: int,
                     diag: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The logged VEIN terms, global means over the masked tokens of all ranks:
        ``rec_loss`` (own ``e``) and, with the diagnostic, ``rec_loss_shuffled``."""
        n, sums = global_sums(aux_n, {"rec_loss": aux_sum, **diag})
        return {k: torch.tensor(v / max(n, 1), dtype=torch.float64) for k, v in sums.items()}

    def log_notes(self, metrics: dict[str, float]) -> list[str]:
        """Warnings about logged metrics: whether VEIN's loss depends on ``e`` at all."""
        memory = getattr(self.vein, "memory", "unmasked")
        note = vein_verdict(metrics.get("rec_loss"), metrics.get("rec_loss_shuffled"),
                            memory=memory)
        return [note] if note else []

    def gc_split(self, batch: PairBatch, size: int) -> list[PairBatch]:
        """Rows ``[s, e)`` of each side; a chunk's hard negatives are those of its rows."""
        out = []
        for s, e in chunk_bounds(batch.query.batch_size, size):
            sel = ((batch.neg_rows >= s) & (batch.neg_rows < e)).nonzero().flatten()
            neg = None
            if batch.neg is not None and sel.numel():
                # neg_rows is ascending (built row by row), so the selection is contiguous.
                neg = split_encoded(batch.neg, int(sel[0]), int(sel[-1]) + 1)
            out.append(PairBatch(split_encoded(batch.query, s, e), split_encoded(batch.target, s, e),
                                 neg, batch.neg_rows[sel] - s, batch.vein_query[s:e],
                                 batch.vein_target[s:e], batch.target_ids[s:e],
                                 batch.neg_ids[s:e]))
        return out

    def _aux_scale(self, aux_n: int) -> float:
        if self.vein is None:
            return 0.0
        n, _ = global_sums(aux_n)  # every rank calls gc_loss once per (micro-)batch
        return self.vein_weight * dist_utils.world_size() / max(n, 1)

    def gc_loss(self, reps, chunks, aux_n: int) -> dict[str, torch.Tensor]:
        """InfoNCE over the concatenated chunk embeddings (see :mod:`fam.train.gradcache`)."""
        q = torch.cat([r["q"] for r in reps])
        t = torch.cat([r["t"] for r in reps])
        negs = mask = None
        offsets = [0]
        for c in chunks[:-1]:
            offsets.append(offsets[-1] + c.query.batch_size)
        rows = torch.cat([c.neg_rows + o for c, o in zip(chunks, offsets)])
        if rows.numel() or self.hard_negatives:
            # Row i's negative in slot i; rows without one are masked out (-inf scores).
            negs = t.new_zeros(t.shape)
            mask = torch.zeros(t.shape[0], dtype=torch.bool, device=t.device)
            if rows.numel():
                n = torch.cat([r["n"] for r in reps])
                negs = negs.index_copy(0, rows, n.to(t.dtype))
                mask[rows] = True
        tid = torch.cat([c.target_ids for c in chunks])
        nid = torch.cat([c.neg_ids for c in chunks]) if negs is not None else None
        task = info_nce(q, t, self.temperature, negs, mask,
                        target_ids=tid if self.mask_duplicates else None,
                        negative_ids=nid if self.mask_duplicates else None)
        loss = task["loss"]
        for r in reps:
            if "p" in r:  # FSDP placeholder forward: in the graph, weight 0
                loss = loss + 0.0 * r["p"].sum()
        terms = {"loss": loss, "task_loss": task["loss"].detach(),
                 "accuracy": task["accuracy"],
                 # λ L_rec = λ Σ_tokens rec / N over the global batch (SPEC §3); W/N per
                 # rank because DDP averages the ranks' gradients (global_mean).
                 "aux_scale": self._aux_scale(aux_n)}
        return terms


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


def prepare_embedder(model: str, run, *, max_text_tokens: int, full_finetune: bool,
                     freeze_vision: bool, lora) -> EmbeddingModel:
    """Load a backbone and choose what trains: a fresh LoRA, or the weights (full FT).

    Shared by every contrastive stage (MAC alignment and adaptation). With full fine-tuning
    the vision tower stays frozen when ``freeze_vision`` (the adapter knows which
    parameters are vision parameters).
    """
    adapter = load_backbone(model, max_text_tokens=max_text_tokens,
                            attn_implementation=run.attn_implementation or None)
    emb = EmbeddingModel(adapter)
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    if full_finetune:
        for name, p in adapter.model.named_parameters():
            if not (freeze_vision and adapter.is_vision_param(name)):
                p.requires_grad_(True)
    elif lora.enabled:
        apply_lora(emb, lora)
    else:
        raise ConfigError("nothing to train: set lora.enabled=true or full_finetune=true")
    if run.gradient_checkpointing:
        enable_gradient_checkpointing(emb)
    return emb


def trained_embedder(trainer: Trainer, emb: EmbeddingModel, rebuild) -> EmbeddingModel:
    """The trained embedding model with full weights, ready to merge and save.

    After FSDP the parameters are shards on each rank: every rank gathers the full state
    (a collective) and loads it into a freshly built, unsharded copy from ``rebuild()``.
    Without sharding this is ``emb`` itself.
    """
    if not trainer.sharded:
        return emb
    full = trainer.full_state_dict()
    fresh = rebuild()
    fresh.load_state_dict({k[len("embedder."):]: v for k, v in full.items()
                           if k.startswith("embedder.")})
    return fresh


def build_embedder(cfg: AdaptConfig) -> EmbeddingModel:
    """The embedding model of an adaptation run, with its trainable parameters set."""
    return prepare_embedder(cfg.model, cfg.run, max_text_tokens=cfg.max_text_tokens,
                            full_finetune=cfg.full_finetune, freeze_vision=cfg.freeze_vision,
                            lora=cfg.lora)


def run_adapt(cfg: AdaptConfig) -> Path:
    """Train the embedding model; export it to ``<out_dir>/model`` (LoRA merged, no VEIN)."""
    from fam.losses.vein import VeinHead

    out = Path(cfg.run.out_dir)
    final = out / "model"
    if (final / "config.json").exists() and cfg.run.resume:
        log.info("adapt: %s already holds a trained model; skipping", final)
        return final
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    root = cfg.image_root or str(Path(cfg.train_dir).parent)
    pairs = load_train(cfg.train_dir, root, cfg.subsets or None, cfg.max_per_subset or None,
                       seed=cfg.run.seed)
    emb = build_embedder(cfg)
    vein = None
    meta: dict[str, str] = {}
    if cfg.vein.enabled:
        v = cfg.vein
        layers = list(v.layers) or default_vein_layers(
            sum(p.numel() for p in emb.adapter.model.parameters()), emb.num_layers)
        log.info("VEIN on layers %s (memory=%s, γ=%g, λ=%g, target %s)", layers, v.memory,
                 v.mask_ratio, v.weight, "V + PE" if v.target_pos else "V")
        # Layer indices into hidden_states (0 = input embeddings, num_layers = last).
        vein = VeinHead(emb.adapter.hidden_size, [emb.resolve_layer(l) for l in layers],
                        num_layers=emb.num_layers + 1, gamma=v.mask_ratio,
                        num_heads=v.num_heads, detach_target=v.detach_target,
                        dropout=v.dropout, memory=v.memory, target_pos=v.target_pos,
                        mask_init=v.mask_init, visible_ratio=v.visible_ratio)
        meta = vein_meta_tasks(pairs, cfg.train_dir)
    module = ContrastiveModule(emb, cfg.temperature, vein, cfg.vein.weight, cfg.gradcache_chunk,
                               cfg.mask_duplicates, cfg.hard_negatives,
                               vein_diagnose=cfg.vein.diagnose,
                               grad_norm_every=cfg.run.log_every if cfg.vein.diagnose else 0)
    collate = PairCollator(emb.adapter, cfg.hard_negatives, meta, dict(cfg.vein.eligible_override))
    trainer = Trainer(module, pairs, collate, cfg.optim, cfg.run,
                      "adapt+vein" if vein is not None else "adapt", config_dump=to_dict(cfg))
    trainer.train()
    emb = trained_embedder(trainer, emb, lambda: build_embedder(cfg))
    if hasattr(emb.adapter.model, "peft_config"):
        # The adapter alone as well (a few MB; fam.model.load_lora puts it back on cfg.model).
        save_on_main_rank(lambda: save_lora(emb, out / "adapter"))
    merge_lora(emb)
    emb.adapter.model.eval()
    if save_on_main_rank(lambda: emb.adapter.save_pretrained(final)):
        log.info("adapt: saved the embedding model to %s", final)
    return final
