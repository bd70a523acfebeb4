"""`fam bench gradcache` at a tiny size: three configurations in fresh processes, the same loss
for GradCache and the full batch (dropout off), and exit 1 on a missed target."""
from __future__ import annotations

import json

import pytest

from fam.bench import gradcache


@pytest.mark.slow
def test_tiny_gradcache_bench_equal_losses_and_exit_codes(tmp_path, capsys):
    from fam.cli import main
    out = tmp_path / "gc.json"
    args = ["bench", "gradcache", "--size", "xs", "--batch", "8", "--chunk", "2",
            "--image-size", "56", "--text-words", "4", "--threads", "1", "--lora-dropout", "0"]
    code = main(args + ["--max-ratio", "1000", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    res = json.loads(out.read_text())
    assert {"gradcache", "small", "full", "load_avg_before", "load_avg_after"} <= set(res)
    assert gradcache.loss_parity(res) <= gradcache.LOSS_RTOL
    assert "relative difference" in text.splitlines()[-1]
    # The same figures against an unreachable target: exit 1, and the reason printed.
    assert gradcache.check(res, max_ratio=1e-9)[0].startswith("target NOT met")
    bad = {**res, "gradcache": {**res["gradcache"], "loss": res["full"]["loss"] * 1.01}}
    assert "differs from the full batch's" in gradcache.check(bad, 1000)[0]
