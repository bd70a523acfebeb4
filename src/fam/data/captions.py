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

import dataclasses

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

from fam.data.images import ImageRef
from fam.errors import DataError
from fam.utils.io import read_jsonl, resolve_under

__all__ = ["CaptionRecord", "CaptionSample", "iter_captions", "load_captions", "load_qa",
           "caption_map", "caption_texts", "read_json_list", "CAPTION_FIELDS"]

#: Caption fields, in order of preference.
CAPTION_FIELDS: tuple[str, ...] = ("caption", "blip_caption")


class CaptionRecord(NamedTuple):
    """One validated record: its 1-based number, image path (as written) and caption; a
    video record (``{"video": frame folder, "caption"}``) has ``image == ""``."""

    line: int
    image: str
    caption: str
    video: str = ""


@dataclass(frozen=True)
class CaptionSample:
    """An image with a prompt and the text the model must generate after it (``image``
    ``None``: a text-only sample, e.g. a language model's pretraining text)."""

    image: Path | None
    prompt: str
    target: str
    source: str
    line: int
    field: str
    video: tuple[Path, ...] = ()  # a video caption's frames (natural order), else ()

    def image_refs(self) -> list[ImageRef]:
        """The sample's image (or video frames) and where it was referenced (the up-front
        image check); none for a text-only sample."""
        paths = ([self.image] if self.image is not None else []) + list(self.video)
        return [ImageRef(p, self.source, self.line, self.field) for p in paths]


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
        vid = rec.get("video")
        if isinstance(vid, str) and vid and img is None:
            img = ""
        elif not isinstance(img, str) or not img:
            raise DataError("missing or empty image path (or 'video': a frame folder)", path,
                            i, "image")
        else:
            vid = ""
        cap = _caption(rec, fields)
        if not cap:
            names = ", ".join(repr(f) for f in fields)
            raise DataError(f"no caption: expected a non-empty {names} or a 'gpt' turn in "
                            "'conversations'", path, i, fields[0] if fields else "caption")
        yield CaptionRecord(i, img, cap, vid)


def load_captions(path: str | Path, image_root: str | Path, prompt: str = "Describe the image.",
                  *, allow_video: bool = False) -> list[CaptionSample]:
    """Caption records as training samples, image paths resolved under ``image_root``.

    Args:
        allow_video: read ``{"video": frame folder, "caption"}`` records too (their frames
            in natural order); only MAC alignment (``fam train align``) takes them.

    Raises:
        DataError: as :func:`iter_captions`, an image path escaping ``image_root``, or a
            video record where videos are not read.
    """
    from fam.data.video import frame_paths
    path = Path(path)
    out = []
    for r in iter_captions(path):
        if r.video:
            if not allow_video:
                raise DataError("a video caption record: only fam train align reads videos "
                                "here; give an 'image'", path, r.line, "video")
            folder = resolve_under(image_root, r.video, source=path, line=r.line, field="video")
            out.append(CaptionSample(None, prompt, r.caption, str(path), r.line, "video",
                                     tuple(frame_paths(folder, source=str(path), line=r.line,
                                                       field="video"))))
            continue
        out.append(CaptionSample(resolve_under(image_root, r.image, source=path, line=r.line,
                                               field="image"), prompt, r.caption, str(path),
                                 r.line, "image"))
    return out


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


def as_text_samples(captions: Sequence[CaptionSample], qa: Sequence[CaptionSample],
                    caption_of: dict[Path, str]) -> list[CaptionSample]:
    """Text-only samples that say in words what the images show: each caption as plain text,
    and each question about an image preceded by that image's caption (the language
    model's pretraining before it ever reads image tokens, as an LLM's is).

    Raises:
        DataError: a question's image has no caption (names its file and line).
    """
    out = [dataclasses.replace(c, image=None, prompt="") for c in captions]
    for q in qa:
        cap = caption_of.get(q.image)
        if cap is None:
            raise DataError(f"no caption for {q.image}: text-only samples need every "
                            "question's image in the caption file", q.source, q.line, q.field)
        out.append(dataclasses.replace(q, image=None, prompt=f"{cap}\n{q.prompt}"))
    return out


def caption_map(paths: str | Path | Sequence[str | Path],
                fields: Sequence[str] = CAPTION_FIELDS) -> dict[str, str]:
    """``{image (as written): caption}`` over one or more caption files (later files win)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    return {r.image: r.caption for p in paths for r in iter_captions(p, fields) if r.image}


def caption_texts(path: str | Path) -> list[str]:
    """The captions of a file, in order (e.g. a tokenizer's training corpus)."""
    return [r.caption for r in iter_captions(path)]
