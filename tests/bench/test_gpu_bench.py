"""``fam bench gpu --tiny``: every code path of the GPU run, at tiny size (CPU here, CUDA when
present), with its correctness checks passing; the watchdog kills a section that overruns."""
from __future__ import annotations

import json

import pytest

from fam.bench.device import bf16_peak
from fam.bench.gpu import SECTIONS, run_gpu_bench
from fam.cli import main
from fam.config import GpuBenchConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench")
    code = main(["bench", "gpu", "--tiny", "--out", str(out)])
    res = json.loads((out / "gpu_bench.json").read_text())
    return code, res, (out / "gpu_bench.md").read_text(), out


def test_every_section_runs_and_the_checks_pass(tiny):
    code, res, md, out = tiny
    assert list(res["sections"]) == list(SECTIONS)
    assert {k: v["status"] for k, v in res["sections"].items()} == {k: "ok" for k in SECTIONS}
    assert res["checks_passed"] is True and code == 0
    assert res["config"] == json.loads(json.dumps(
        __import__("dataclasses").asdict(GpuBenchConfig.tiny())))
    assert not (out / "work").exists()  # the worker's images are cleaned up
    for heading in ("| step | time | tokens/s |", "| check | passed |", "MAC fwd+bwd, bf16"):
        assert heading in md


def test_environment_states_device_versions_and_bf16(tiny):
    env = tiny[1]["sections"]["environment"]["result"]
    assert env["torch"] and env["transformers"] and env["peft"]
    assert env["bf16"]  # "native", or the stated emulation fallback on CPUs without bf16
    assert "sdpa" in env["attention"]
    if env["device"] == "cpu":
        assert env["bf16_peak"] is None and "MFU omitted" in env["bf16_peak_note"]


@pytest.mark.parametrize("section", ["adapt", "align"])
def test_steps_measure_time_tokens_memory_and_flops(tiny, section):
    cfg = GpuBenchConfig.tiny()
    r = tiny[1]["sections"][section]["result"]
    assert r["model"]["dtype"] == "bfloat16" and r["model"]["attn_implementation"] == "sdpa"
    assert r["model"]["lora_params"] > 0 and r["batch"] == cfg.batch
    chunks = cfg.chunks if section == "adapt" else [cfg.align_chunk]
    assert [run["chunk"] for run in r["runs"]] == chunks
    for run in r["runs"]:
        assert not run["oom"] and run["step_s"] > 0 and run["tokens_per_s"] > 0
        assert run["peak_step_bytes"] >= 0 and run["memory_method"]
        assert run["loss"] == run["loss"]  # finite (not NaN)
    f = r["flops"]
    # The count covers GradCache's first (no-grad) forward, the re-forward and the backward:
    # the backward costs about as much as a forward (input gradients), so the step is
    # about 3 forwards and the first pass one of them.
    assert 0 < f["first_pass"] < f["step"] and f["model"] == f["step"] - f["first_pass"]
    assert 2.0 < f["step"] / f["first_pass"] < 4.0
    # The closed form leaves out attention scores, LoRA and VEIN, and over-counts the merger.
    assert 0.8 < f["counted_over_closed_form"] < 1.5
    t = r["tokens"]
    assert 0 < t["lm_tokens"] <= t["lm_tokens_padded"] and t["patches"] > 0
    if section == "adapt":
        assert r["hard_negatives"] and r["vein_eligible_rows"] == cfg.batch


def test_mac_compares_naive_and_exact_in_bf16(tiny):
    m = tiny[1]["sections"]["mac"]["result"]
    assert [m[k] for k in ("B", "N", "T", "d")] == GpuBenchConfig.tiny().mac_shape
    assert m["dtype"] == "bfloat16" and not m["exact_oom"] and not m["naive_oom"]
    assert m["exact_time_s"] > 0 and m["naive_time_s"] > 0 and m["memory_ratio"] is not None


def test_encode_reports_throughput_and_preprocessing_share(tiny):
    e = tiny[1]["sections"]["encode"]["result"]
    for kind, n in (("image", GpuBenchConfig.tiny().encode_images),
                    ("text", GpuBenchConfig.tiny().encode_texts)):
        assert e[kind]["items"] == n and e[kind]["items_per_s"] > 0 and e[kind]["finite"]
        assert 0 < e[kind]["preprocess_share"] < 1


def test_correctness_checks_measure_against_their_tolerances(tiny):
    c = tiny[1]["sections"]["checks"]["result"]
    g = c["gradcache_rng_replay"]
    assert g["passed"] and g["grad_rel_err"] <= g["tolerance"]["grad_rel"]
    # The check is discriminating: other dropout draws move the gradient far more.
    assert g["dropout_effect"] > 100 * g["tolerance"]["grad_rel"] and g["rng_continues"]
    assert g["hard_negative_rows"] > 0 and g["rec_loss"] > 0
    m = c["mac_bf16_vs_fp32"]
    assert m["passed"] and max(m["grad_rel_err"].values()) <= m["tolerance"]["grad_rel"]
    assert max(m["grad_rel_err"].values()) > 0  # bf16 really rounded something
    d = c["process_group_round_trip"]
    assert d["passed"] and d["world_size"] == 1
    assert d["backend"] == ("nccl" if tiny[1]["device"] == "cuda" else "gloo")


def test_the_2b_shape_is_the_published_one():
    """The model of the full run: Qwen2-VL-2B's published dimensions (built on the meta
    device: shapes only), the same as the memory planner's."""
    import torch

    from fam.backbones import build_tiny
    from fam.bench.plan import KNOWN_SHAPES
    adapter = build_tiny("qwen2_vl", size="2b", corpus=["a red circle"], vocab_size=300,
                         dtype=torch.bfloat16, device="meta", image_size=448)
    s, t, v = KNOWN_SHAPES["Qwen2-VL-2B"], adapter.text_config, adapter.config.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.intermediate_size, t.vocab_size, t.tie_word_embeddings) == \
        (s.hidden, s.layers, s.heads, s.kv_heads, s.intermediate, s.vocab, s.tie_embeddings)
    assert (v.depth, v.embed_dim, v.mlp_ratio, v.num_heads) == (s.vision_depth, s.vision_embed,
                                                               s.vision_mlp_ratio, 16)
    params = sum(p.numel() for p in adapter.model.parameters())
    # the published count is '2.21B' (3 significant digits): rounding of the published figure
    assert params == pytest.approx(2.21e9, rel=0.01)
    assert next(adapter.model.parameters()).dtype == torch.bfloat16


def test_known_device_peaks():
    assert bf16_peak("NVIDIA H100 80GB HBM3")["tflops"] == pytest.approx(989.4)
    assert bf16_peak("NVIDIA H100 PCIe")["tflops"] == 756.0
    assert bf16_peak("NVIDIA H200")["tflops"] == pytest.approx(989.4)
    assert bf16_peak("NVIDIA A100-SXM4-80GB")["tflops"] == 312.0
    assert bf16_peak("NVIDIA L40S")["label"] == "L40S" and bf16_peak("NVIDIA L4")["label"] == "L4"
    assert bf16_peak("NVIDIA A10")["label"] == "A10"
    assert bf16_peak("NVIDIA GeForce GTX 1080") is None


def test_a_section_that_overruns_is_killed_and_the_rest_still_runs(tmp_path):
    cfg = GpuBenchConfig.tiny()
    cfg.section_timeout_s = {**cfg.section_timeout_s, "adapt": 1}  # building alone takes longer
    res = run_gpu_bench(cfg, tmp_path, "cpu", tiny=True, sections=("adapt", "environment"))
    assert res["sections"]["adapt"]["status"] == "timeout"
    assert "section limit" in res["sections"]["adapt"]["result"]["error"]
    assert res["sections"]["environment"]["status"] == "ok"  # a fresh worker ran it
    saved = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert saved["sections"]["adapt"]["status"] == "timeout" and saved["checks_passed"] is None


def test_an_out_of_memory_variant_is_reported_as_a_measurement(monkeypatch):
    """What the naive MAC at the paper's scale reports when the device runs out (CUDA-only
    path, driven here with the allocator's figures stubbed)."""
    import torch

    from fam.bench import gpu, mac
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 120_000_000_000)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda *a: type("P", (), {"total_memory": 143_771_000_000})())
    err = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 23.65 GiB. GPU 0 has "
                                 "a total capacity of 139.81 GiB of which 3.1 GiB is free.")
    rec = mac._oom_record(err, before=2_000_000_000)
    assert rec["oom"] and rec["oom_tried_to_allocate"] == "23.65 GiB"
    assert rec["oom_allocated_bytes"] == 120_000_000_000 and rec["peak_bytes"] == 118_000_000_000
    row = {"B": 512, "N": 757, "T": 64, "d": 3072, "dtype": "bfloat16", "threads": 1,
           "memory_method": "cuda_max_memory_allocated", "exact_time_s": 0.05,
           "exact_peak_bytes": 3_000_000_000, "exact_oom": False, "naive_time_s": None,
           "naive_peak_bytes": rec["peak_bytes"], "naive_oom": True,
           "naive_oom_allocated_bytes": rec["oom_allocated_bytes"],
           "naive_oom_tried_to_allocate": "23.65 GiB", "memory_ratio": None, "speed_ratio": None,
           "naive_similarity_tensor_bytes_computed": 25_400_000_000}
    assert "OOM at 120.0 GB" in mac.format_report([row], "cuda:0")
    md = gpu.format_markdown({"command": "fam bench gpu", "device": "cuda", "wall_s": 1.0,
                              "sections": {"mac": {"status": "ok", "seconds": 1.0,
                                                   "result": row}}})
    assert "naive OOM at 120.00 GB (tried to allocate 23.65 GiB)" in md
