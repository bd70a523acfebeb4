"""An index folder: vectors, items and a manifest saying how they were made.

Layout (written atomically by :func:`fam.index.build_index`)::

    IDX/manifest.json           format, model identity, dim, metric, normalisation, prompts, kind
    IDX/embeddings.safetensors  'embeddings' (n, d) float32, row i = item i
    IDX/items.jsonl             one row per item: id, text, image (relative), images and
                                video as given, video_frames (the frames the model sampled),
                                metadata
    IDX/index.faiss             the HNSW graph (kind 'hnsw' only)
    IDX/tokens.safetensors      the multi-vector kind: every item's token vectors
                                (fam.index.multivector; manifest section 'multivector')

A flat index is rebuilt from the embeddings at load (a copy), so a flat index also loads and
searches on a machine without FAISS.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fam.data.types import MMItem
from fam.errors import ConfigError, DataError
from fam.index.identity import short
from fam.index.items import ROW_KEYS, apply_prompt
from fam.config import HnswConfig
from fam.index.store import VectorIndex
from fam.utils.io import read_jsonl, resolve_under

log = logging.getLogger(__name__)

FORMAT = "fam-index"
_PLACEHOLDERS = re.compile(r"<\|image_\d+\|>")
VERSION = 1


@dataclass
class Manifest:
    """What an index folder holds and how it was made (``manifest.json``).

    Attributes:
        model_identity: ``sha256:...`` of the embedding model's files (see
            :func:`fam.index.identity.model_identity`); queries must come from the same model.
        model_path: where the model was when the index was built (default for searching).
        dim, count: vector size and number of items.
        metric: ``inner_product`` (cosine on normalised vectors).
        normalized: whether the stored vectors are L2-normalised.
        query_prompt, document_prompt: prompts applied to query / item texts
            (:func:`fam.index.items.apply_prompt`).
        kind: ``flat``, ``hnsw`` or ``exact``.
        hnsw: HNSW parameters (kind ``hnsw``).
        image_root: absolute folder the items' image paths are relative to.
        items_source, items_fingerprint: the items file and a hash of what was embedded.
        multivector: the multi-vector kind's settings (head token set, dim, similarity,
            ``max_tokens``, ``candidate_tokens``, token count), None for a single-vector index.
    """

    model_identity: str
    model_path: str | None
    dim: int
    count: int
    metric: str = "inner_product"
    normalized: bool = True
    query_prompt: str = ""
    document_prompt: str = ""
    kind: str = "flat"
    hnsw: dict[str, int] = field(default_factory=lambda: asdict(HnswConfig()))
    image_root: str | None = None
    items_source: str | None = None
    items_fingerprint: str | None = None
    multivector: dict[str, Any] | None = None
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any, path: Path) -> "Manifest":
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a fam index manifest (no \"format\": \"{FORMAT}\")")
        if obj.get("version") != VERSION:
            raise ConfigError(f"{path}: index format version {obj.get('version')!r}; this fam "
                              f"reads version {VERSION}: rebuild the index")
        known = set(cls.__dataclass_fields__)
        for key in ("model_identity", "dim", "count"):
            if key not in obj:
                raise ConfigError(f"{path}: missing key {key!r}; rebuild the index")
        m = cls(**{k: v for k, v in obj.items() if k in known})
        if m.metric != "inner_product":
            raise ConfigError(f"{path}: metric {m.metric!r} is not supported (inner_product)")
        return m


@dataclass
class Hit:
    """One search result."""

    rank: int
    index: int
    id: str
    score: float
    text: str
    image: str | None
    metadata: dict[str, Any]
    #: Further images and the video's sampled frames (relative paths), when the item has them.
    images: list[str] = field(default_factory=list)
    video_frames: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = {"rank": self.rank, "id": self.id, "score": self.score, "text": self.text,
               "image": self.image, "index": self.index, "metadata": self.metadata}
        if self.images:
            out["images"] = self.images
        if self.video_frames:
            out["video_frames"] = self.video_frames
        return out


class ModelMismatchError(ConfigError):
    """The query model is not the model that built the index."""


class Index:
    """A loaded index folder.

    Args:
        path: the folder.
        manifest: its manifest.
        rows: its items (dicts with ``id``, ``text``, ``image`` and metadata).
        vectors: the search structure.
        image_root: folder the items' images are under (overrides the manifest's).
    """

    def __init__(self, path: Path, manifest: Manifest, rows: list[dict[str, Any]],
                 vectors: VectorIndex, image_root: str | Path | None = None):
        self.path = path
        self.manifest = manifest
        self.rows = rows
        self.vectors = vectors
        root = image_root if image_root is not None else manifest.image_root
        self.image_root = Path(root).resolve() if root is not None else None
        #: :class:`fam.index.multivector.MultiVectorSearch` of a multi-vector index (else None).
        self.late = None

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def load(cls, path: str | Path, image_root: str | Path | None = None,
             kind: str | None = None) -> "Index":
        """Load an index folder.

        Args:
            path: the folder written by :func:`fam.index.build_index`.
            image_root: where the items' images are now (default: where they were at build).
            kind: search with another back-end than the one built (``exact`` for the
                reference; ``flat`` over an HNSW index's vectors).

        Raises:
            ConfigError: not an index folder, incomplete, or an unreadable manifest.
        """
        from safetensors.torch import load_file

        path = Path(path)
        mpath = path / "manifest.json"
        if not mpath.is_file():
            raise ConfigError(f"{path} is not an index folder (no manifest.json); build one with "
                              "fam index build")
        try:
            obj = json.loads(mpath.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{mpath}: invalid JSON ({e.msg} at line {e.lineno})") from None
        manifest = Manifest.from_json(obj, mpath)
        epath = path / "embeddings.safetensors"
        if not epath.is_file():
            raise ConfigError(f"{epath} is missing: the index folder is incomplete; rebuild it")
        emb = load_file(str(epath))["embeddings"]
        rows = [row for _, row in read_jsonl(path / "items.jsonl")]
        if emb.shape != (manifest.count, manifest.dim) or len(rows) != manifest.count:
            raise ConfigError(f"{path}: {len(rows)} items and embeddings of shape "
                              f"{tuple(emb.shape)} disagree with the manifest (count "
                              f"{manifest.count}, dim {manifest.dim}); rebuild the index")
        use = kind or manifest.kind
        hnsw = HnswConfig(**manifest.hnsw)
        if use == "hnsw" and manifest.kind != "hnsw":
            vectors = VectorIndex(emb, "hnsw", hnsw)  # built on the fly (benchmarks)
        else:
            vectors = VectorIndex.load(path, emb, use, hnsw)
        index = cls(path, manifest, rows, vectors, image_root)
        if manifest.multivector is not None:
            from fam.index.multivector import TOKENS_FILE, MultiVectorSearch, TokenStore
            store = TokenStore.load(path / TOKENS_FILE)
            if len(store) != manifest.count:
                raise ConfigError(f"{path}: token vectors of {len(store)} items for "
                                  f"{manifest.count} items; rebuild the index")
            mv = manifest.multivector
            index.late = MultiVectorSearch(store, mv["similarity"], mv["candidate_tokens"],
                                           "exact" if use == "exact" else "flat")
        return index

    # ------------------------------------------------------------------ model check
    def check_model(self, identity: str, model_label: str) -> None:
        """Refuse queries from a model other than the one that built the index.

        Raises:
            ModelMismatchError: one line naming both models and what to do.
        """
        if identity != self.manifest.model_identity:
            built = self.manifest.model_path or "an unknown path"
            raise ModelMismatchError(
                f"index {self.path} was built by model {short(self.manifest.model_identity)} "
                f"({built}), but {model_label} is {short(identity)}: search with the model that "
                f"built it, or rebuild the index with fam index build --model {model_label}")

    # ------------------------------------------------------------------ queries
    def query_item(self, text: str = "", image: Path | None = None,
                   prompt: str | None = None) -> MMItem:
        """The item to embed for a query: its text from :meth:`query_text`."""
        return MMItem(self.query_text(text, image is not None, prompt), image)

    def query_text(self, text: str, has_image: bool, prompt: str | None = None) -> str:
        """The text a query is embedded with (``fam search`` and ``/v1/search`` alike).

        An explicit ``prompt`` is applied to the text (even an empty one); a query with text
        gets the manifest's query prompt; an image-only query (no text beyond image
        placeholders) is embedded as the index's images were (:meth:`image_document_text`),
        so an image that is in the index finds itself first.
        """
        if prompt is not None:
            return apply_prompt(prompt, text)
        if has_image and not _PLACEHOLDERS.sub("", text).strip():
            return self.image_document_text()
        return apply_prompt(self.manifest.query_prompt, text)

    def image_document_text(self) -> str:
        """The text the index's images were embedded with: the document prompt applied to
        the text most of its image items share (empty when they share none)."""
        texts = Counter(str(r.get("text") or "") for r in self.rows if r.get("image"))
        common, n = texts.most_common(1)[0] if texts else ("", 0)
        return apply_prompt(self.manifest.document_prompt,
                            common if 2 * n > sum(texts.values()) else "")

    def describe_query(self, text: str, has_image: bool, prompt: str | None = None) -> str:
        """One line saying which prompt a query got and how to choose another."""
        used = self.query_text(text, has_image, prompt)
        if prompt is not None:
            return f"query embedded as {used!r} (--query-prompt)"
        if has_image and not _PLACEHOLDERS.sub("", text).strip():
            return (f"image-only query embedded as the index's images were: {used!r}; "
                    "--query-prompt P embeds it with P instead ('' for the image alone)")
        return (f"query embedded as {used!r} (the index's query prompt "
                f"{self.manifest.query_prompt!r}); --query-prompt P to use another")

    def search(self, queries: torch.Tensor, k: int = 10) -> list[list[Hit]]:
        """Top-k hits for each query embedding (q, d), best first."""
        return self._hits(*self.vectors.search(queries, k))

    def search_tokens(self, queries: list[torch.Tensor], k: int = 10) -> list[list[Hit]]:
        """Top-k hits by late interaction for each query's token vectors (multi-vector kind:
        FAISS token candidates, exact MaxSim rerank; :mod:`fam.index.multivector`)."""
        if self.late is None:
            raise ConfigError(f"{self.path} is a single-vector index: build it with fam index "
                              "build --multivector for late-interaction search")
        return self._hits(*self.late.search(queries, min(k, len(self))))

    def _hits(self, scores: torch.Tensor, idx: torch.Tensor) -> list[list[Hit]]:
        out = []
        for srow, irow in zip(scores.tolist(), idx.tolist()):
            hits = []
            for s, i in zip(srow, irow):
                if i < 0:
                    continue
                row = self.rows[i]
                meta = {k: v for k, v in row.items() if k not in ROW_KEYS}
                hits.append(Hit(len(hits) + 1, i, str(row["id"]), float(s), row.get("text", ""),
                                row.get("image"), meta, list(row.get("images") or []),
                                list(row.get("video_frames") or [])))
            out.append(hits)
        return out

    def image_file(self, i: int, key: str = "image", j: int | None = None) -> Path | None:
        """The image file of item ``i`` (only files the index references, under its root):
        its ``image``, or entry ``j`` of its ``images`` or ``video_frames`` (``key``)."""
        if not 0 <= i < len(self.rows) or key not in ("image", "images", "video_frames"):
            return None
        rel = self.rows[i].get(key)
        if j is not None:
            rel = rel[j] if isinstance(rel, list) and 0 <= j < len(rel) else None
        if not rel or not isinstance(rel, str) or self.image_root is None:
            return None
        try:
            p = resolve_under(self.image_root, rel, source=self.path / "items.jsonl",
                              line=i + 1, field=key)
        except DataError:
            return None
        return p if p.is_file() else None


def load_query_model(index: Index, model: str | Path | None = None):
    """The embedding model for queries to ``index``, checked to be the one that built it.

    Args:
        index: the loaded index.
        model: the model folder (default: the one recorded in the manifest).

    Raises:
        ModelMismatchError: another model. ConfigError: no model given and the recorded one
            is not on this machine.
    """
    from fam.index.identity import model_identity
    from fam.model.encode import load_embedding_model
    path = model if model is not None else index.manifest.model_path
    if path is None or (model is None and not Path(path).exists()):
        raise ConfigError(f"the model recorded in {index.path} ({path}) is not on this machine; "
                          "pass --model with the model that built the index")
    index.check_model(model_identity(path), str(path))
    return load_embedding_model(path)


def format_hits(hits: list[Hit]) -> str:
    """A readable table of hits (rank, score, id, image, text)."""
    lines = [f"{'rank':>4}  {'score':>8}  {'id':<16} {'image':<28} text"]
    for h in hits:
        text = h.text.replace("\n", " ")
        lines.append(f"{h.rank:>4}  {h.score:>8.4f}  {h.id[:16]:<16} {(h.image or '-')[:28]:<28} "
                     f"{text[:70]}")
    return "\n".join(lines)
