"""The one reader of LLaVA-style caption files (pre-training captions, QA pairs).

Caption files come in the LLaVA pre-training layouts: a JSON list (or a JSONL file) of
``{"image", "caption" | "blip_caption"}`` (``blip_laion_cc_sbu_558k_meta.json``) or of
``{"image", "conversations": [{"from": "human", ...}, {"from": "gpt", "value": caption}]}``
(``blip_laion_cc_sbu_558k.json``). :func:`iter_captions` validates every record and is
what every consumer reads through:

* :func:`load_captions` — training samples with resolved image paths (stage 0, MAC
  alignment, projector training, held-out caption loss);
* :func:`caption_map` — ``{image: caption}`` (the PAD tagger, the alignment report's
  text-entropy reference);
* :func:`caption_texts` — the captions alone (a tokenizer corpus).

Errors are :class:`~fam.errors.DataError` naming the file, the record (1-based) and field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

from fam.errors import DataError
from fam.utils.io import read_jsonl, resolve_under

__all__ = ["CaptionRecord", "CaptionSample", "iter_captions", "load_captions", "load_qa",
           "caption_map", "caption_texts", "read_json_list", "CAPTION_FIELDS"]

#: Caption fields, in order of preference.
CAPTION_FIELDS: tuple[str, ...] = ("caption", "blip_caption")


class CaptionRecord(NamedTuple):
    """One validated record: its 1-based number, image path (as written) and caption."""

    line: int
    image: str
    caption: str


@dataclass(frozen=True)
class CaptionSample:
    """An image with a prompt and the text the model must generate after it."""

    image: Path
    prompt: str
    target: str
    source: str
    line: int
    field: str


def read_json_list(path: str | Path) -> list[Any]:
    """A JSON file holding a list (e.g. LLaVA captions, Scenes QA)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg}, line {e.lineno} column {e.colno})", path,
                        e.lineno) from None
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of records, got {type(data).__name__}", path)
    return data


def _caption(rec: dict, fields: Sequence[str]) -> str | None:
    for key in fields:
        if isinstance(rec.get(key), str) and rec[key].strip():
            return rec[key].strip()
    if isinstance(rec.get("conversations"), list):
        for turn in rec["conversations"]:
            if isinstance(turn, dict) and turn.get("from") == "gpt" and \
                    isinstance(turn.get("value"), str):
                return turn["value"].strip() or None
    return None


def iter_captions(path: str | Path, fields: Sequence[str] = CAPTION_FIELDS,
                  ) -> Iterator[CaptionRecord]:
    """Validated records of a caption file (JSON list, or JSONL when named ``*.jsonl``).

    Args:
        path: the caption file.
        fields: caption fields in order of preference; the first ``gpt`` turn of
            ``conversations`` is the fallback.

    Raises:
        DataError: the file is missing or not JSON, a record is not an object, has no
            image path or no caption (names the file, record and field).
    """
    path = Path(path)
    rows: Iterable[tuple[int, Any]]
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise DataError("file not found", path)
        rows = read_jsonl(path)
    else:
        rows = enumerate(read_json_list(path), start=1)
    for i, rec in rows:
        if not isinstance(rec, dict):
            raise DataError(f"expected an object, got {type(rec).__name__}", path, i)
        img = rec.get("image")
        if not isinstance(img, str) or not img:
            raise DataError("missing or empty image path", path, i, "image")
        cap = _caption(rec, fields)
        if not cap:
            names = ", ".join(repr(f) for f in fields)
            raise DataError(f"no caption: expected a non-empty {names} or a 'gpt' turn in "
                            "'conversations'", path, i, fields[0] if fields else "caption")
        yield CaptionRecord(i, img, cap)


def load_captions(path: str | Path, image_root: str | Path, prompt: str = "Describe the image.",
                  ) -> list[CaptionSample]:
    """Caption records as training samples, image paths resolved under ``image_root``.

    Raises:
        DataError: as :func:`iter_captions`, or an image path escaping ``image_root``.
    """
    path = Path(path)
    return [CaptionSample(resolve_under(image_root, r.image, source=path, line=r.line,
                                        field="image"), prompt, r.caption, str(path), r.line,
                          "image")
            for r in iter_captions(path)]


def load_qa(path: str | Path, image_root: str | Path) -> list[CaptionSample]:
    """A JSON list of ``{image, question, answer}`` as samples (question = prompt)."""
    path = Path(path)
    out = []
    for i, rec in enumerate(read_json_list(path), start=1):
        if not isinstance(rec, dict):
            raise DataError(f"expected an object, got {type(rec).__name__}", path, i)
        for key in ("image", "question", "answer"):
            if not isinstance(rec.get(key), str) or not rec[key]:
                raise DataError(f"missing or empty {key!r}", path, i, key)
        image = resolve_under(image_root, rec["image"], source=path, line=i, field="image")
        out.append(CaptionSample(image, rec["question"], rec["answer"], str(path), i, "image"))
    return out


def caption_map(paths: str | Path | Sequence[str | Path],
                fields: Sequence[str] = CAPTION_FIELDS) -> dict[str, str]:
    """``{image (as written): caption}`` over one or more caption files (later files win)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    return {r.image: r.caption for p in paths for r in iter_captions(p, fields)}


def caption_texts(path: str | Path) -> list[str]:
    """The captions of a file, in order (e.g. a tokenizer's training corpus)."""
    return [r.caption for r in iter_captions(path)]
