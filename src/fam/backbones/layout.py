"""How one item becomes a token sequence, in each prompt format (see ``fam.backbones.base``).

:class:`PromptLayout` is the part of :class:`~fam.backbones.base.BackboneAdapter` that turns an
:class:`~fam.data.types.MMItem` and its images' token counts into token ids with image and
text-content masks:

- ``"fam"``: ``[bos] text <image block> text ... <eos>``, each text segment tokenised on its
  own, the family's image block (hooks ``bos_ids``, ``image_block_at``) placed in between;
- ``"vlm2vec"``: VLM2Vec's layout (docs/vlm2vec.md): each ``<|image_k|>`` expanded to the
  family's bare image token, the whole string tokenised once, nothing appended.

Both honour ``max_text_tokens`` (image tokens are never cut) and log every cut.
"""
from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from fam.data.types import MMItem
from fam.errors import DataError

log = logging.getLogger("fam.backbones.base")  # one logger for the adapter's messages

#: ``<|image_k|>``: MMEB's placeholder generalised to the k-th image of an item (1-based).
_PLACEHOLDER_RE = re.compile(r"<\|image_(\d+)\|>")
#: Tokens tokenised past a text cut before the first ``max_text_tokens`` count as final.
_CUT_MARGIN = 16


def _placeholder(k: int) -> str:
    return f"<|image_{k}|>"


@dataclass
class _Seq:
    ids: list[int]
    image: list[bool]
    text: list[bool]
    n_image_tokens: int = 0
    extra: dict[str, list[int]] = field(default_factory=dict)


class PromptLayout:
    """Sequence building shared by every adapter (a mixin of ``BackboneAdapter``).

    Relies on the adapter's ``tokenizer``, ``prompt_format``, ``max_text_tokens``,
    ``image_token_id``, ``eos_token_id``, ``_special_ids``, ``truncated_items`` and its family
    hooks ``bos_ids()`` / ``image_block_at()`` / ``video_block()`` / ``vlm2vec_image_token``
    (and, with a native video, ``video_token_id`` / ``vlm2vec_video_token``).
    """

    tokenizer: Any
    prompt_format: str
    max_text_tokens: int | None
    image_token_id: int
    eos_token_id: int
    truncated_items: int
    _special_ids: set[int]
    vlm2vec_image_token: ClassVar[str | None] = None
    vlm2vec_video_token: ClassVar[str | None] = None
    video_token_id: int

    def _tokenize_segment(self, text: str, offset: int, content: tuple[int, int] | None,
                          budget: int | None = None) -> tuple[list[int], list[bool], bool]:
        """Token ids of user text, its content mask, and whether the text was cut early.

        Special tokens typed in the text are split into plain text tokens (user text never
        injects a control token). With a ``budget``, a long text is tokenised by growing
        prefixes until one yields well over ``budget`` tokens, instead of tokenising it
        whole (a 3.6 MB text would take seconds): the first ``budget`` tokens of such a
        prefix are those of the whole text (a cut only changes the tokens near it).
        """
        if not text:
            return [], [], False
        cut = False
        if budget is not None:
            limit = 16 * (budget + _CUT_MARGIN)
            while limit < len(text):
                enc = self._tokenize_user(text[:limit])
                if len(enc["input_ids"]) > budget + _CUT_MARGIN:
                    cut = True
                    break
                limit *= 4
        if not cut:
            enc = self._tokenize_user(text)
        ids = list(enc["input_ids"])
        is_text = []
        for tid, (s, e) in zip(ids, enc["offset_mapping"]):
            s, e = s + offset, e + offset
            inside = content is None or (s < content[1] and e > content[0])
            is_text.append(inside and tid not in self._special_ids and e > s)
        return ids, is_text, cut

    def _tokenize_user(self, text: str) -> Any:
        return self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                              split_special_tokens=True)

    def _place_images(self, item: MMItem, n_images: int) -> tuple[str, tuple[int, int] | None]:
        """The item's text with exactly one ``<|image_k|>`` per image, and its content span.

        Placeholders without an image (text-only side of a row, or ``<|image_k|>`` with k above
        the image count) and repeats of an already placed image are dropped; images the text
        does not mention go first (MMEB convention), each followed by a newline.
        """
        text, content = item.text, item.content

        def drop(t: str, c, pos: int, length: int):
            c = tuple(x - length if x > pos else x for x in c) if c is not None else None
            return t[:pos] + t[pos + length:], c

        def first_stale(t: str):
            seen: set[int] = set()
            for m in _PLACEHOLDER_RE.finditer(t):
                k = int(m.group(1))
                if not 1 <= k <= n_images or k in seen:
                    return m
                seen.add(k)
            return None

        while (stale := first_stale(text)) is not None:
            text, content = drop(text, content, stale.start(), stale.end() - stale.start())
        # MMEB convention: an image without a placeholder goes first.
        referenced = {int(m.group(1)) for m in _PLACEHOLDER_RE.finditer(text)}
        prefix = "".join(_placeholder(k) + "\n" for k in range(1, n_images + 1)
                         if k not in referenced)
        if prefix:
            text = prefix + text
            if content is not None:
                content = (content[0] + len(prefix), content[1] + len(prefix))
        return text, content

    def image_order(self, item: MMItem, n_images: int) -> list[int]:
        """1-based indices of the item's images in the order their blocks appear.

        Models fill image positions with image features in the order the images are given,
        so :meth:`encode` processes each item's images in this order.
        """
        text, _ = self._place_images(item, n_images)
        return [int(m.group(1)) for m in _PLACEHOLDER_RE.finditer(text)]

    def _note_truncation(self, item: MMItem, n_text: int, kept: int,
                         at_least: bool = False) -> None:
        """Count (and log, with a back-off) an item whose text ``max_text_tokens`` cut."""
        self.truncated_items += 1
        n = self.truncated_items
        if n == 1 or n in (10, 100, 1000) or n % 10000 == 0:
            where = (f"{item.source}, line {item.line}" if item.source and item.line
                     else repr(item.text[:60] + ("..." if len(item.text) > 60 else "")))
            log.warning("max_text_tokens=%d cut a text of %s%d tokens to %d (%s); %d item(s) cut "
                        "so far. Set max_text_tokens to none for no limit.",
                        self.max_text_tokens, "at least " if at_least else "", n_text, kept,
                        where, n)

    def _build_sequence(self, item: MMItem, n_image_tokens: int | Sequence[int] | None,
                        video_slot: int | None = None) -> _Seq:
        """Token ids and masks of one item in the adapter's prompt format.

        ``n_image_tokens`` is the token count of the item's image, or a list of counts when the
        item carries several images (``<|image_1|>``, ``<|image_2|>``, ... in the text), or
        ``None`` without an image. ``video_slot``: the ``<|image_k|>`` index that is a native
        video (its block is the family's video block).
        """
        if n_image_tokens is None:
            counts: list[int] = []
        elif isinstance(n_image_tokens, (list, tuple)):
            counts = list(n_image_tokens)
        else:
            counts = [n_image_tokens]
        if self.prompt_format == "vlm2vec":
            return self._build_vlm2vec_sequence(item, counts, video_slot)
        return self._build_fam_sequence(item, counts, append_eos=True, video_slot=video_slot)

    def _build_fam_sequence(self, item: MMItem, counts: list[int], append_eos: bool,
                            video_slot: int | None = None) -> _Seq:
        """fam's layout: ``[bos] text image-block text ... [eos]``, segments tokenised apart."""
        text, content = self._place_images(item, len(counts))
        # Segments of text between image blocks, with their character offsets in ``text``.
        segments: list[tuple[str, int]] = []
        blocks: list[int] = []
        pos = 0
        for m in _PLACEHOLDER_RE.finditer(text):
            segments.append((text[pos:m.start()], pos))
            blocks.append(int(m.group(1)))
            pos = m.end()
        segments.append((text[pos:], pos))
        cap = self.max_text_tokens
        budget = cap if cap is not None else sys.maxsize
        toks: list[tuple[list[int], list[bool]]] = []
        n_text = 0
        early = False
        for seg, off in segments:
            ids_, txt_, cut = self._tokenize_segment(seg, off, content,
                                                     budget if cap is not None else None)
            early |= cut
            # Cut the end of the text (image blocks and the EOS token are never cut).
            toks.append((ids_[:budget], txt_[:budget]))
            budget = max(0, budget - len(ids_))
            n_text += len(ids_)
        if cap is not None and n_text > cap:
            self._note_truncation(item, n_text, cap, at_least=early)
        bos = self.bos_ids()
        ids = list(bos)
        img = [False] * len(ids)
        txt = [False] * len(ids)
        for i, (s_ids, s_txt) in enumerate(toks):
            ids += s_ids
            img += [False] * len(s_ids)
            txt += s_txt
            if i < len(blocks):
                k = blocks[i]
                blk_ids, blk_img = (self.video_block(counts[k - 1]) if k == video_slot
                                    else self.image_block_at(counts[k - 1], k))
                ids += blk_ids
                img += blk_img
                txt += [False] * len(blk_ids)
        if append_eos:
            ids += [self.eos_token_id]
            img += [False]
            txt += [False]
        return _Seq(ids, img, txt, sum(int(c) for c in counts))

    def _build_vlm2vec_sequence(self, item: MMItem, counts: list[int],
                                video_slot: int | None = None) -> _Seq:
        """VLM2Vec's layout (``docs/vlm2vec.md``): one tokenizer call on the expanded string.

        Each ``<|image_k|>`` becomes ``counts[k-1]`` copies of the family's bare image token
        (VLM2Vec's processor expands the one token it writes in place of ``<|image_1|>``), the
        string is tokenised once with the special tokens the tokenizer adds itself, and
        nothing is appended. ``max_text_tokens`` (when set) keeps the first text tokens and
        every image and added special token.
        """
        token = self.vlm2vec_image_token
        assert token is not None and (video_slot is None or self.vlm2vec_video_token)
        text, content = self._place_images(item, len(counts))
        # Expanded string, and where each text piece of ``text`` moved to (for ``content``).
        parts: list[str] = []
        moved: list[tuple[int, int, int]] = []  # (start in text, end in text, start in expanded)
        pos = new = 0
        for m in _PLACEHOLDER_RE.finditer(text):
            moved.append((pos, m.start(), new))
            parts.append(text[pos:m.start()])
            new += m.start() - pos
            k = int(m.group(1))
            block = (self.vlm2vec_video_token if k == video_slot else token) * int(counts[k - 1])
            parts.append(block)
            new += len(block)
            pos = m.end()
        moved.append((pos, len(text), new))
        parts.append(text[pos:])
        expanded = "".join(parts)

        def to_new(p: int) -> int:
            for a, b, n in moved:
                if p <= b:
                    return n + max(0, p - a)
            return len(expanded)

        span = (to_new(content[0]), to_new(content[1])) if content is not None else None
        enc = self.tokenizer(expanded, add_special_tokens=True, return_offsets_mapping=True)
        visual_ids = {self.image_token_id} | ({self.video_token_id} if video_slot else set())
        ids, img, txt = [], [], []
        n_text = 0
        cap = self.max_text_tokens
        for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
            tid = int(tid)
            is_img = tid in visual_ids
            is_text = not is_img and e > s  # added specials (e.g. <s>) cover no characters
            if is_text:
                n_text += 1
                if cap is not None and n_text > cap:
                    continue
            ids.append(tid)
            img.append(is_img)
            inside = span is None or (s < span[1] and e > span[0])
            txt.append(is_text and inside and tid not in self._special_ids)
        if cap is not None and n_text > cap:
            self._note_truncation(item, n_text, cap)
        n_img = sum(int(c) for c in counts)
        if sum(img) != n_img:
            where = f" ({item.source}, line {item.line})" if item.source else ""
            raise DataError(
                f"the vlm2vec layout of this item{where} has {sum(img)} {token} tokens for "
                f"{n_img} image tokens: the text itself contains {token}, or the tokenizer does "
                f"not keep {token} as one special token (use the checkpoint's tokenizer)")
        if not ids:
            raise DataError(f"item{' at ' + str(item.source) if item.source else ''} encodes to "
                            "no tokens (empty text and no image)", item.source, item.line,
                            item.field)
        return _Seq(ids, img, txt, n_img)
