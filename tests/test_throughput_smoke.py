"""Smoke test of benchmarks/throughput.py and its harness: it runs, checks before timing, writes valid JSON.

Speed itself is never asserted here (ARCHITECTURE.md: speed is shown by benchmarks, not timed tests).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import _harness as H  # noqa: E402
import _report as R  # noqa: E402
import _rows  # noqa: E402
import throughput  # noqa: E402


def test_quick_q_sample_run_writes_valid_json(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter is not timed
    proc = subprocess.run(
        [sys.executable, str(BENCH / "throughput.py"), "--quick", "--only", "^q_sample", "--no-compile",
         "--repeat", "3", "--warmup", "1", "--min-sample-s", "0", "--device", "cpu", "--threads", "1",
         "--ceiling-mib", "16", "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert (tmp_path / "bench.png").exists()
    assert data["machine"]["device"] == "cpu" and data["machine"]["versions"]["torch"] == torch.__version__
    assert data["copy_bandwidth_bytes_per_s"] > 0
    assert [r["name"] for r in data["rows"]] == ["q_sample/fp32/64x3x32x32"]
    row = data["rows"][0]
    assert row["bytes_floor"] == 2 * 64 * 3 * 32 * 32 * 4
    by_name = {v["name"]: v for v in row["variants"]}
    assert {"eager", "isofast[reference]"} <= set(by_name)
    for v in row["variants"]:
        if v["status"] == "ok":
            assert v["check"] and v["timing_s"]["median"] > 0 and len(v["timing_s"]["samples"]) == 3
            assert v["x_eager"] == pytest.approx(by_name["eager"]["timing_s"]["median"] / v["timing_s"]["median"])
        else:
            assert v["status"] == "failed" and v["message"] and v["timing_s"] is None
    assert by_name["isofast[reference]"]["status"] == "ok"
    fused_failed = any(v["status"] == "failed" and v["role"] == "isofast" for v in row["variants"])
    assert proc.returncode == (1 if fused_failed else 0)
    assert "q_sample/fp32/64x3x32x32" in proc.stdout


def test_only_pattern_that_matches_nothing_exits_2(capsys):
    assert throughput.main(["--only", "no-such-row", "--device", "cpu"]) == 2


def test_list_names_every_group():
    args = throughput.parse_args(["--quick", "--device", "cpu"])
    settings = _rows.Settings(torch.device("cpu"), args.quick, True, ["cpu"], args.repeat)
    names = [n for n, _ in throughput.plan(settings)]
    for group in ("q_sample/", "loss fwd+bwd/batch/", "noise+loss fwd+bwd/batch/fp32/", "noise+loss fwd+bwd/batch/bf16/",
                  "ddpm step/", "ddpm sampling/mlp-2d/", "ddpm sampling/unet-", "ddim sampling/unet-",
                  "train step/unet-"):
        assert any(n.startswith(group) for n in names), group


def _variant(name, role, fn, check):
    return _rows.Variant(name, role, fn, check)


def test_wrong_fast_path_is_a_failure_row_not_a_timing():
    calls = []

    def wrong_check():
        H.assert_close("x", torch.ones(3), torch.zeros(3), 1e-5, 1e-6)
        return "never"

    row = _rows.Row("toy", "toy", {}, [
        _variant("eager", "eager", lambda i: calls.append(("eager", i)), lambda: "ok"),
        _variant("isofast[fake]", "isofast", lambda i: calls.append(("fake", i)), wrong_check),
    ], n_inputs=2)
    args = throughput.parse_args(["--repeat", "3", "--warmup", "1", "--min-sample-s", "0"])
    throughput.run_row(row, _rows.Settings(torch.device("cpu"), True, False, [], 3), args)
    eager, fake = row.variants
    assert eager.status == "ok" and eager.timing is not None and len(eager.timing.samples) == 3
    assert fake.status == "failed" and "wrong answer" in fake.message and fake.timing is None
    assert all(name == "eager" for name, _ in calls)
    assert {i for _, i in calls} == {0, 1}  # input sets rotated


def test_derive_ratios_bandwidth_and_targets():
    def timed(name, role, seconds):
        v = _variant(name, role, None, None)
        v.status, v.timing = "ok", H.Timing(seconds, seconds, seconds, seconds, 1, [seconds])
        return v

    row = _rows.Row("r", "noise+loss", {}, [timed("eager", "eager", 4.0), timed("torch.compile", "compile", 2.0),
                                            timed("isofast[cpu]", "isofast", 1.0)],
                    n_inputs=1, bytes_floor=1000, target=_rows.Target(vs_eager=3.0, vs_compile=2.5))
    R.derive([row], copy_bytes_per_s=2000.0)
    d = row.variants[2].derived
    assert d["x_eager"] == 4.0 and d["x_compile"] == 2.0
    assert d["floor_bytes_per_s"] == 1000.0 and d["copy_fraction"] == 0.5
    assert d["target"]["x_eager"]["pass"] and not d["target"]["x_compile"]["pass"]
    assert "target" not in row.variants[0].derived
    assert "MISS" in R.table([row], [])


def test_peak_bytes_sees_a_cpu_allocation():
    H.pin_mmap_threshold()
    nbytes = 8 * 2**20
    peak = H.peak_bytes(lambda: torch.ones(nbytes // 4), torch.device("cpu"))
    assert peak is not None and 0.9 * nbytes <= peak <= 3 * nbytes


def test_measure_interleaved_counts_and_rotation():
    seen = []
    (timing,) = H.measure_interleaved([seen.append], 3, torch.device("cpu"), warmup=2, repeat=4, min_sample_s=0)
    assert len(timing.samples) == 4 and timing.min <= timing.median
    assert seen == [0, 1, 2, 0, 1, 2, 0]  # warm-up 2, calibration 1, then 4 samples of one call each


def test_target_without_its_baseline_is_not_judged():
    v = _variant("isofast[cpu]", "isofast", None, None)
    v.status, v.timing = "ok", H.Timing(1.0, 1.0, 1.0, 1.0, 1, [1.0])
    eager = _variant("eager", "eager", None, None)
    eager.status, eager.timing = "ok", H.Timing(3.0, 3.0, 3.0, 3.0, 1, [3.0])
    row = _rows.Row("r", "noise+loss", {}, [eager, v], n_inputs=1, target=_rows.Target(vs_eager=2.0, vs_compile=1.2))
    R.derive([row], copy_bytes_per_s=None)
    assert v.derived["target"]["x_eager"]["pass"] is True
    assert v.derived["target"]["x_compile"]["pass"] is None
    assert ">=1.2x compile n/a" in R.table([row], [])
