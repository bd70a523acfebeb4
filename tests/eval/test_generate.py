"""Greedy generation equals a plain argmax decoding loop; prompts end where training's do."""
import numpy as np
import pytest
import torch
from PIL import Image

from fam.backbones import build_tiny
from fam.eval.generate import encode_prompts, generate

CORPUS = ["a red circle left of a blue square", "a green star above a white cross",
          "Describe the image.", "What colour is the star?"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    paths = []
    rng = np.random.default_rng(0)
    for i in range(3):
        p = d / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    adapter = build_tiny("llava", size="xs", image_size=56, corpus=CORPUS, seed=0)
    return adapter, paths


def test_prompts_are_left_padded_and_end_before_the_eos(setup):
    adapter, paths = setup
    inp = encode_prompts(adapter, [(paths[0], "Describe the image."),
                                   (paths[1], "What colour is the star?")])
    ids, mask = inp["input_ids"], inp["attention_mask"]
    assert ids.shape == mask.shape
    assert bool(mask[:, -1].all())                     # every row ends at the last column
    assert not bool((ids == adapter.eos_token_id).any())
    short = int(mask[0].sum()) < int(mask[1].sum())    # the shorter prompt is padded left
    assert short and int(mask[0, 0]) == 0
    assert adapter.padding_side == "right"             # restored


def _manual_greedy(adapter, path, prompt, n):
    inp = encode_prompts(adapter, [(path, prompt)])
    ids, mask, pix = inp["input_ids"], inp["attention_mask"], inp["pixel_values"]
    out = []
    model = adapter.hf_model
    for _ in range(n):
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits[0, -1]
        nxt = int(logits.argmax())
        if nxt == adapter.eos_token_id:
            break
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
    return adapter.tokenizer.decode(out, skip_special_tokens=True).strip()


def test_generate_equals_a_plain_greedy_loop(setup):
    adapter, paths = setup
    adapter.hf_model.eval()
    prompts = [(paths[0], "Describe the image."), (paths[1], "What colour is the star?"),
               (paths[2], "Describe the image.")]
    with torch.no_grad():
        ref = [_manual_greedy(adapter, p, q, 6) for p, q in prompts]
    # batched (left padding) and one by one agree with the plain loop
    assert generate(adapter, prompts, max_new_tokens=6, batch_size=3) == ref
    assert generate(adapter, prompts, max_new_tokens=6, batch_size=1) == ref
