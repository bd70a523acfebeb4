"""Request inputs → items to embed, with limits and messages that name the offending field.

Accepted forms (``POST /v1/embeddings``):

- ``"input": "text"`` or ``["text", ...]`` (OpenAI);
- ``"input": {"text": "...", "image": IMAGE}`` or a list mixing strings and such objects
  (``text`` may contain ``<|image_1|>`` to say where the image goes; ``image`` may also be a
  list of images for ``<|image_1|>``, ``<|image_2|>``, ...; ``images``: a list of further
  images, as the items JSONL's ``images``; ``video``: a video as a list of frames ``[IMAGE,
  ...]`` in order, placed at ``<|video_1|>`` or first, 8 frames sampled as ``fam encode``
  samples a frame folder);
- ``"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url":
  IMAGE}}, {"type": "text", "text": "..."}]}]`` (vLLM's chat-style form: one embedding for
  the whole conversation, images placed where their parts are).

``IMAGE`` is a data URI (``data:image/png;base64,...``) or bare base64; ``http(s)://`` URLs only
when the server was started with ``--allow-image-urls``. The encoded size is this transport's
limit, as are the frame count of a video (``max_video_frames``) and the total pixels of a
request's images and frames (``max_request_pixels``, from the headers, before decoding);
every frame is checked as ``fam encode`` checks frame files, only the sampled ones decoded.
Everything else is the input contract shared with ``fam encode``
(:mod:`fam.data.items`, :mod:`fam.data.images`): keys, text, placeholders, control tokens,
image format, pixel count (a decompression bomb is refused from its header), the backbone's
limits, EXIF orientation, modes and transparency. Its refusals keep their reason and get the
JSON path of the offending field (HTTP 400, or 413 for a size limit).
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from PIL import Image

from fam.config import ServeConfig
from fam.data import images as contract_images
from fam.data import items as contract
from fam.data.items import InputRules
from fam.data.types import MMItem, Visuals
from fam.data.video import check_frame_sizes, sample_indices
from fam.errors import InputError
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?)(?P<b64>;base64)?,",
                       re.IGNORECASE)


class RequestError(Exception):
    """A client error: HTTP ``status`` and a one-line message (the server answers 4xx)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_


@contextlib.contextmanager
def contract_errors(where: str | None = None) -> Iterator[None]:
    """Turn the contract's :class:`InputError` into a 4xx with the same reason and the JSON path."""
    try:
        yield
    except InputError as e:
        param = e.field or where
        raise RequestError(e.status, f"{param}: {e.reason}" if param else e.reason,
                           param) from None


def serve_rules(rules: InputRules, cfg: ServeConfig) -> InputRules:
    """The model's rules with the server's limits (which default to the contract's)."""
    return dataclasses.replace(
        rules, max_text_chars=cfg.max_text_chars, max_images=cfg.max_images_per_input,
        images=dataclasses.replace(rules.images, max_pixels=cfg.max_image_pixels))


@dataclass
class ParsedInput:
    """One input to embed: text (with ``<|image_k|>`` placeholders), encoded images and an
    optional video's encoded frames.

    ``images`` and ``video`` hold image *sources* (bytes or a URL still to fetch) until
    :func:`load_images`; ``image_where`` names each image's JSON path (default:
    ``<where>.image[j]``).
    """

    text: str
    images: list[Any] = field(default_factory=list)
    where: str = "input"
    video: list[Any] = field(default_factory=list)
    image_where: list[str] | None = None

    def item(self) -> MMItem:
        return MMItem(self.text)

    def image_path(self, j: int) -> str:
        if self.image_where is not None:
            return self.image_where[j]
        return f"{self.where}.image" + (f"[{j}]" if len(self.images) > 1 else "")


# ---------------------------------------------------------------------- images
def _decode_base64(s: str, where: str, cfg: ServeConfig) -> bytes:
    # A cheap bound before decoding: base64 carries 3 bytes per 4 characters.
    if len(s) * 3 // 4 > cfg.max_image_bytes + 3:
        raise RequestError(413, f"{where}: image is larger than the limit of "
                                f"{cfg.max_image_bytes} bytes", where)
    try:
        data = base64.b64decode(re.sub(r"\s+", "", s), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{where}: invalid base64 image data", where) from None
    if len(data) > cfg.max_image_bytes:
        raise RequestError(413, f"{where}: image of {len(data)} bytes is larger than the limit "
                                f"of {cfg.max_image_bytes} bytes", where)
    return data


def image_source(value: Any, where: str, cfg: ServeConfig) -> bytes | str:
    """Bytes of an image given as a data URI / base64, or the URL to fetch (if allowed)."""
    if not isinstance(value, str) or not value:
        got = "an empty string" if value == "" else _type_name(value)
        raise RequestError(400, f"{where}: expected an image as a data URI or base64 string, "
                                f"got {got}", where)
    if value[:8].lower().startswith(("http://", "https://")):
        if not cfg.allow_image_urls:
            raise RequestError(400, f"{where}: image URLs are not fetched by this server (start "
                                    "it with --allow-image-urls); send the image as a data URI "
                                    "(data:image/png;base64,...)", where)
        return value
    if value[:5].lower() == "data:":
        m = _DATA_URI.match(value)
        if m is None or not m.group("b64"):
            raise RequestError(400, f"{where}: only base64 data URIs are accepted "
                                    "(data:image/png;base64,...)", where)
        return _decode_base64(value[m.end():], where, cfg)
    if re.match(r"^[a-z][a-z0-9+.-]*://", value[:16], re.IGNORECASE):
        raise RequestError(400, f"{where}: URL scheme not accepted; send the image as a data "
                                "URI (data:image/png;base64,...)", where)
    return _decode_base64(value, where, cfg)


def open_image(data: bytes, where: str, cfg: ServeConfig,
               rules: InputRules | None = None) -> Image.Image:
    """Decode image bytes through the input contract (:func:`fam.data.images.open_image`).

    Returns the image upright in a normalised mode; the adapter converts it to RGB
    (transparency onto white) exactly as for a file.

    Raises:
        RequestError: 413 for too many pixels (decompression bombs), 400 for anything else
            the contract refuses, with its reason.
    """
    rules = serve_rules(rules or InputRules(), cfg)
    with contract_errors(where):
        return contract_images.open_image(data, rules.images)


async def fetch_image(url: str, where: str, cfg: ServeConfig) -> bytes:
    """Download an image URL with the size and time limits (only with --allow-image-urls)."""
    import httpx
    try:
        async with httpx.AsyncClient(timeout=cfg.url_timeout_s, follow_redirects=False) as c:
            async with c.stream("GET", url) as r:
                if r.status_code != 200:
                    raise RequestError(400, f"{where}: fetching the image URL gave HTTP "
                                            f"{r.status_code}", where)
                buf = bytearray()
                async for chunk in r.aiter_bytes():
                    buf += chunk
                    if len(buf) > cfg.max_image_bytes:
                        raise RequestError(413, f"{where}: image at the URL is larger than the "
                                                f"limit of {cfg.max_image_bytes} bytes", where)
                return bytes(buf)
    except httpx.HTTPError as e:
        raise RequestError(400, f"{where}: could not fetch the image URL "
                                f"({type(e).__name__})", where) from None


async def load_images(inputs: list[ParsedInput], cfg: ServeConfig,
                      rules: InputRules | None = None) -> list[list[Image.Image] | Visuals]:
    """Fetch (if allowed), check and decode every input's images and video frames, off the
    event loop: per input its images, or a :class:`Visuals` when it has a video.

    Every image and frame is checked from its header first (format, size, the backbone's
    limits, structure) and counted against ``max_request_pixels``; the images and the
    frames the model samples (:func:`fam.data.video.sample`) are then decoded.
    """
    from starlette.concurrency import run_in_threadpool

    total = 0

    async def verified(src: Any, where: str) -> bytes:
        nonlocal total
        if isinstance(src, str):
            src = await fetch_image(src, where, cfg)
        w, h = await run_in_threadpool(verify_image, src, where, cfg, rules)
        total += w * h
        if total > cfg.max_request_pixels:
            raise RequestError(413, f"{where}: the request's images and video frames have more "
                                    f"than {cfg.max_request_pixels} pixels in all; send fewer "
                                    "or smaller ones", where)
        return src

    out: list[list[Image.Image] | Visuals] = []
    for inp in inputs:
        ims = []
        for j, src in enumerate(inp.images):
            where = inp.image_path(j)
            ims.append(await run_in_threadpool(open_image, await verified(src, where), where,
                                               cfg, rules))
        if not inp.video:
            out.append(ims)
            continue
        data = [await verified(src, f"{inp.where}.video[{j}]")
                for j, src in enumerate(inp.video)]
        chosen = sample_indices(len(data))
        frames = [await run_in_threadpool(open_image, data[j], f"{inp.where}.video[{j}]", cfg,
                                          rules) for j in chosen]
        with contract_errors(f"{inp.where}.video"):
            check_frame_sizes([f.size for f in frames])
        out.append(Visuals(ims, frames))
    return out


def verify_image(data: bytes, where: str, cfg: ServeConfig,
                 rules: InputRules | None = None) -> tuple[int, int]:
    """Check image bytes from the header and structure without decoding
    (:func:`fam.data.images.verify_image`); returns the displayed ``(width, height)``."""
    rules = serve_rules(rules or InputRules(), cfg)
    with contract_errors(where):
        return contract_images.verify_image(data, rules.images)


# ---------------------------------------------------------------------- inputs
def _type_name(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _text(value: Any, where: str, cfg: ServeConfig, rules: InputRules | None = None) -> str:
    with contract_errors(where):
        return contract.check_text(value, serve_rules(rules or InputRules(), cfg), field=where)


def _checked(inp: ParsedInput, cfg: ServeConfig, rules: InputRules | None,
             text_field: str) -> ParsedInput:
    """The contract's rules between an input's text and its images (and video)."""
    with contract_errors(inp.where):
        contract.check_item(inp.text, len(inp.images), serve_rules(rules or InputRules(), cfg),
                            text_field=text_field, item_field=inp.where,
                            has_video=bool(inp.video))
    return inp


def _image_list(value: Any, where: str) -> list[Any]:
    """An ``images`` / ``video`` value: a list (of encoded images, checked one by one later)."""
    if not isinstance(value, list):
        raise RequestError(400, f"{where}: expected a list of images (data URIs or base64), "
                                f"got {_type_name(value)}", where)
    return value


def _object_input(obj: dict, where: str, cfg: ServeConfig,
                  rules: InputRules | None = None) -> ParsedInput:
    with contract_errors(where):
        contract.check_keys(obj, "http", field=where)
    text = _text(obj.get("text", ""), f"{where}.text", cfg, rules) \
        if obj.get("text") is not None else ""
    raw = obj.get("image")
    raws = raw if isinstance(raw, list) else ([] if raw is None else [raw])
    wheres = [f"{where}.image" + (f"[{j}]" if isinstance(raw, list) else "")
              for j in range(len(raws))]
    more = _image_list(obj["images"], f"{where}.images") if obj.get("images") is not None \
        else []
    wheres += [f"{where}.images[{j}]" for j in range(len(more))]
    raws = raws + more
    frames = _image_list(obj["video"], f"{where}.video") if obj.get("video") is not None \
        else []
    if more and frames:
        raise RequestError(400, f"{where}.video: {contract.both_visuals_reason()}",
                           f"{where}.video")
    key = "images" if more else "image"
    if len(raws) > cfg.max_images_per_input:
        raise RequestError(413, f"{where}.{key}: {len(raws)} images; at most "
                                f"{cfg.max_images_per_input} per item", f"{where}.{key}")
    if len(frames) > cfg.max_video_frames:
        raise RequestError(413, f"{where}.video: {len(frames)} frames; at most "
                                f"{cfg.max_video_frames} per video", f"{where}.video")
    images = [image_source(v, w, cfg) for v, w in zip(raws, wheres)]
    video = [image_source(v, f"{where}.video[{j}]", cfg) for j, v in enumerate(frames)]
    return _checked(ParsedInput(text, images, where, video, wheres), cfg, rules,
                    f"{where}.text")


def parse_input(value: Any, cfg: ServeConfig, where: str = "input",
                rules: InputRules | None = None) -> list[ParsedInput]:
    """The ``input`` field: a string, an input object, or a non-empty list of those.

    ``rules``: the model's (:attr:`fam.backbones.BackboneAdapter.input_rules`); the server's
    limits apply on top.
    """
    def one_text(v: Any, w: str) -> ParsedInput:
        return _checked(ParsedInput(_text(v, w, cfg, rules), [], w), cfg, rules, w)

    if isinstance(value, str):
        return [one_text(value, where)]
    if isinstance(value, dict):
        return [_object_input(value, where, cfg, rules)]
    if isinstance(value, list):
        if not value:
            raise RequestError(400, f"{where}: empty list; give at least one input", where)
        if len(value) > cfg.max_inputs:
            raise RequestError(413, f"{where}: {len(value)} inputs; at most {cfg.max_inputs} "
                                    "per request", where)
        out = []
        for i, v in enumerate(value):
            w = f"{where}[{i}]"
            if isinstance(v, str):
                out.append(one_text(v, w))
            elif isinstance(v, dict):
                out.append(_object_input(v, w, cfg, rules))
            elif isinstance(v, (int, list)) and not isinstance(v, bool):
                raise RequestError(400, f"{w}: token-id inputs are not supported; send text",
                                   w)
            else:
                raise RequestError(400, f"{w}: expected a string or an object with 'text' "
                                        f"and/or 'image', got {_type_name(v)}", w)
        return out
    raise RequestError(400, f"{where}: expected a string, an object with 'text'/'image', or a "
                            f"list of those, got {_type_name(value)}", where)


def parse_messages(value: Any, cfg: ServeConfig, rules: InputRules | None = None
                   ) -> ParsedInput:
    """vLLM's chat-style ``messages``: one input, images where their ``image_url`` parts are."""
    where = "messages"
    if not isinstance(value, list) or not value:
        raise RequestError(400, f"{where}: expected a non-empty array of messages", where)
    texts: list[str] = []
    images: list[Any] = []
    for i, msg in enumerate(value):
        w = f"{where}[{i}]"
        if not isinstance(msg, dict):
            raise RequestError(400, f"{w}: expected an object with 'role' and 'content', got "
                                    f"{_type_name(msg)}", w)
        if msg.get("role") not in ("user", "system"):
            raise RequestError(400, f"{w}.role: expected 'user' or 'system', got "
                                    f"{msg.get('role')!r}", f"{w}.role")
        content = msg.get("content")
        if isinstance(content, str):
            texts.append(_text(content, f"{w}.content", cfg, rules))
            continue
        if not isinstance(content, list):
            raise RequestError(400, f"{w}.content: expected a string or an array of parts, got "
                                    f"{_type_name(content)}", f"{w}.content")
        for j, part in enumerate(content):
            pw = f"{w}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(_text(part.get("text"), f"{pw}.text", cfg, rules))
            elif kind == "image_url":
                iu = part.get("image_url")
                url = iu.get("url") if isinstance(iu, dict) else iu
                if len(images) >= cfg.max_images_per_input:
                    raise RequestError(413, f"{pw}: more than {cfg.max_images_per_input} "
                                            "images in one input", pw)
                images.append(image_source(url, f"{pw}.image_url.url", cfg))
                texts.append(f"<|image_{len(images)}|>")
            else:
                raise RequestError(400, f"{pw}: expected a part of type 'text' or 'image_url', "
                                        f"got {kind!r}", pw)
    # Parts joined by newlines: an image then an instruction gives fam's own layout
    # ("<|image_1|>\nRepresent the given image.").
    text = _text("\n".join(texts), where, cfg, rules)
    return _checked(ParsedInput(text, images, where), cfg, rules, where)

