"""The multi-vector reading (fam.model.multivector): one forward, the adapter's masks, the head."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from fam.data.types import MMItem
from fam.errors import ConfigError
from fam.model.encode import EncodePipeline, encode_sequential, load_embedding_model
from fam.model.multivector import (TOKEN_SETS, MultiVectorHead, load_multivector,
                                   save_multivector)

INSTR = "Find me an everyday image that matches the given caption: "


@pytest.fixture
def items(tmp_path):
    out = []
    for i in range(7):
        p = tmp_path / f"{i}.png"
        im = Image.new("RGB", (60 + 20 * i, 90), (30 * i, 120, 200))
        ImageDraw.Draw(im).ellipse([5, 5, 40, 40], fill=(250, 20, 20))
        im.save(p)
        if i % 3 == 0:
            out.append(MMItem(INSTR + "a red circle", None, (len(INSTR), len(INSTR) + 12)))
        elif i % 3 == 1:
            out.append(MMItem("<|image_1|>\nRepresent the given image.", p))
        else:
            out.append(MMItem("a small green triangle above a yellow star " * (i % 2 + 1)))
    return out


def _reference(model, head, items):
    """Plain loop: one item at a time, every hidden state, masks rebuilt from the batch."""
    out = []
    for it in items:
        b = model.adapter.encode([it])
        hs = model.adapter.forward(b, output_hidden_states=True).hidden_states[-1][0]
        keep = {"content": b.image_mask[0] | b.text_mask[0], "image": b.image_mask[0],
                "text": b.text_mask[0], "all": b.inputs["attention_mask"][0].bool()}[head.tokens]
        h = hs[keep]
        if head.proj is not None:
            h = h @ head.proj.weight.T
        out.append(F.normalize(h, dim=-1))
    return out


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
@pytest.mark.parametrize("tokens,dim", [("content", 0), ("all", 0), ("image", 16), ("text", 16)])
def test_one_forward_gives_pooled_and_token_vectors(tiny_dirs, items, family, tokens, dim):
    model = load_embedding_model(tiny_dirs[family]).double()
    torch.manual_seed(0)
    head = MultiVectorHead(model.adapter.hidden_size, dim, tokens).double()
    calls = []
    hook = model.adapter.hf_model.model.register_forward_hook(lambda *a: calls.append(1))
    pipe = EncodePipeline(model, batch_size=3, multivector=head)
    pooled, toks = pipe.encode_multi(items)
    hook.remove()
    assert len(calls) == 3  # ceil(7 / 3) forwards: both readings come from the same pass
    # float64 maths, float32 outputs: one float32 ulp of a unit vector's entries
    assert (pooled - encode_sequential(model, items, batch_size=3)).abs().max() <= 1.2e-7
    with torch.no_grad():
        want = _reference(model, head, items)
    for got, ref in zip(toks, want):
        assert got.shape == (ref.shape[0], dim or model.adapter.hidden_size)
        assert got.dtype == torch.float32
        if ref.shape[0]:
            assert (got - ref.float()).abs().max() <= 1.2e-7
            torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(got)))


def test_token_sets_follow_the_adapter_masks(tiny_dirs, items):
    model = load_embedding_model(tiny_dirs["qwen2_vl"])
    counts = {}
    for tokens in TOKEN_SETS:
        head = MultiVectorHead(model.adapter.hidden_size, 0, tokens)
        _, toks = EncodePipeline(model, batch_size=7, multivector=head).encode_multi(items)
        counts[tokens] = [len(t) for t in toks]
    b = model.adapter.encode(items)
    assert counts["image"] == b.image_mask.sum(1).tolist()
    assert counts["text"] == b.text_mask.sum(1).tolist()
    assert [i + t for i, t in zip(counts["image"], counts["text"])] == counts["content"]
    # "all" keeps special tokens (EOS at least) and the instruction; never padding
    assert counts["all"] == b.inputs["attention_mask"].sum(1).tolist()
    assert all(a > c for a, c in zip(counts["all"], counts["content"]))
    # the instruction of item 0 is outside its content span: only "a red circle" counts
    assert counts["text"][0] < len(model.adapter.tokenizer(INSTR + "a red circle")["input_ids"])
    assert counts["image"][0] == 0 and counts["image"][1] > 0


def test_head_saves_and_loads(tmp_path):
    torch.manual_seed(1)
    head = MultiVectorHead(32, 8, "image", "maxsim")
    save_multivector(head, tmp_path)
    back = load_multivector(tmp_path, 32)
    assert back.settings() == head.settings()
    torch.testing.assert_close(back.proj.weight, head.proj.weight)
    plain = load_multivector(tmp_path / "nothing", 32)
    assert plain.proj is None and plain.tokens == "content"
    with pytest.raises(ConfigError, match="width 32"):
        load_multivector(tmp_path, 48)
    with pytest.raises(ConfigError, match="tokens"):
        MultiVectorHead(32, 0, "patches")
