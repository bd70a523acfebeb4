"""Input options every backbone takes: prompt format, image pre-resize, pixel limits, truncation.

These decide what the model sees, so they must be the same in training, evaluation, encoding
and export. :func:`fam.backbones.load_backbone` validates them, the adapter keeps them
(``adapter.prompt_format``, ``adapter.image_resolution``, ...), and
:meth:`~fam.backbones.BackboneAdapter.save_pretrained` writes them to ``fam_backbone.json`` in
the saved model, from where the next load (and ``fam export``) reads them back.

- ``prompt_format``: ``"fam"`` (fam's own layout, the default) or ``"vlm2vec"`` (the layout,
  positions, pooling and truncation of VLM2Vec's v1 code; see ``docs/vlm2vec.md``).
- ``image_resolution``: pre-resize every image before the processor, as VLM2Vec does
  (``src/dataset.py`` ``process_image`` in its v1 branch): ``None`` (off), ``"high"``
  (1344×1344), ``"mid"`` (672×672), ``"low"`` (128×128), ``"cap"`` (only images whose longer
  side exceeds 1344 px, squashed to 1344×1344: VLM2Vec's branch for any other value) or an
  explicit size (``336`` or ``"448x336"``, width × height). The named sizes ignore the aspect
  ratio, like VLM2Vec's ``image.resize((1344, 1344))``.
- ``min_pixels`` / ``max_pixels``: the Qwen2-VL processor's pixel budget (applied after the
  pre-resize); ``None`` keeps the checkpoint's ``preprocessor_config.json``.
- ``max_text_tokens``: text tokens kept per item (image tokens are never cut); ``None`` = no
  limit. Cutting is logged, never silent.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from PIL import Image

from fam.errors import ConfigError

log = logging.getLogger(__name__)

#: The prompt formats an adapter can produce.
PROMPT_FORMATS: tuple[str, ...] = ("fam", "vlm2vec")

#: VLM2Vec v1 ``process_image``: named square sizes (FAM's paper tables use 336², an explicit size).
NAMED_RESOLUTIONS: dict[str, int] = {"high": 1344, "mid": 672, "low": 128}
#: ``"cap"``: VLM2Vec's fallback branch squashes images whose longer side exceeds this.
CAP_SIDE = 1344

#: Text-token cap when none is given: fam keeps its historical 128; VLM2Vec does not truncate.
DEFAULT_MAX_TEXT_TOKENS: dict[str, int | None] = {"fam": 128, "vlm2vec": None}

#: The file in a saved model that records these settings.
SETTINGS_FILE = "fam_backbone.json"

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(?:[x×]\s*(\d+))?\s*$")


def check_prompt_format(value: Any) -> str:
    """``value`` if it names a prompt format, else a :class:`ConfigError` listing the choices."""
    if value not in PROMPT_FORMATS:
        raise ConfigError(f"prompt_format must be one of {list(PROMPT_FORMATS)}, got {value!r}")
    return str(value)


def parse_image_resolution(value: Any) -> str | None:
    """Canonical form of an ``image_resolution`` value.

    Returns ``None`` (no pre-resize), ``"high"``, ``"mid"``, ``"low"``, ``"cap"`` or
    ``"<W>x<H>"`` for an explicit size.

    Raises:
        ConfigError: anything else (the message lists the accepted forms).
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    if isinstance(value, str) and value.strip().lower() in (*NAMED_RESOLUTIONS, "cap"):
        return value.strip().lower()
    if isinstance(value, (tuple, list)) and len(value) == 2:
        w, h = value
    elif isinstance(value, int) and not isinstance(value, bool):
        w = h = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        w = int(m.group(1))
        h = int(m.group(2)) if m.group(2) else w
    else:
        w = h = None
    if not (isinstance(w, int) and isinstance(h, int) and not isinstance(w, bool)
            and not isinstance(h, bool) and w > 0 and h > 0):
        raise ConfigError(f"image_resolution must be none, high (1344²), mid (672²), low (128²), "
                          f"cap (squash to 1344² only when larger) or a size such as 336 or "
                          f"448x336 (width x height), got {value!r}")
    return f"{w}x{h}"


def target_size(spec: str | None, size: tuple[int, int]) -> tuple[int, int] | None:
    """The (width, height) an image of ``size`` is pre-resized to, or ``None`` to leave it."""
    if spec is None:
        return None
    if spec in NAMED_RESOLUTIONS:
        side = NAMED_RESOLUTIONS[spec]
        return side, side
    if spec == "cap":
        return (CAP_SIDE, CAP_SIDE) if max(size) > CAP_SIDE else None
    w, h = spec.split("x")
    return int(w), int(h)


def pre_resize(image: Image.Image, spec: str | None) -> Image.Image:
    """Pre-resize ``image`` per ``spec`` (canonical, from :func:`parse_image_resolution`).

    Uses ``Image.resize`` with PIL's default filter and in the image's own mode (RGBA is resized
    before any RGB conversion), exactly as VLM2Vec does before its processor.
    """
    size = target_size(spec, image.size)
    if size is None or size == image.size:
        return image
    return image.resize(size)


def check_max_text_tokens(value: Any) -> int | None:
    """``None`` (no limit; also the strings ``"none"``/``"null"``) or a positive int."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"max_text_tokens must be a positive integer or none (no limit), "
                          f"got {value!r}")
    return value


def check_pixels(min_pixels: Any, max_pixels: Any) -> tuple[int | None, int | None]:
    """Validate the processor's pixel budget (each ``None`` or a positive int, min <= max)."""
    for name, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"{name} must be a positive integer or none, got {v!r}")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise ConfigError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})")
    return min_pixels, max_pixels


@dataclass(frozen=True)
class BackboneSettings:
    """The input settings of a backbone, as recorded in ``fam_backbone.json``.

    ``min_pixels``/``max_pixels`` are the values in effect (also in the saved image
    processor's own config); ``None`` where the family has no such budget.
    """

    prompt_format: str = "fam"
    image_resolution: str | None = None
    max_text_tokens: int | None = 128
    min_pixels: int | None = None
    max_pixels: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, out_dir: str | Path, family: str) -> Path:
        path = Path(out_dir) / SETTINGS_FILE
        data = {"family": family, **self.to_dict()}
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        return path


def read_saved_settings(model_dir: str | Path) -> dict[str, Any]:
    """The settings a saved model records (validated), or ``{}`` when it records none.

    Raises:
        ConfigError: a malformed ``fam_backbone.json`` (names the file and key).
    """
    path = Path(model_dir) / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e.msg}, line {e.lineno}); delete the file to "
                          "use the defaults, or fix it") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object of backbone settings")
    known = {f.name for f in fields(BackboneSettings)}
    out = {k: v for k, v in raw.items() if k in known}
    try:
        if "prompt_format" in out:
            out["prompt_format"] = check_prompt_format(out["prompt_format"])
        if "image_resolution" in out:
            out["image_resolution"] = parse_image_resolution(out["image_resolution"])
        if "max_text_tokens" in out:
            out["max_text_tokens"] = check_max_text_tokens(out["max_text_tokens"])
        check_pixels(out.get("min_pixels"), out.get("max_pixels"))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return out
