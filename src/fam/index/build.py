"""Build an index folder from items: encode in resumable shards, then index the vectors.

Encoding a large collection is the slow part, so it is done in shards of ``shard_size``
items, each written atomically to a work folder beside the output (``.IDX.build/``). A killed
build run again with the same inputs keeps the finished shards and encodes only the rest;
a build with different inputs (other model, items, prompt or shard size) starts over. The
finished index replaces ``IDX`` atomically and the work folder is removed.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fam.errors import ConfigError
from fam.index.embed import embed
from fam.index.identity import model_identity, short
from fam.index.index import Manifest
from fam.index.items import ItemRecord, items_fingerprint, read_items
from fam.config import HnswConfig, MultiVectorIndexConfig
from fam.index.store import VectorIndex
from fam.utils.checkpoint import atomic_dir
from fam.utils.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

#: safetensors metadata keys ``fam encode`` writes (model identity travels with the vectors).
META_IDENTITY, META_PATH, META_NORMALIZED = "fam_model_identity", "fam_model_path", "fam_normalized"


def embeddings_metadata(model: str | Path, normalized: bool = True,
                        adapter: str | Path | None = None,
                        options: dict | None = None) -> dict[str, str]:
    """safetensors metadata naming the model that produced a file of embeddings.

    ``adapter`` and ``options`` as in :func:`fam.index.identity.model_identity`.
    """
    return {META_IDENTITY: model_identity(model, adapter, options),
            META_PATH: str(Path(model).resolve()) if Path(model).exists() else str(model),
            META_NORMALIZED: str(normalized).lower()}


def _read_embeddings(path: Path, n_items: int, model: str | Path | None,
                     ) -> tuple[torch.Tensor, str, str | None, bool]:
    """Embeddings from ``fam encode`` and the identity of the model that made them."""
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        emb = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise ConfigError(f"{path}: not a safetensors file ({e})") from None
    if "embeddings" not in emb:
        raise ConfigError(f"{path} has no 'embeddings' tensor (keys: {sorted(emb)}); write it "
                          "with fam encode")
    x = emb["embeddings"].float()
    if x.ndim != 2 or x.shape[0] != n_items:
        raise ConfigError(f"{path}: embeddings of shape {tuple(x.shape)} for {n_items} items; "
                          "encode the same items file with fam encode")
    ident = meta.get(META_IDENTITY)
    mpath = meta.get(META_PATH)
    if model is not None:
        given = model_identity(model)
        if ident is not None and ident != given:
            raise ConfigError(f"{path} was encoded by model {short(ident)} ({mpath}), not by "
                              f"--model {model} ({short(given)}); pass the model that encoded it")
        ident, mpath = given, str(Path(model).resolve()) if Path(model).exists() else str(model)
    if ident is None:
        raise ConfigError(f"{path} does not say which model encoded it (no {META_IDENTITY} "
                          "metadata); pass --model with the model that encoded it")
    if META_NORMALIZED in meta:
        normalized = meta[META_NORMALIZED] == "true"
    else:
        normalized = bool(torch.allclose(x.norm(dim=1), torch.ones(len(x)), atol=1e-4))
    return x, ident, mpath, normalized


class _ShardedEncoder:
    """Encode items shard by shard into ``work``, skipping shards already written."""

    def __init__(self, work: Path, spec: dict, records: list[ItemRecord], shard_size: int):
        self.work, self.records, self.shard_size = work, records, shard_size
        spec_path = work / "build.json"
        if work.exists():
            old = None
            if spec_path.is_file():
                try:
                    old = json.loads(spec_path.read_text())
                except json.JSONDecodeError:
                    old = None
            if old != spec:
                log.warning("%s holds an unfinished build of other inputs; starting over", work)
                shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        if not spec_path.is_file():
            atomic_write_json(spec_path, spec)
        self.n_shards = (len(records) + shard_size - 1) // shard_size

    def shard_path(self, s: int) -> Path:
        return self.work / f"shard-{s:05d}.safetensors"

    def todo(self) -> list[int]:
        return [s for s in range(self.n_shards) if not self.shard_path(s).is_file()]

    def run(self, load_model, batch_size: int, progress: bool, head=None, max_tokens: int = 0,
            pooling: str = "cluster") -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Pooled vectors (n, d) and, with a multi-vector ``head``, each item's token vectors
        (at most ``max_tokens``, :func:`fam.index.multivector.reduce_tokens`)."""
        from tqdm.auto import tqdm

        todo = self.todo()
        n = len(self.records)
        done = n - sum(len(self.records[s * self.shard_size:(s + 1) * self.shard_size])
                       for s in todo)
        if done:
            log.info("resuming: %d of %d shards already encoded", self.n_shards - len(todo),
                     self.n_shards)
        if todo:
            model = load_model()
            with tqdm(total=n, initial=done, unit="item", desc="encoding",
                      disable=not progress) as bar:
                for s in todo:
                    recs = self.records[s * self.shard_size:(s + 1) * self.shard_size]
                    parts, toks = [], []
                    for b in range(0, len(recs), batch_size):
                        items = [r.item for r in recs[b:b + batch_size]]
                        if head is None:
                            parts.append(embed(model, items, batch_size=batch_size))
                        else:
                            from fam.index.multivector import reduce_tokens
                            from fam.model.multivector import TwoReadings
                            pooled, t = TwoReadings(model, head).encode_multi_all(
                                items, batch_size=batch_size)
                            parts.append(pooled)
                            toks += [reduce_tokens(x, max_tokens, pooling) for x in t]
                        bar.update(len(items))
                    shard = {"embeddings": torch.cat(parts).contiguous()}
                    if head is not None:
                        shard["tokens"] = torch.cat(toks).contiguous()
                        shard["counts"] = torch.tensor([len(x) for x in toks], dtype=torch.long)
                    with atomic_path(self.shard_path(s)) as tmp:
                        save_file(shard, str(tmp))
        shards = [load_file(str(self.shard_path(s))) for s in range(self.n_shards)]
        vecs = torch.cat([sh["embeddings"] for sh in shards])
        if head is None:
            return vecs, None
        per_item = [t for sh in shards for t in torch.split(sh["tokens"], sh["counts"].tolist())]
        return vecs, per_item


def _hidden_size(model: str | Path) -> int:
    """The language model's width from the checkpoint's config (no weights loaded)."""
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(str(model))
    return int(cfg.get_text_config().hidden_size)


def build_index(out: str | Path, items: str | Path, *, model: str | Path | None = None,
                embeddings: str | Path | None = None, image_root: str | Path | None = None,
                kind: str = "flat", hnsw: HnswConfig | None = None, query_prompt: str = "",
                document_prompt: str = "", shard_size: int = 1024, batch_size: int = 32,
                progress: bool = True, embedding_model=None,
                multivector: MultiVectorIndexConfig | None = None) -> Path:
    """Build an index folder (see :mod:`fam.index.index` for the layout).

    Args:
        out: the index folder to write (replaced atomically when complete).
        items: items JSONL (``text``, ``image``, optional ``id``, metadata fields).
        model: the embedding model's folder: encodes the items, and names the model in the
            manifest. With ``embeddings`` it only names (and checks) the model.
        embeddings: a ``fam encode`` safetensors file of the same items, instead of encoding.
        image_root: folder the items' image paths are relative to (default: the items
            file's folder).
        kind: ``flat`` (exact, FAISS if installed), ``hnsw`` (FAISS) or ``exact`` (torch).
        hnsw: HNSW parameters.
        query_prompt, document_prompt: prompts for queries / items (stored in the manifest;
            the document prompt is applied while encoding).
        shard_size: items per resumable shard.
        batch_size: items per forward.
        progress: show a progress bar.
        embedding_model: an already loaded :class:`fam.model.EmbeddingModel` for ``model``
            (skips loading it again).
        multivector: build the multi-vector kind (:mod:`fam.index.multivector`): the model's
            token vectors (its trained head, else its plain token states) are stored beside
            the pooled vectors, from the same forwards.

    Returns:
        The index folder.

    Raises:
        ConfigError / DataError: one line naming the bad argument, file, line or field.
    """
    out = Path(out)
    if model is None and embeddings is None:
        raise ConfigError("give --model (to encode the items) or --embeddings (vectors from "
                          "fam encode)")
    if shard_size < 1 or batch_size < 1:
        raise ConfigError("--shard-size and --batch-size must be >= 1")
    hnsw = hnsw or HnswConfig()
    hnsw.validate("hnsw.")
    # A probe build of the index kind first: a missing FAISS fails before hours of encoding.
    VectorIndex(torch.zeros(1, 1), kind, hnsw)
    root = Path(image_root) if image_root is not None else Path(items).parent
    records = read_items(items, root, document_prompt)
    fp = items_fingerprint(records)
    work = out.parent / f".{out.name}.build"
    head = None
    if multivector is not None:
        multivector.validate("multivector.")
        if embeddings is not None or model is None:
            raise ConfigError("--multivector encodes the items' token vectors: give --model, "
                              "not --embeddings")
    if embeddings is not None:
        if document_prompt:
            raise ConfigError("--document-prompt cannot apply to --embeddings (already "
                              "encoded); encode the items with the prompt in their text")
        vecs, ident, mpath, normalized = _read_embeddings(Path(embeddings), len(records), model)
    else:
        ident = model_identity(model)
        mpath = str(Path(model).resolve()) if Path(model).exists() else str(model)
        spec = {"model_identity": ident, "items_fingerprint": fp,
                "document_prompt": document_prompt, "shard_size": shard_size}
        if multivector is not None:
            from dataclasses import asdict

            from fam.model.multivector import load_multivector
            hidden = _hidden_size(model)
            head = load_multivector(model if Path(model).is_dir() else None, hidden,
                                    tokens=multivector.tokens,
                                    similarity=multivector.similarity)
            spec["multivector"] = {**asdict(multivector), **head.settings()}
        enc = _ShardedEncoder(work, spec, records, shard_size)

        def load_model():
            from fam.data.items import check_items
            if embedding_model is not None:
                m = embedding_model
            else:
                from fam.model.encode import load_embedding_model
                m = load_embedding_model(model)  # no LM head in memory
            # The input contract with this model's rules (its image limits, its control
            # tokens), over every item before the first shard is encoded.
            check_items([r.item for r in records], m.adapter.input_rules,
                        progress=progress, desc="check items")
            return m

        vecs, per_item = enc.run(load_model, batch_size, progress, head,
                                 multivector.max_tokens if multivector is not None else 0,
                                 multivector.pooling if multivector is not None else "cluster")
        normalized = embedding_model.normalize if embedding_model is not None else True
    vectors = VectorIndex(vecs, kind, hnsw)
    manifest = Manifest(model_identity=ident, model_path=mpath, dim=int(vecs.shape[1]),
                        count=int(vecs.shape[0]), normalized=bool(normalized),
                        query_prompt=query_prompt, document_prompt=document_prompt, kind=kind,
                        hnsw=hnsw.__dict__.copy(), image_root=str(root.resolve()),
                        items_source=str(Path(items).resolve()), items_fingerprint=fp)
    store = None
    if head is not None:
        from fam.index.multivector import TokenStore
        store = TokenStore.from_list(per_item, head.out_dim)
        manifest.multivector = {**spec["multivector"], "count": int(len(store.tokens))}
    with atomic_dir(out) as tmp:
        if store is not None:
            from fam.index.multivector import TOKENS_FILE
            store.save(tmp / TOKENS_FILE)
        save_file({"embeddings": vecs.contiguous()}, str(tmp / "embeddings.safetensors"))
        with (tmp / "items.jsonl").open("w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r.row(), ensure_ascii=False) + "\n")
        vectors.save_extra(tmp)
        # The manifest last: its presence marks a complete folder.
        (tmp / "manifest.json").write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    log.info("index of %d items (dim %d, %s, %s) written to %s", len(records), vecs.shape[1],
             kind, vectors.backend, out)
    return out
