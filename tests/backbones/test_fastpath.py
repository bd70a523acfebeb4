"""The exact shortcuts of fam.backbones.fastpath give the plain forward's results."""
from __future__ import annotations

import threading

import torch

from fam.backbones import load_backbone
from fam.backbones.fastpath import patch_embed_as_matmul, pooled_rows_only
from fam.data.types import MMItem
from fam.model import EmbeddingModel


def _items(scene_images):
    return [MMItem("a red circle"), MMItem("<|image_1|>\nRepresent the given image.",
                                           scene_images[0]),
            MMItem("a much longer caption about a blue square and a green one", None),
            MMItem("", scene_images[1])]


def test_pooled_rows_only_gives_the_full_forward_embeddings_and_gradients(tiny_dirs, scene_images):
    model = EmbeddingModel(load_backbone(tiny_dirs["qwen2_vl"])).double()
    mods = model.adapter.pooled_token_modules()
    assert len(mods) == 2  # o_proj and the MLP of the last layer
    batch = model.adapter.encode(_items(scene_images))
    batch.inputs["pixel_values"] = batch.inputs["pixel_values"].double()
    w = mods[1].down_proj.weight
    w.requires_grad_(True)
    seen = []
    mods[1].register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape)))
    fast = model(batch, pooled_only=True).embedding
    assert seen[-1][1] == 1  # the MLP ran on one row per sequence
    (g_fast,) = torch.autograd.grad(fast.sum(), w)
    plain = model(batch).embedding  # every row, as the multi-vector head reads them
    assert seen[-1][1] == batch.image_mask.shape[1]
    (g_plain,) = torch.autograd.grad(plain.sum(), w)
    # float64: the EOS rows see the same operations in the same order.
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-12)
    # Gradients: the same sums, the EOS rows' in another order (float64 rounding, ~1e-16).
    torch.testing.assert_close(g_fast, g_plain, rtol=1e-10, atol=1e-12)
    assert not mods[0]._forward_pre_hooks and not mods[1]._forward_pre_hooks  # removed after


def test_pooled_rows_only_leaves_other_threads_alone():
    lin = torch.nn.Linear(4, 3).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    seen = {}
    entered, done = threading.Event(), threading.Event()

    def other():
        entered.wait()
        seen["other"] = lin(x)
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with pooled_rows_only([lin], torch.tensor([4, 2])):
        entered.set()
        done.wait()
        mine = lin(x)
    t.join()
    assert seen["other"].shape == (2, 5, 3)
    torch.testing.assert_close(seen["other"], lin(x))
    torch.testing.assert_close(mine[0, 4], lin(x)[0, 4])
    torch.testing.assert_close(mine[1, 2], lin(x)[1, 2])
    assert float(mine[0, :4].detach().abs().sum()) == 0.0


def test_patch_embedding_matmul_equals_the_convolution(tiny_dirs):
    adapter = load_backbone(tiny_dirs["qwen2_vl"])
    pe = adapter.hf_model.model.visual.patch_embed
    assert patch_embed_as_matmul(adapter.model) == 1
    pe.double()
    x = torch.randn(10, pe.in_channels * pe.temporal_patch_size * pe.patch_size ** 2,
                    dtype=torch.float64)
    with torch.inference_mode():
        fast = pe(x)
    conv = type(pe).forward(pe, x)  # the module's own Conv3d forward
    torch.testing.assert_close(fast, conv, rtol=0, atol=1e-12)
