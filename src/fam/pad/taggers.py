"""Taggers (stage 1 of PAD) and the ground-truth provider that replays an existing PAD file.

RAM is not in transformers, so the taggers read tags from captions
(:class:`CaptionNounTagger`) or take a fixed list (:class:`ListTagger`).
:class:`GroundTruthProvider` plays all three roles from an existing PAD file (the Scenes
benchmark's ``pad.jsonl``), which makes the pipeline testable end to end without models.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from fam.data.captions import caption_map
from fam.errors import DataError
from fam.pad.protocols import Detection, ImageMeta
from fam.pad.records import PadRecord, read_pad, region_mask

__all__ = ["ListTagger", "CaptionNounTagger", "extract_noun_phrases", "STOP_WORDS",
           "GroundTruthProvider"]


class ListTagger:
    """Gives every image the same fixed tag list (a closed vocabulary)."""

    def __init__(self, tags: Iterable[str]):
        self._tags = _dedup(t.strip().lower() for t in tags if t.strip())
        if not self._tags:
            raise ValueError("ListTagger needs at least one non-empty tag")

    def tags(self, image: Image.Image, meta: ImageMeta) -> list[str]:
        return list(self._tags)


#: Words that never start, end or sit inside a tag: articles, pronouns, prepositions,
#: relation words, auxiliaries and caption filler ("a picture of", "in the image").
STOP_WORDS: frozenset[str] = frozenset("""
a an the this that these those there here it its it's they them their he she his her him
we our you your i me my is are was were be been being am has have had do does did
of in on at to from by with without into onto over under above below beside besides near
next behind before after between among around across along through against toward
towards up down out off left right top bottom front back middle center centre side
and or but nor so as than then while also very too just only some any each every all
both either neither other another such what which who whom whose where when why how
can could will would shall should may might must not no yes
picture pictures image images photo photos photograph view shot scene close closeup
showing shows shown show depicting depicts there's is's
one two three four five six seven eight nine ten several many few lots lot
""".split())


_WORD = re.compile(r"[a-z][a-z\-']*")


def extract_noun_phrases(caption: str, *, stop_words: frozenset[str] = STOP_WORDS,
                         max_words: int = 3) -> list[str]:
    """Cheap noun-phrase chunks of a caption (no POS tagger offline).

    Splits the lower-cased caption at punctuation and stop words; each maximal run of
    remaining words is a chunk ("small red circle"). English puts the head noun last,
    so a chunk longer than ``max_words`` keeps its last ``max_words`` words.

    Args:
        caption: free text.
        stop_words: words that break chunks.
        max_words: longest tag in words.

    Returns:
        Chunks in caption order, deduplicated.
    """
    chunks: list[str] = []
    for clause in re.split(r"[.,;:!?()\"\[\]]", caption.lower()):
        run: list[str] = []
        for w in _WORD.findall(clause) + [None]:  # None flushes the last run
            if w is None or w in stop_words:
                if run:
                    chunks.append(" ".join(run[-max_words:]))
                run = []
            else:
                run.append(w)
    return _dedup(chunks)


class CaptionNounTagger:
    """Tags from an image's caption (stands in for RAM, which transformers lacks).

    Without a vocabulary the tags are the caption's noun-phrase chunks
    (:func:`extract_noun_phrases`). With one, they are the vocabulary phrases that occur
    in the caption as whole words, longest first and non-overlapping (so "red circle"
    wins over "circle"); this is the closed-set mode RAM's tag list provides.

    Args:
        captions: ``{image: caption}`` or caption file(s) (:func:`fam.data.captions.caption_map`).
        vocabulary: optional allowed tags (phrases).
        fields: caption fields to read, in order of preference.
        max_words: longest tag in words (no-vocabulary mode).
        max_tags: keep at most this many tags per image (``None``: all).
    """

    def __init__(self, captions: dict[str, str] | str | Path | Sequence[str | Path], *,
                 vocabulary: Iterable[str] | None = None,
                 fields: Sequence[str] = ("caption", "blip_caption"), max_words: int = 3,
                 max_tags: int | None = None):
        self.captions = captions if isinstance(captions, dict) else caption_map(
            captions, fields)
        self.vocabulary = (sorted(_dedup(v.strip().lower() for v in vocabulary if v.strip()),
                                  key=lambda v: (-len(v.split()), v))
                           if vocabulary is not None else None)
        self.max_words = max_words
        self.max_tags = max_tags

    def tags_for_caption(self, caption: str) -> list[str]:
        """Tags of one caption (see the class docstring)."""
        if self.vocabulary is None:
            tags = extract_noun_phrases(caption, max_words=self.max_words)
        else:
            words = _WORD.findall(caption.lower())
            used = [False] * len(words)
            found: list[tuple[int, str]] = []
            for phrase in self.vocabulary:  # longest first
                pw = phrase.split()
                n = len(pw)
                for s in range(len(words) - n + 1):
                    if words[s:s + n] == pw and not any(used[s:s + n]):
                        used[s:s + n] = [True] * n
                        found.append((s, phrase))
            tags = _dedup(p for _, p in sorted(found))  # caption order
        return tags[: self.max_tags] if self.max_tags is not None else tags

    def tags(self, image: Image.Image, meta: ImageMeta) -> list[str]:
        cap = self.captions.get(meta.image)
        if cap is None:
            raise DataError(f"no caption for image {meta.image!r}; add it to the captions "
                            "file or use a list tagger", meta.path, field="caption")
        return self.tags_for_caption(cap)


def _dedup(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


class GroundTruthProvider:
    """Tagger, detector and segmenter that replay an existing PAD file (e.g. Scenes').

    ``tags`` returns the record's tags, ``detect`` its regions whose label is asked for
    (score and box as stored), ``segment`` the stored mask of each box. Running the
    pipeline with it reproduces the ground truth, up to the pipeline's own filters.

    Args:
        pad_path: the ground-truth ``pad.jsonl``.
        image_root: root of its image paths (default: the file's folder).
    """

    def __init__(self, pad_path: str | Path, image_root: str | Path | None = None):
        self.pad_path = Path(pad_path)
        self.records: dict[str, PadRecord] = {
            r.image: r for r in read_pad(self.pad_path, image_root)}

    def _record(self, meta: ImageMeta | None) -> PadRecord:
        if meta is None:
            raise ValueError("GroundTruthProvider needs meta= to know which image it sees")
        rec = self.records.get(meta.image)
        if rec is None:
            raise DataError(f"image {meta.image!r} has no ground-truth record",
                            self.pad_path, field="image")
        return rec

    def tags(self, image: Image.Image, meta: ImageMeta) -> list[str]:
        rec = self._record(meta)
        return list(rec.tags) or _dedup(r.label for r in rec.regions)

    def detect(self, image: Image.Image, labels: Sequence[str], *,
               meta: ImageMeta | None = None) -> list[Detection]:
        wanted = set(labels)
        dets = [Detection(r.label, float(r.score), tuple(r.box))
                for r in self._record(meta).regions if r.label in wanted]
        return sorted(dets, key=lambda d: -d.score)  # stable: ties keep file order

    def segment(self, image: Image.Image, boxes: Sequence[Sequence[float]], *,
                meta: ImageMeta | None = None) -> list[np.ndarray]:
        regions = list(self._record(meta).regions)
        used = [False] * len(regions)
        out = []
        for box in boxes:
            # Boxes come from detect(), so an exact match exists; take each region once
            # so that two objects with the same box keep their own masks.
            k = next((i for i, r in enumerate(regions)
                      if not used[i] and list(r.box) == list(box)), None)
            if k is None:
                raise ValueError(f"box {list(box)} is not a ground-truth box of "
                                 f"{self._record(meta).image}")
            used[k] = True
            out.append(region_mask(regions[k]))
        return out
