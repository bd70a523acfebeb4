"""The input contract: one implementation of what an item may be, for every entry point.

A raw item — a JSONL row (``fam encode``, ``fam index build``), an HTTP input object
(``fam serve``), an :class:`~fam.data.types.MMItem` from a Python call, a training or
evaluation row — is checked here, and its images by :mod:`fam.data.images`. Every refusal is
an :class:`~fam.errors.InputError` whose ``reason`` is the same wherever the item came from;
the CLI prints it with file, line and field (exit 2), the server with the JSON path (4xx).

The rules (docs/reliability.md lists them with their tests):

- **keys**: a row may carry only the keys of its format (:data:`ITEM_KEYS`); an unknown or
  misspelt key is refused with its name and the known keys. The index keeps other keys as
  metadata by design (it says once which), but still refuses a near-miss of a known key
  (``"imgae"``) and keys fam reserves for visual inputs it does not read.
- **text**: a string of valid Unicode (no lone surrogates), at most ``max_text_chars``
  characters; the model reads at most its ``max_text_tokens`` of it, and the adapter cuts the
  text before tokenising it whole.
- **empty**: an item needs a non-empty text or an image.
- **placeholders**: ``<|image_k|>`` marks where the k-th image goes; each k must be an image
  the item has (1 ≤ k ≤ number of images), at most once. Images no placeholder names go first.
- **control tokens**: text can never inject a model's control tokens. In fam's prompt format
  the adapter tokenises user text with its special tokens split (``<|image_pad|>`` typed by a
  user is plain text); in the ``vlm2vec`` format, which tokenises the whole string at once,
  text holding one of the adapter's special tokens is refused (:attr:`InputRules.reserved_tokens`).
- **images**: at most ``max_images`` per item; each one by :mod:`fam.data.images` with the
  backbone's :class:`~fam.data.images.ImageRules`.

Visual inputs are kept as an ordered list (``<|image_1|>`` is the first): a new visual key
(several images, video frames) is one more row in :data:`ITEM_KEYS` whose values extend that list.
"""
from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fam.data.images import DEFAULT_RULES, ImageRef, ImageRules, check_images
from fam.data.types import MMItem
from fam.errors import DataError, InputError
from fam.utils.io import read_jsonl, resolve_under

log = logging.getLogger(__name__)

__all__ = ["ItemKey", "ITEM_KEYS", "InputRules", "ItemRow", "MAX_TEXT_CHARS", "MAX_IMAGES",
           "known_keys", "check_keys", "check_text", "check_item", "check_items", "read_items",
           "PLACEHOLDER_RE"]

#: ``<|image_k|>``: where the k-th image of an item goes (1-based; MMEB's ``<|image_1|>``).
PLACEHOLDER_RE = re.compile(r"<\|image_(\d+)\|>")

#: Longest text accepted (characters). The model reads only its first ``max_text_tokens``
#: tokens; this bounds the memory a single item may take. ``ServeConfig.max_text_chars``
#: defaults to the same number.
MAX_TEXT_CHARS = 4_000_000
#: Most images in one item (``ServeConfig.max_images_per_input`` defaults to the same).
MAX_IMAGES = 8


@dataclass(frozen=True)
class ItemKey:
    """One key of an item row: its name, kind, the formats that have it and what it holds."""

    name: str
    kind: str  # "text" | "visual" | "id"
    formats: tuple[str, ...]  # "items" (JSONL of fam encode / fam index build), "http"
    help: str


#: The one table of item keys. A visual key's values are appended, in order, to the item's
#: list of images (``<|image_1|>``, ``<|image_2|>``, ...).
ITEM_KEYS: dict[str, ItemKey] = {k.name: k for k in (
    ItemKey("text", "text", ("items", "http"),
            "the text; <|image_k|> marks where the k-th image goes"),
    ItemKey("image", "visual", ("items", "http"),
            "an image: a path under the image root (JSONL), a data URI or base64 (HTTP, "
            "also a list)"),
    ItemKey("images", "visual", ("items", "http"),
            "further images (<|image_2|>, ...): a list of paths under the image root (JSONL), "
            "of data URIs or base64 (HTTP)"),
    ItemKey("video", "visual", ("items", "http"),
            "a video: a folder of frames (natural order) or a list of frame paths (JSONL); a "
            "list of frames as data URIs or base64 (HTTP)"),
    ItemKey("id", "id", ("items",), "the item's id (string or integer; default: row number)"),
)}

#: Keys fam reserves for visual inputs it does not read yet: refused even where other keys
#: are kept as metadata, so a video is never silently embedded as its caption alone.
RESERVED_KEYS = ("videos", "frames", "audio", "image_path", "img_path")


def known_keys(fmt: str) -> list[str]:
    """The keys of format ``fmt`` (``"items"`` or ``"http"``), in table order."""
    return [k.name for k in ITEM_KEYS.values() if fmt in k.formats]


@dataclass(frozen=True)
class InputRules:
    """The model-dependent half of the contract, declared by the backbone adapter
    (:attr:`fam.backbones.BackboneAdapter.input_rules`).

    Attributes:
        images: the backbone's image limits (aspect ratio, minimum side, pixels).
        reserved_tokens: strings user text may not contain (the tokenizer's special tokens
            where the prompt format cannot escape them); empty when the adapter escapes them.
        max_text_chars: longest text, in characters.
        max_images: most images per item.
    """

    images: ImageRules = DEFAULT_RULES
    reserved_tokens: tuple[str, ...] = ()
    max_text_chars: int = MAX_TEXT_CHARS
    max_images: int = MAX_IMAGES


DEFAULT_INPUT_RULES = InputRules()


def _near(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name.lower(), list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(row: dict, fmt: str, *, path: str | Path | None = None, line: int | None = None,
               field: str | None = None, metadata: bool = False) -> list[str]:
    """Refuse keys the format does not define; return the extra keys kept as metadata.

    Args:
        row: the raw row or object.
        fmt: ``"items"`` or ``"http"``.
        path, line, field: where the row is (``field`` prefixes the key: ``input[0]``).
        metadata: keep other keys as metadata (the index) instead of refusing them; a key
            close to a known one, or reserved for a visual input, is still refused.

    Raises:
        InputError: the first unknown key, with the known ones.
    """
    known = known_keys(fmt)
    extra = []
    for k in row:
        if k in known:
            continue
        name = f"{field}.{k}" if field else str(k)
        if k in RESERVED_KEYS:
            raise InputError(f"unknown key {k!r}: fam does not read {k!r} inputs; an item has "
                             f"{', '.join(map(repr, known))}", path, line, name)
        near = _near(str(k), known)
        if not metadata or near:
            raise InputError(f"unknown key {k!r}{near}; an item has "
                             f"{', '.join(map(repr, known))}", path, line, name)
        extra.append(k)
    return extra


def check_text(value: Any, rules: InputRules = DEFAULT_INPUT_RULES, *,
               path: str | Path | None = None, line: int | None = None,
               field: str | None = "text") -> str:
    """A text value: a string of valid Unicode within the length limit.

    Raises:
        InputError: not a string, a lone surrogate, or longer than ``rules.max_text_chars``.
    """
    if not isinstance(value, str):
        kind = {dict: "an object", list: "an array", bool: "a boolean", int: "a number",
                float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
        raise InputError(f"expected a string, got {kind}", path, line, field)
    if len(value) > rules.max_text_chars:
        raise InputError(f"text of {len(value)} characters is longer than the limit of "
                         f"{rules.max_text_chars}", path, line, field, status=413)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"text is not valid Unicode (a lone surrogate "
                         f"{value[e.start]!r} at character {e.start})", path, line,
                         field) from None
    return value


def check_item(text: str, n_images: int, rules: InputRules = DEFAULT_INPUT_RULES, *,
               path: str | Path | None = None, line: int | None = None,
               text_field: str | None = "text", item_field: str | None = None,
               has_video: bool = False) -> None:
    """The rules between a (checked) text and its images: non-empty, placeholders, tokens.

    ``has_video``: the item also carries a video (then an empty text is fine).

    Raises:
        InputError: an empty item, a placeholder naming no image of the item (or twice),
            too many images, or a reserved control token in the text.
    """
    if not text and n_images == 0 and not has_video:
        raise InputError("empty item: give a non-empty 'text' and/or an 'image'", path, line,
                         item_field)
    if n_images > rules.max_images:
        raise InputError(f"{n_images} images; at most {rules.max_images} per item", path, line,
                         item_field, status=413)
    seen: set[int] = set()
    for m in PLACEHOLDER_RE.finditer(text):
        k = int(m.group(1))
        if not 1 <= k <= n_images:
            has = "no image" if n_images == 0 else \
                f"{n_images} image{'s' if n_images > 1 else ''}"
            raise InputError(f"the text names {m.group(0)} but the item has {has}; give the "
                             "image or remove the placeholder", path, line, text_field)
        if k in seen:
            raise InputError(f"the text names {m.group(0)} twice; each image goes in one "
                             "place", path, line, text_field)
        seen.add(k)
    for tok in rules.reserved_tokens:
        if tok in text:
            raise InputError(f"the text contains {tok!r}, a control token of this model; text "
                             "may not inject control tokens (remove it)", path, line,
                             text_field)


def check_mm_item(it: MMItem, rules: InputRules = DEFAULT_INPUT_RULES, *,
                  n_images: int | None = None, item_field: str | None = None,
                  text_name: str | None = None, has_video: bool = False) -> None:
    """:func:`check_item` for an :class:`MMItem`: every image (``image`` then ``images``, or
    ``n_images`` given in memory) and its video (its frames, or ``has_video``: frames given in
    memory); errors name the item's source."""
    if it.images and it.video:
        raise InputError(both_visuals_reason(), it.source, it.line,
                         "video" if it.source else item_field)
    check_item(it.text, len(it.all_images) if n_images is None else n_images, rules,
               path=it.source, line=it.line, item_field=item_field,
               text_field=text_name or text_field(it.field),
               has_video=bool(it.video) or has_video)


def check_items(items: Sequence[MMItem], rules: InputRules = DEFAULT_INPUT_RULES,
                image_check: str = "verify", progress: bool = False,
                desc: str = "check items") -> int:
    """The model-dependent checks of items read from files, before any work starts.

    Texts against ``rules`` (:func:`check_item`) and every distinct image's header against
    the backbone's limits (:func:`fam.data.images.check_images`, mode ``image_check``).

    Returns:
        The number of distinct images checked.
    """
    for it in items:
        check_mm_item(it, rules)
    return check_images((ImageRef(p, it.source, it.line, it.field) for it in items
                         for p in it.all_images + list(it.video)), image_check, progress, desc,
                        rules.images)


def text_field(field: str | None) -> str:
    """The text field beside an item's image field (MMEB rows, items JSONL)."""
    known = {"qry_image_path": "qry", "pos_image_path": "pos_text",
             "neg_image_path": "neg_text", "qry_img_path": "qry_text", "image": "text",
             "images": "text", "video": "text"}
    if field is None:
        return "text"
    if field.startswith("tgt_img_path"):
        return "tgt_text" + field[len("tgt_img_path"):]
    return known.get(field, field)


#: The keys of several images and of a video, per side of a row (the only place rows name them).
VISUAL_KEYS: dict[str, tuple[str | None, str]] = {
    "query": (None, "qry_video"), "pos": (None, "pos_video"), "neg": (None, "neg_video"),
    "item": ("images", "video")}


def visual_inputs(row: dict, side: str, root: Path, source: Path, line: int
             ) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """``(images, video frames)`` of one side of a row: ``images`` a list of paths, ``video``
    a frame folder or a list of frame paths, all relative to ``root``."""
    from fam.data.video import frame_paths
    ikey, vkey = VISUAL_KEYS[side]

    def paths(key: str) -> list[Path]:
        value = row[key]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise DataError("expected a list of relative paths", source, line, key)
        return [resolve_under(root, v, source=source, line=line, field=key) for v in value]

    images = tuple(paths(ikey)) if ikey and row.get(ikey) is not None else ()
    video: tuple[Path, ...] = ()
    value = row.get(vkey)
    if isinstance(value, str) and value:
        folder = resolve_under(root, value, source=source, line=line, field=vkey)
        video = tuple(frame_paths(folder, source=str(source), line=line, field=vkey))
    elif value:
        video = tuple(paths(vkey))
    if images and video:
        raise InputError(both_visuals_reason(ikey or "images", vkey), source, line, vkey)
    return images, video


def both_visuals_reason(ikey: str = "images", vkey: str = "video") -> str:
    """Why an item with several images and a video is refused (files and HTTP alike)."""
    return f"an item takes several images or a video, not both ('{ikey}', '{vkey}')"


@dataclass
class ItemRow:
    """One row of an items JSONL, checked.

    Attributes:
        id: the row's ``id`` (string; default the 0-based row number).
        text: its text, as given.
        image: its image path as written (relative to the image root), or None.
        item: the :class:`MMItem` to embed (image resolved; ``prompt`` applied).
        metadata: the row's other keys (only where the format keeps them: the index).
        line: the 1-based line.
        images: its ``images`` paths as written (relative to the image root).
        video: its ``video`` as written: a frame folder or a list of frame paths, or None.
    """

    id: str
    text: str
    image: str | None
    item: MMItem
    metadata: dict[str, Any] = field(default_factory=dict)
    line: int = 0
    images: list[str] = field(default_factory=list)
    video: str | list[str] | None = None


def apply_prompt(prompt: str, text: str) -> str:
    """``prompt`` with ``{text}`` replaced by ``text``, or ``prompt + text`` if it has none.

    So a plain instruction works as a prefix (sentence-transformers' convention) and a
    template can put the text anywhere; the empty prompt leaves the text as it is.
    """
    return prompt.replace("{text}", text) if "{text}" in prompt else prompt + text


def read_items(path: str | Path, image_root: str | Path | None = None, *,
               metadata: bool = True, prompt: str = "",
               rules: InputRules = DEFAULT_INPUT_RULES) -> list[ItemRow]:
    """Read and check an items JSONL (``fam encode``, ``fam index build``): every row first.

    One JSON object per line with the keys of :data:`ITEM_KEYS` (``text``, ``image``, ``id``).
    The format carries metadata by design (the index returns it with search results): other
    keys are not embedded, and the reader says once which; a key close to a known one
    (``imgae``, ``txt``) or a visual key fam does not read (``video``) is refused.

    Args:
        path: the JSONL file (UTF-8).
        image_root: folder the ``image`` paths are relative to (default: the file's folder);
            an absolute path is accepted when it lies under the root (``--image-root /``).
        metadata: keep other keys as metadata (``False``: refuse them).
        prompt: applied to each text by :func:`apply_prompt` (the index's document prompt).
        rules: the model's rules, when known (the model-free ones are checked here;
            :func:`check_items` checks the rest once the model is loaded).

    Raises:
        InputError / DataError: naming the file, line and field of the first bad row.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    out: list[ItemRow] = []
    seen: dict[str, int] = {}
    kept: set[str] = set()
    for line, row in read_jsonl(path):
        extra = check_keys(row, "items", path=path, line=line, metadata=metadata)
        kept.update(extra)
        text = check_text(row.get("text", ""), rules, path=path, line=line) \
            if row.get("text") is not None else ""
        img = row.get("image")
        if img is not None and not isinstance(img, str):
            raise InputError(f"expected an image path (a string), got {type(img).__name__}",
                             path, line, "image")
        img = img or None
        images, video = visual_inputs(row, "item", root, path, line)
        check_item(text or ("video" if video else ""), int(img is not None) + len(images),
                   rules, path=path, line=line, item_field="text")
        rid = row.get("id", len(out))
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise InputError(f"expected a string or integer id, got {type(rid).__name__}",
                             path, line, "id")
        rid = str(rid)
        if rid in seen:
            raise InputError(f"duplicate id {rid!r} (first on line {seen[rid]}); ids must be "
                             "unique", path, line, "id")
        seen[rid] = line
        resolved = resolve_under(root, img, source=path, line=line, field="image") \
            if img else None
        item = MMItem(apply_prompt(prompt, text), resolved, images=images, video=video,
                      source=str(path), line=line,
                      field="image" if img else "images" if images else
                      "video" if video else "text")
        out.append(ItemRow(rid, text, img, item, {k: row[k] for k in extra}, line,
                           list(row["images"]) if images else [],
                           row["video"] if video else None))
    if not out:
        raise InputError("no items: expected one JSON object {\"text\", \"image\"} per line",
                         path)
    if kept:
        log.warning("%s: key(s) %s are not embedded (an item is embedded from 'text' and "
                    "'image'); they are kept as metadata", path, ", ".join(map(repr, sorted(kept))))
    return out
