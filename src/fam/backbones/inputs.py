"""What a backbone declares for the input contract (:mod:`fam.data.items`): a mixin of
:class:`~fam.backbones.base.BackboneAdapter`.

A family sets :attr:`InputLimits.max_aspect` / :attr:`InputLimits.min_side` (the limits its
image processor enforces, e.g. Qwen2-VL's 200:1); :attr:`InputLimits.input_rules` gives the
contract those limits on the size after the adapter's pre-resize, and the control tokens user
text may not hold in the ``vlm2vec`` format.
"""
from __future__ import annotations

from typing import Any, ClassVar

from fam.backbones.options import target_size
from fam.data.images import ImageRules
from fam.data.items import InputRules


class InputLimits:
    """The input-contract part of an adapter (relies on ``tokenizer``, ``family``,
    ``prompt_format`` and ``image_resolution``)."""

    tokenizer: Any
    family: ClassVar[str]
    prompt_format: str
    image_resolution: str | None
    #: Largest long side / short side ratio the family's processor accepts (``None``: any),
    #: and its smallest side, on the size after the pre-resize. The input contract checks
    #: them up front (:attr:`input_rules`), so no run dies on an image mid-way.
    max_aspect: ClassVar[float | None] = None
    min_side: ClassVar[int] = 1

    def special_tokens(self) -> tuple[str, ...]:
        """The tokenizer's special (control) tokens, as strings."""
        tok = self.tokenizer
        names = set(getattr(tok, "all_special_tokens", []))
        names.update(t.content for t in getattr(tok, "added_tokens_decoder", {}).values()
                     if getattr(t, "special", False))
        return tuple(sorted(n for n in names if n))

    @property
    def input_rules(self) -> InputRules:
        """What this model accepts (:mod:`fam.data.items`): the family's image limits on the
        size after the pre-resize; the special tokens text may not hold in the ``vlm2vec``
        format (fam's layout splits them into plain text instead)."""
        spec = self.image_resolution
        images = ImageRules(max_aspect=self.max_aspect, min_side=self.min_side,
                            family=self.family,
                            resize=(lambda s: target_size(spec, s) or s) if spec else None)
        reserved = self.special_tokens() if self.prompt_format == "vlm2vec" else ()
        return InputRules(images=images, reserved_tokens=reserved)
