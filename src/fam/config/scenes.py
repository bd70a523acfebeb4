"""Configuration of the built-in Scenes benchmark, with the vocabulary it draws from.

The vocabulary lives here because the config's defaults (held-out pairs) and its
validation refer to it; :mod:`fam.data.scenes` re-exports it.
"""
from __future__ import annotations

from dataclasses import dataclass

from fam.config.checks import Validated
from fam.errors import ConfigError

__all__ = ["ScenesConfig", "ScenesMediaConfig", "COLOURS", "SHAPES", "SIZES", "NUMBER_WORDS", "DEFAULT_HELDOUT_PAIRS"]

#: Object colours (name -> RGB). Chosen to stay distinct from each other and from the
#: grey backgrounds after a processor's resize/normalise.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 220, 50),
    "purple": (150, 70, 200),
    "orange": (250, 140, 30),
    "cyan": (40, 210, 220),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
#: Count answers; also the candidate list of the counting data sets (chance 1/8).
NUMBER_WORDS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six", "seven",
                                 "eight")
#: Colour x shape pairs never drawn in a training image. Every colour and every shape
#: still occurs in training (in other pairs), so the novel pool tests compositional
#: generalisation, not unseen words.
DEFAULT_HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "star"), ("green", "triangle"), ("blue", "circle"), ("yellow", "cross"),
    ("purple", "diamond"), ("orange", "square"), ("cyan", "triangle"), ("white", "star"),
)

@dataclass
class ScenesConfig(Validated):
    """Configuration of the Scenes benchmark (pixel sizes assume ``image_size=112``)."""

    seed: int = 0  # master seed; every random stream derives from it
    image_size: int = 112  # px, square; a 4x4 grid of 28-px Qwen2-VL image tokens
    n_train_images: int = 2000  # training scenes (IND distribution)
    n_eval_images: int = 300  # IND eval scenes, disjoint from the training scenes
    n_ood_images: int = 100  # eval scenes in each OOD pool (novel, crowded, striped)
    eval_rows: int = 200  # max eval rows per data set (fewer if its pool has fewer)
    n_candidates: int = 16  # candidates per eval row where the task allows (chance 1/n)
    min_objects: int = 1  # fewest objects in a training / IND scene
    max_objects: int = 4  # most objects in a training / IND scene
    ood_n_objects: int = 5  # objects in each "crowded" OOD scene (> max_objects)
    small_size: int = 18  # px, extent of a small object (under one 28-px token cell)
    large_size: int = 32  # px, extent of a large object
    p_large: float = 0.5  # probability that an object is large (IND pools)
    p_share_attribute: float = 0.35  # P(new object reuses an existing colour), same for shape
    min_gap: int = 3  # px between objects' boxes; objects never overlap
    relation_margin: int = 12  # px of centre offset needed for "left of"/"above" etc.
    p_relation_expression: float = 0.3  # P(referring expression uses a relation unneeded)
    crop_size: int = 48  # px, square grounding crop centred on the object (keeps size)
    max_rows_per_image: int = 2  # cap on rows one image gives a multi-row data set
    heldout_pairs: tuple[tuple[str, str], ...] = DEFAULT_HELDOUT_PAIRS  # never in training
    png_compress_level: int = 1  # zlib level for PNGs; 1 keeps generation fast
    # grey levels of a smooth colour field + grain on plain backgrounds (fam.data.texture);
    # 0 = flat grey. Objects, masks and texts are unchanged by it.
    background_texture: float = 0.0

    def __post_init__(self) -> None:
        self.heldout_pairs = tuple(tuple(p) for p in self.heldout_pairs)  # JSON gives lists
        self.validate()

    def check(self, prefix: str) -> None:
        """The benchmark's rules (sizes, probabilities, held-out pairs)."""
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{prefix}{name}={getattr(self, name)!r}: {why} "
                               f"(ScenesConfig.{name})", key=prefix + name)

        for name in ("n_train_images", "n_eval_images", "n_ood_images", "eval_rows",
                     "max_rows_per_image"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if self.n_candidates < 2:
            raise bad("n_candidates", "must be >= 2 (one positive and a negative)")
        if not 1 <= self.min_objects <= self.max_objects:
            raise bad("min_objects", f"need 1 <= min_objects <= max_objects={self.max_objects}")
        if self.ood_n_objects <= self.max_objects:
            raise bad("ood_n_objects", f"must exceed max_objects={self.max_objects} to be OOD")
        if not 4 <= self.small_size < self.large_size:
            raise bad("small_size", f"need 4 <= small_size < large_size={self.large_size}")
        if self.large_size > self.image_size // 2:
            raise bad("large_size", f"must be <= image_size/2={self.image_size // 2}")
        if not self.large_size <= self.crop_size <= self.image_size:
            raise bad("crop_size", f"must lie in [large_size, image_size]="
                      f"[{self.large_size}, {self.image_size}]")
        if self.relation_margin < 2:
            raise bad("relation_margin", "must be >= 2 px")
        for name in ("p_large", "p_share_attribute", "p_relation_expression"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "must be a probability in [0, 1]")
        if not 0 <= self.png_compress_level <= 9:
            raise bad("png_compress_level", "must be in 0..9")
        if not 0.0 <= self.background_texture <= 128.0:
            raise bad("background_texture", "must be in [0, 128] grey levels (0 = flat)")
        for pair in self.heldout_pairs:
            if len(pair) != 2 or pair[0] not in COLOURS or pair[1] not in SHAPES:
                raise bad("heldout_pairs", f"{pair!r} is not a (colour, shape) pair; colours: "
                          f"{sorted(COLOURS)}, shapes: {list(SHAPES)}")
        if len(set(self.heldout_pairs)) >= len(COLOURS) * len(SHAPES) // 2:
            raise bad("heldout_pairs", "hold out fewer than half of all colour x shape pairs")


@dataclass
class ScenesMediaConfig(Validated):
    """Scenes-Video and Scenes-Docs (:mod:`fam.data.scenes.media`): clips of one moving,
    appearing, disappearing or recolouring object, and rendered document pages."""

    seed: int = 0  # master seed; every stream derives from it
    frame_size: int = 56  # px, square frames
    n_frames: int = 12  # frames per clip (the 8-frame sampler keeps 8)
    n_train_videos: int = 240  # training clips (IND)
    n_eval_videos: int = 56  # eval clips per pool (IND; OOD: striped, with a distractor)
    n_moments: int = 24  # moment-retrieval rows (a 4-event video each)
    page_size: int = 112  # px, square pages
    n_train_docs: int = 60  # training documents (3 pages each)
    n_eval_docs: int = 24  # eval documents per pool (IND; OOD: mirrored layout, dark ink)
    png_compress_level: int = 1

    def __post_init__(self) -> None:
        self.validate()

    def check(self, prefix: str) -> None:
        for name in ("n_train_videos", "n_eval_videos", "n_moments", "n_train_docs",
                     "n_eval_docs"):
            if getattr(self, name) < 2:
                raise ConfigError(f"{prefix}{name}={getattr(self, name)}: must be >= 2 "
                                  f"(ScenesMediaConfig.{name})", key=prefix + name)
        if not 4 <= self.n_frames <= 64:
            raise ConfigError(f"{prefix}n_frames={self.n_frames}: must be in 4..64",
                              key=prefix + "n_frames")
        for name, lo in (("frame_size", 28), ("page_size", 56)):
            if getattr(self, name) < lo:
                raise ConfigError(f"{prefix}{name}={getattr(self, name)}: must be >= {lo}",
                                  key=prefix + name)
        if not 0 <= self.png_compress_level <= 9:
            raise ConfigError(f"{prefix}png_compress_level={self.png_compress_level}: must be "
                              "in 0..9", key=prefix + "png_compress_level")
