"""`fam bench mac`: three forms in fresh processes, the same loss, and a non-zero exit when the
losses differ or a target is missed (tiny sizes: the tests check the protocol, not speed)."""
from __future__ import annotations

import json

import pytest

from fam.bench import mac


def _row(**kw):
    row = {"B": 64, "N": 256, "T": 32, "d": 256, "dtype": "float32", "threads": 1,
           "memory_method": "cpu_rss_high_water_mark", "variants": ["exact", "official", "naive"]}
    for v, (t, p) in {"exact": (0.017, 20e6), "official": (1.0, 200e6),
                      "naive": (1.3, 420e6)}.items():
        row.update({f"{v}_time_s": t, f"{v}_peak_bytes": p, f"{v}_oom": False, f"{v}_loss": 9.0})
    for v in ("official", "naive"):
        row[f"{v}_memory_ratio"] = row[f"{v}_peak_bytes"] / row["exact_peak_bytes"]
        row[f"{v}_speed_ratio"] = row[f"{v}_time_s"] / row["exact_time_s"]
        row[f"{v}_loss_rel_diff"] = 1e-7
    row["memory_ratio"], row["speed_ratio"] = row["official_memory_ratio"], \
        row["official_speed_ratio"]
    row.update(kw)
    return row


def test_report_prints_both_references_and_their_ratios():
    text = mac.format_report([_row()], "cpu")
    assert "official form" in text and "fully masked" in text
    last = text.splitlines()[-2:]
    assert last[0].startswith("vs official form: peak memory ratio 10.0x, speed ratio 58.8x")
    assert last[1].startswith("vs fully masked: peak memory ratio 21.0x, speed ratio 76.5x")
    assert mac.check([_row()]) == []


def test_check_fails_on_differing_losses_and_missed_targets():
    bad = mac.check([_row(naive_loss_rel_diff=1e-2)])
    assert len(bad) == 1 and "naive form's loss/gradients differ" in bad[0]
    slow = mac.check([_row(speed_ratio=0.9)])
    assert len(slow) == 1 and "target NOT met: speed ratio" in slow[0]
    assert mac.check([_row()], min_memory_ratio=11.0)[0].endswith("10.00x < 11.00x")
    # bf16 is judged by its own tolerance: 4 * 2^-8 = 1.56e-2.
    assert mac.check([_row(dtype="bfloat16", official_loss_rel_diff=1e-2)]) == []
    assert mac.check([_row(dtype="bfloat16", official_loss_rel_diff=2e-2)])


@pytest.mark.slow
def test_bench_runs_three_forms_with_equal_losses_and_cli_exit_codes(tmp_path, capsys):
    from fam.cli import main
    out = tmp_path / "mac.json"
    code = main(["bench", "mac", "--shapes", "4,8,4,16", "--repeats", "1", "--json", str(out),
                 "--min-memory-ratio", "0", "--min-speed-ratio", "0"])
    text = capsys.readouterr().out
    assert code == 0, text
    row = json.loads(out.read_text())["rows"][0]
    assert row["variants"] == ["exact", "official", "naive"]
    for v in ("official", "naive"):
        assert row[f"{v}_loss_rel_diff"] <= mac.PARITY_RTOL["float32"]
        assert row[f"{v}_loss"] == pytest.approx(row["exact_loss"], rel=mac.PARITY_RTOL["float32"])  # the bench's own parity tolerance (reason at PARITY_RTOL)
    # An unreachable target makes the same run exit 1 and say why.
    code = main(["bench", "mac", "--shapes", "4,8,4,16", "--repeats", "1",
                 "--min-speed-ratio", "1e9"])
    assert code == 1 and "FAILED:" in capsys.readouterr().out


def test_bad_shape_is_one_clear_line(caplog):
    from fam.cli import main
    assert main(["bench", "mac", "--shapes", "4,8,4"]) == 2
    assert "'4,8,4' is not B,N,T,d" in caplog.text and "Traceback" not in caplog.text
