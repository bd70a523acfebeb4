"""fam as an mteb encoder (fam.eval.mteb): mteb's offline mock tasks run on a fam model and
score as the same items embedded with fam directly.

The reference side (:class:`Direct`) writes every image and every decoded video frame to PNG
files and embeds fam items read from those files with ``EmbeddingModel.encode`` (fam samples
the 8 frames itself from all of a video's frames), so it shares no code with the wrapper's
row handling.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fam.data.types import MMItem
from fam.data.video import sample_indices
from fam.model.encode import load_embedding_model

mteb = pytest.importorskip("mteb")
from datasets import Dataset  # noqa: E402  (mteb brings datasets)
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from mteb.models.abs_encoder import AbsEncoder, get_prompt_name  # noqa: E402
from mteb.mocks.mock_tasks.classification import (MockImageClassificationTask,  # noqa: E402
                                                  MockVideoClassification)
from mteb.mocks.mock_tasks.retrieval import (MockAny2AnyRetrievalI2TTask,  # noqa: E402
                                             MockAny2AnyRetrievalT2ITask, MockMultiChoiceTask,
                                             MockVideoRetrievalT2V, MockVideoRetrievalV2T)

from fam.eval.mteb import MtebEncoder, model_meta, video_frames  # noqa: E402

PROMPTS = {"query": "Find me the matching item: ",
           "Any2AnyRetrieval-document": "Represent the given item.",
           "DocumentUnderstanding-document": "<|image_1|>\nRepresent the given page."}


def _video_decoding() -> str | None:
    """Why mteb's video mocks cannot run here (None when they can): mteb makes them with
    PyAV and datasets decodes them with torchcodec, so decode a tiny clip made the same way."""
    try:
        from mteb.mocks.mock_tasks.create_mock_samples import create_mock_video_bytes
        from torchcodec.decoders import VideoDecoder
        clip = create_mock_video_bytes(np.random.default_rng(0), n=1, duration_s=0.1)[0]
        VideoDecoder(clip).get_frames_at([0])
    except (Exception, pytest.skip.Exception) as e:  # no av (mteb skips), or an OSError/RuntimeError
        # from torchcodec's libraries (its wheel wants CUDA's libnvrtc next to a CPU torch)
        return ("mteb's mock videos need PyAV and torchcodec, which do not work here "
                f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
    return None


class Direct(AbsEncoder):
    """The reference: each row as a fam item read from PNG files, ``EmbeddingModel.encode``."""

    def __init__(self, model, tmp, prompts):
        self.model, self.tmp, self.n = model, tmp, 0
        self.model_prompts = prompts
        self.mteb_model_meta = model_meta(model, "fam/direct", prompts=prompts)

    def _png(self, im) -> str:
        self.n += 1
        path = self.tmp / f"{self.n}.png"
        im.save(path)
        return path

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kw):
        key = get_prompt_name(self.model_prompts, task_metadata, prompt_type)
        prompt = self.model_prompts[key] if key else ""
        items = []
        for batch in inputs:
            for i in range(len(next(iter(batch.values())))):
                text = batch["text"][i] if "text" in batch else ""
                image = self._png(batch["image"][i]) if "image" in batch else None
                frames = []
                if "video" in batch:  # every frame, decoded; fam picks its 8
                    dec = batch["video"][i]
                    all_frames = dec.get_frames_in_range(0, dec.metadata.num_frames).data
                    frames = [self._png(Image.fromarray(f.permute(1, 2, 0).numpy()))
                              for f in all_frames]
                items.append(MMItem(prompt + text, image, video=frames))
        return self.model.encode(items).numpy()


def _doc_pages(n=6):
    """Rendered pages: a title, text lines and a bar chart, different per page."""
    pages = []
    for p in range(n):
        im = Image.new("RGB", (120, 160), (255, 255, 255))
        d = ImageDraw.Draw(im)
        d.text((8, 6), f"Report {p}", fill=(0, 0, 0))
        for k in range(4):
            d.line([(8, 30 + 9 * k), (110 - 11 * ((p + k) % 5), 30 + 9 * k)], fill=(60, 60, 60))
        for k in range(3):
            h = 10 + 13 * ((p * 3 + k) % 5)
            d.rectangle([15 + 30 * k, 150 - h, 35 + 30 * k, 150],
                        fill=((p * 40) % 255, 90 + 30 * k, 200 - 25 * p))
        pages.append(im)
    return pages


class DocPageRetrieval(AbsTaskRetrieval):
    """A visual-document retrieval task shaped like mteb's ViDoRe tasks (type
    DocumentUnderstanding, t2i, ndcg_at_5): text queries, page images, graded qrels with
    several relevant pages per query."""

    metadata = TaskMetadata(
        name="FamMockDocPageRetrieval", description="Rendered pages for fam's mteb test.",
        reference="https://github.com/embeddings-benchmark/mteb",
        dataset={"path": "NA", "revision": "NA"}, type="DocumentUnderstanding",
        category="t2i", modalities=["text", "image"], eval_splits=["test"],
        eval_langs=["eng-Latn"], main_score="ndcg_at_5", date=("2025-01-01", "2025-01-01"),
        domains=[], task_subtypes=[], license="cc-by-4.0", annotations_creators="derived",
        dialect=[], sample_creation="created", bibtex_citation="")

    def load_data(self, **kwargs):
        pages = _doc_pages()
        self.dataset = {"default": {"test": RetrievalSplitData(
            queries=Dataset.from_dict({"id": ["q0", "q1", "q2"],
                                       "text": ["revenue bar chart", "report four", "red bars"]}),
            corpus=Dataset.from_dict({"id": [f"p{i}" for i in range(6)], "image": pages}),
            relevant_docs={"q0": {"p0": 2, "p3": 1}, "q1": {"p4": 2, "p1": 1, "p5": 1},
                           "q2": {"p2": 1}},
            top_ranked=None)}}
        self.data_loaded = True


def _run(encoder, tasks, folder):
    """mteb's results; fresh task objects (a mock task draws its images from its own RNG on
    every load)."""
    res = mteb.evaluate(encoder, [type(t)() for t in tasks], cache=None, show_progress_bar=False,
                        prediction_folder=folder)
    return {r.task_name: r for r in res.task_results}


def _same_predictions(tmp_path, name):
    """mteb's saved query-document similarities: the wrapper's (w/) = the reference's (d/)."""
    got, want = [json.loads((tmp_path / side / f"{name}_predictions.json").read_text())
                 ["default"]["test"] for side in ("w", "d")]
    assert got.keys() == want.keys() and got
    for q in want:
        assert got[q].keys() == want[q].keys()
        docs = sorted(want[q])
        # Same float32 forward; the two sides batch different items (padding differs).
        np.testing.assert_allclose([got[q][d] for d in docs], [want[q][d] for d in docs], atol=1e-5)


@pytest.fixture(scope="module")
def qwen(tiny_dirs):
    return load_embedding_model(tiny_dirs["qwen2_vl"])


def test_image_and_document_tasks_score_as_fam_directly(qwen, tmp_path):
    tasks = [MockAny2AnyRetrievalT2ITask(), MockAny2AnyRetrievalI2TTask(),
             MockMultiChoiceTask(), MockImageClassificationTask(), DocPageRetrieval()]
    (tmp_path / "w").mkdir(), (tmp_path / "d").mkdir(), (tmp_path / "png").mkdir()
    got = _run(MtebEncoder(qwen, prompts=PROMPTS), tasks, tmp_path / "w")
    want = _run(Direct(qwen, tmp_path / "png", PROMPTS), tasks, tmp_path / "d")
    assert set(got) == {t.metadata.name for t in tasks}
    for name in got:
        g, w = got[name].scores["test"][0], want[name].scores["test"][0]
        assert g["main_score"] == pytest.approx(w["main_score"], abs=1e-6), name  # 5-decimal rounding in mteb
    for task in tasks:
        if not isinstance(task, AbsTaskRetrieval):
            continue
        name = task.metadata.name
        _same_predictions(tmp_path, name)


def test_document_ndcg_equals_fams_own_ranking_metric(qwen, tmp_path):
    """mteb's ndcg_at_5 on the page task = fam's ndcg_linear@5 on fam's own scores."""
    from fam.eval.ranking import query_metrics, rank_ids
    task = DocPageRetrieval()
    task.load_data()
    split = task.dataset["default"]["test"]
    (tmp_path / "png").mkdir()
    pages = []
    for i, im in enumerate(split["corpus"]["image"]):
        im.save(tmp_path / "png" / f"p{i}.png")
        pages.append(MMItem(PROMPTS["DocumentUnderstanding-document"], tmp_path / "png" / f"p{i}.png"))
    queries = [MMItem(PROMPTS["query"] + t) for t in split["queries"]["text"]]
    emb_q, emb_p = qwen.encode(queries), qwen.encode(pages)
    rel = [split["relevant_docs"][q] for q in split["queries"]["id"]]
    ranks = rank_ids(emb_q @ emb_p.T, split["corpus"]["id"], rel)
    ndcg = np.mean([query_metrics(r, g)["ndcg_linear@5"] for r, g in zip(ranks, rel)])
    res = _run(MtebEncoder(qwen, prompts=PROMPTS), [DocPageRetrieval()], tmp_path)
    assert res["FamMockDocPageRetrieval"].get_score() == pytest.approx(ndcg, abs=1e-5)  # rounding


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_video_rows_embed_as_fam_items(tiny_dirs, tmp_path, family):
    """mteb's video values (a (T, C, H, W) uint8 tensor as its frame collators give, a list
    of frames) embed as fam items over folders of all the frames: native Qwen2-VL video and
    frames-as-images for LLaVA-NeXT."""
    model = load_embedding_model(tiny_dirs[family])
    g = torch.Generator().manual_seed(0)
    clip = torch.randint(0, 255, (11, 3, 48, 64), dtype=torch.uint8, generator=g)
    pils = [Image.fromarray(torch.randint(0, 255, (40, 40, 3), dtype=torch.uint8,
                                          generator=g).numpy()) for _ in range(5)]
    batches = [{"id": ["v0", "v1"], "text": ["a clip", "another clip"], "video": [clip, pils]}]
    enc = MtebEncoder(model, prompts={"query": "Find the clip: "})
    got = enc.encode(batches, task_metadata=MockVideoRetrievalT2V.metadata, hf_split="test",
                     hf_subset="default", prompt_type=mteb.types.PromptType.query)
    items = []
    for v, frames in enumerate([[Image.fromarray(f.permute(1, 2, 0).numpy()) for f in clip], pils]):
        folder = tmp_path / f"v{v}"
        folder.mkdir()
        for k, f in enumerate(frames):
            f.save(folder / f"frame_{k + 1}.png")
        items.append(MMItem("Find the clip: " + ["a clip", "another clip"][v], video=folder))
    want = model.encode(items).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)  # same items, same batch: float32 ulps
    assert [len(video_frames(x)) for x in (clip, pils)] == [8, 5]
    assert [f.tobytes() for f in video_frames(clip)] == \
        [Image.fromarray(clip[i].permute(1, 2, 0).numpy()).tobytes() for i in sample_indices(11)]


def test_modalities_declared(tiny_dirs, qwen):
    assert MtebEncoder(qwen).mteb_model_meta.modalities == ["text", "image", "video"]
    nxt = load_embedding_model(tiny_dirs["llava_next"])
    assert "video" in MtebEncoder(nxt).mteb_model_meta.modalities  # frames as images
    qwen.adapter.video_input = None
    try:
        meta = MtebEncoder(qwen, name="fam/tiny").mteb_model_meta
    finally:
        qwen.adapter.video_input = "native"
    assert meta.modalities == ["text", "image"] and meta.name == "fam/tiny"
    assert meta.embed_dim == qwen.adapter.hidden_size and meta.similarity_fn_name == "cosine"
    from fam.errors import ConfigError
    with pytest.raises(ConfigError, match="organisation/model"):
        MtebEncoder(qwen, name="tiny")
    with pytest.raises(ConfigError, match=r"\(T, C, H, W\)"):
        video_frames(torch.zeros(3, 8, 8, dtype=torch.uint8))


@pytest.mark.skipif(_video_decoding() is not None, reason=str(_video_decoding()))
def test_mteb_video_mock_tasks_score_as_fam_directly(qwen, tmp_path):
    tasks = [MockVideoRetrievalT2V(), MockVideoRetrievalV2T(), MockVideoClassification()]
    (tmp_path / "w").mkdir(), (tmp_path / "d").mkdir(), (tmp_path / "png").mkdir()
    got = _run(MtebEncoder(qwen, prompts=PROMPTS), tasks, tmp_path / "w")
    want = _run(Direct(qwen, tmp_path / "png", PROMPTS), tasks, tmp_path / "d")
    for task in tasks:
        name = task.metadata.name
        assert got[name].get_score() == pytest.approx(want[name].get_score(), abs=1e-6)  # rounding
        if isinstance(task, AbsTaskRetrieval):
            _same_predictions(tmp_path, name)
