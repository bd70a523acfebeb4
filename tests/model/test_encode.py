"""The encode pipeline (fam.model.encode) against the plain sequential loop it replaced."""
from __future__ import annotations

import random
import threading

import pytest
import torch
from PIL import Image, ImageDraw

from fam.data.types import MMItem
from fam.errors import ConfigError, DataError
from fam.model.encode import (EncodePipeline, encode_items, encode_sequential, length_order,
                              load_embedding_model)
from fam.model import EmbeddingModel

# float64 model, float32 output: both paths compute the same maths in float64, so their
# results differ by ~1e-15 before the final cast; after it they are equal or one float32
# ulp apart where the float64 values straddle a rounding boundary (|x| <= 1: ulp <= 1.2e-7).
F64_TOL = 1.2e-7


@pytest.fixture
def mixed_items(tmp_path):
    """24 items: images of different sizes, with and without text and placeholders, and texts
    of different lengths, in no particular order."""
    rng = random.Random(0)
    d = tmp_path / "img"
    d.mkdir()
    items = []
    for i in range(24):
        kind = i % 3
        if kind == 2:
            items.append(MMItem("a red circle left of a blue square " * rng.randint(1, 4)))
            continue
        p = d / f"{i}.png"
        im = Image.new("RGB", (rng.randint(40, 160), rng.randint(40, 160)),
                       (rng.randint(0, 255), 128, 128))
        ImageDraw.Draw(im).ellipse([4, 4, 30, 30], fill=(250, 20, 20))
        im.save(p)
        text = "<|image_1|>\nRepresent the given image." if kind == 0 else \
            "what colour is the circle? " * rng.randint(0, 3)
        items.append(MMItem(text, p))
    rng.shuffle(items)
    return items


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_pipeline_equals_sequential_loop_float64(tiny_dirs, mixed_items, family):
    model = load_embedding_model(tiny_dirs[family]).double()
    ref = encode_sequential(model, mixed_items, batch_size=5)
    for kw in (dict(), dict(prefetch=0), dict(prefetch=3, workers=3),
               dict(group_by_length=False), dict(batch_size=1), dict(batch_size=64)):
        kw = {"batch_size": 5, **kw}
        got = EncodePipeline(model, **kw).encode(mixed_items)
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert (got - ref).abs().max() <= F64_TOL, kw


def test_pipeline_float32_tolerance(tiny_dirs, mixed_items):
    # float32: grouping changes padded lengths, hence the order of additions in the attention
    # and matmul reductions; each op rounds at 6e-8 relative and a 2-layer model chains ~100
    # of them, so results agree to ~1e-5, not bit for bit.
    model = load_embedding_model(tiny_dirs["qwen2_vl"])
    ref = encode_sequential(model, mixed_items, batch_size=4)
    got = EncodePipeline(model, batch_size=4).encode(mixed_items)
    assert (got - ref).abs().max() < 1e-5
    assert torch.nn.functional.cosine_similarity(got, ref).min() > 1 - 1e-6


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_embedding_only_loading_is_quiet(tiny_dirs, family, caplog):
    import logging
    with caplog.at_level(logging.WARNING):
        load_embedding_model(tiny_dirs[family])
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage()]


def test_embedding_only_model_has_no_lm_head_and_same_vectors(tiny_dirs, mixed_items):
    from fam.backbones import load_backbone
    full = EmbeddingModel(load_backbone(tiny_dirs["qwen2_vl"]))
    head = load_embedding_model(tiny_dirs["qwen2_vl"])
    names = [n for n, _ in head.named_parameters()]
    assert not any("lm_head" in n for n in names)
    lm = full.adapter.hf_model.lm_head.weight
    n_full = sum(p.numel() for p in full.parameters())
    assert sum(p.numel() for p in head.parameters()) == n_full - lm.numel()
    a = encode_sequential(full.double(), mixed_items, 6)
    b = EncodePipeline(head.double(), batch_size=6).encode(mixed_items)
    assert (a - b).abs().max() <= F64_TOL
    with pytest.raises(ConfigError, match="embeddings only"):
        head.adapter.generative_loss(head.adapter.encode(mixed_items[:1]), torch.zeros(1, 1))


def test_encode_method_and_encode_items_use_the_pipeline(tiny_dirs, mixed_items):
    model = load_embedding_model(tiny_dirs["qwen2_vl"]).double()
    ref = encode_sequential(model, mixed_items, 7)
    assert (model.encode(mixed_items, batch_size=7) - ref).abs().max() <= F64_TOL
    assert (encode_items(model, mixed_items, batch_size=7) - ref).abs().max() <= F64_TOL
    assert model.encode([]).shape == (0, model.adapter.hidden_size)


def test_in_memory_images_equal_files(tiny_dirs, mixed_items):
    model = load_embedding_model(tiny_dirs["qwen2_vl"]).double()
    images = [Image.open(it.image).convert("RGB") if it.image else None for it in mixed_items]
    no_paths = [MMItem(it.text) for it in mixed_items]
    a = EncodePipeline(model, batch_size=4).encode(mixed_items)
    b = EncodePipeline(model, batch_size=4).encode(no_paths, images)
    assert (a - b).abs().max() <= F64_TOL
    with pytest.raises(ValueError, match="images has"):
        EncodePipeline(model).encode(no_paths, images[:-1])


def test_length_order_groups_images_then_area_then_text(tmp_path):
    small, big = tmp_path / "s.png", tmp_path / "b.png"
    Image.new("RGB", (20, 20)).save(small)
    Image.new("RGB", (90, 90)).save(big)
    items = [MMItem("x" * 9, big), MMItem("long text here"), MMItem("a", small),
             MMItem("t"), MMItem("b", big)]
    assert length_order(items) == [3, 1, 2, 4, 0]
    # In-memory images count by their own size.
    assert length_order([MMItem("a"), MMItem("b")], [Image.new("RGB", (9, 9)), None]) == [1, 0]


def test_missing_image_raises_data_error_from_the_prefetch_thread(tiny_dirs, tmp_path):
    model = load_embedding_model(tiny_dirs["qwen2_vl"])
    items = [MMItem(f"text {i}") for i in range(10)]
    items.append(MMItem("<|image_1|>", tmp_path / "gone.png", source="items.jsonl", line=11,
                        field="image"))
    before = threading.active_count()
    with pytest.raises(DataError, match=r"items.jsonl, line 11"):
        EncodePipeline(model, batch_size=2, prefetch=2, workers=2).encode(items)
    assert threading.active_count() <= before  # the pipeline's threads are gone


def test_forward_keeps_only_requested_layers(tiny_dirs, mixed_items):
    model = load_embedding_model(tiny_dirs["qwen2_vl"]).double()
    batch = model.adapter.encode(mixed_items[:4])
    with torch.no_grad():
        plain = model(batch)
        with_layers = model(batch, layers=[1, -1])
    assert plain.hidden_states == {}
    assert set(with_layers.hidden_states) == {1, model.num_layers}
    assert torch.equal(plain.embedding, with_layers.embedding)


def test_embedding_only_with_a_peft_adapter(tiny_dirs, qwen_lora, mixed_items):
    """An adapter is merged into the whole model (peft maps it by the generative class's
    module names), then the head is dropped."""
    from fam.backbones import load_backbone
    full = EmbeddingModel(load_backbone(tiny_dirs["qwen2_vl"], adapter=qwen_lora))
    head = load_embedding_model(tiny_dirs["qwen2_vl"], adapter=qwen_lora)
    assert not any("lm_head" in n for n, _ in head.named_parameters())
    a = encode_sequential(full.double(), mixed_items[:8], 4)
    b = EncodePipeline(head.double(), batch_size=4).encode(mixed_items[:8])
    assert (a - b).abs().max() <= F64_TOL
    plain = load_embedding_model(tiny_dirs["qwen2_vl"]).double().encode(mixed_items[:8])
    assert (plain - b).abs().max() > 1e-3  # the adapter changed the vectors


def test_library_encode_counts_every_image_and_a_video(tiny_dirs, tmp_path):
    """An item's further images (``images``) and its video count for the placeholder and
    empty-item rules, in the library as in ``fam encode`` (one shared check_mm_item)."""
    from fam.data.items import check_mm_item
    from fam.errors import InputError
    paths = []
    for i, colour in enumerate(["red", "blue", "green"]):
        p = tmp_path / f"im{i}.png"
        Image.new("RGB", (56, 56), colour).save(p)
        paths.append(p)
    two = MMItem("<|image_1|> left of <|image_2|>", image=paths[0], images=[paths[1]])
    video_only = MMItem("", video=paths)
    check_mm_item(two)
    check_mm_item(video_only)
    with pytest.raises(InputError, match="has 1 image"):
        check_mm_item(MMItem("<|image_2|>", image=paths[0]))
    with pytest.raises(InputError, match="empty item"):
        check_mm_item(MMItem(""))
    model = load_embedding_model(tiny_dirs["qwen2_vl"])
    emb = EncodePipeline(model, batch_size=2).encode([two, video_only])
    assert emb.shape[0] == 2 and torch.isfinite(emb).all()
    # the two images in the other order give another vector: both were embedded
    swapped = EncodePipeline(model).encode(
        [MMItem("<|image_1|> left of <|image_2|>", image=paths[1], images=[paths[0]])])
    assert not torch.equal(emb[0], swapped[0])
