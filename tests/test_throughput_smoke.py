"""Smoke test of benchmarks/throughput.py and its harness: it runs, checks before timing, writes valid JSON.

Speed itself is never asserted here (ARCHITECTURE.md: speed is shown by benchmarks, not timed tests).
"""
from __future__ import annotations

import json
import os
import signal
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
    assert data["partial"] is False and data["stopped_by"] is None
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


def test_diffusers_loop_row_checks_both_steps_and_times_them():
    """The row "diffusers loop step" (full runs only: a whole UNet step per call is not --quick): diffusers'
    add_noise + mse_loss step and isofast's fused step, each checked by its gradients against isofast.reference,
    then timed; its note says they compute the same objective."""
    pytest.importorskip("diffusers")
    import _rows_diffusers

    quick = throughput.plan(_rows.Settings(torch.device("cpu"), True, False, ["cpu"], 2))
    full = throughput.plan(_rows.Settings(torch.device("cpu"), False, False, ["cpu"], 2))
    assert not any(n.startswith("diffusers loop step/") for n, _ in quick)
    assert [n for n, _ in full if n.startswith("diffusers loop step/")] == ["diffusers loop step/unet2d-tiny/16x3x16x16"]
    row = _rows_diffusers.diffusers_loop_row(_rows.Settings(torch.device("cpu"), False, False, ["cpu"], 2), 4, 8)
    args = throughput.parse_args(["--repeat", "2", "--warmup", "1", "--min-sample-s", "0"])
    throughput.run_row(row, _rows.Settings(torch.device("cpu"), False, False, ["cpu"], 2), args)
    assert [(v.name, v.role, v.status) for v in row.variants] == [
        ("diffusers add_noise + mse_loss", "eager", "ok"), ("isofast[cpu]", "isofast", "ok")], \
        [v.message for v in row.variants]
    for v in row.variants:
        assert v.check_note.startswith("gradients of one step vs isofast.reference") and v.timing.median > 0
    R.derive([row], None)
    assert row.variants[1].derived["x_eager"] > 0
    assert "add_noise + F.mse_loss + the isotropy term" in row.note and "q_sample + iso_ddpm_loss" in row.note
    assert row.note in R.table([row], []) and R.to_json([row], {})["rows"][0]["note"] == row.note


def test_diffusers_loop_row_without_diffusers_is_skipped_saying_how_to_get_it(monkeypatch):
    import _rows_diffusers

    monkeypatch.setitem(sys.modules, "diffusers", None)
    row = _rows_diffusers.diffusers_loop_row(_rows.Settings(torch.device("cpu"), True, False, ["cpu"], 2), 2, 8)
    assert [(v.name, v.status) for v in row.variants] == [("diffusers add_noise + mse_loss", "skipped"),
                                                           ("isofast[cpu]", "skipped")]
    assert all("pip install '.[bench]'" in v.message for v in row.variants)


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


# ----- a run that is stopped, where results go, skipped baselines, the bar ---------------------------------
def _toy_row(name):
    return _rows.Row(name, "toy", {}, [_variant("eager", "eager", lambda i: None, lambda: "ok"),
                                       _variant("isofast[toy]", "isofast", lambda i: None, lambda: "ok")], n_inputs=1)


def _fake_plan(names, stop_at=None):
    def plan(settings):
        def build(name):
            if name == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a scheduler would, while this row is built
            return _toy_row(name)

        return [(n, lambda n=n: build(n)) for n in names]

    return plan


_TOY_ARGS = ["--device", "cpu", "--repeat", "2", "--warmup", "0", "--min-sample-s", "0", "--ceiling-mib", "4",
             "--no-chart"]


def test_sigterm_keeps_finished_rows_as_valid_partial_json_and_prints_their_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(throughput, "plan", _fake_plan(["row a", "row b", "row c"], stop_at="row c"))
    out = tmp_path / "run.json"
    assert throughput.main([*_TOY_ARGS, "--out", str(out)]) == 128 + signal.SIGTERM
    data = json.loads(out.read_text())
    assert data["partial"] is True and data["stopped_by"] == "SIGTERM"
    assert [r["name"] for r in data["rows"]] == ["row a", "row b"]
    assert data["rows_planned"] == ["row a", "row b", "row c"]
    assert all(r["duration_s"] > 0 for r in data["rows"])
    printed = capsys.readouterr().out
    assert "STOPPED by SIGTERM after 2 of 3 rows" in printed and "== row a" in printed and "== row b" in printed
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone once the run returns


def test_json_is_valid_and_partial_after_every_row(tmp_path, monkeypatch):
    seen = []
    write_json = R.write_json

    def spy(path, data):
        write_json(path, data)
        seen.append((json.loads(Path(path).read_text())["partial"], len(data["rows"])))

    monkeypatch.setattr(R, "write_json", spy)
    monkeypatch.setattr(throughput, "plan", _fake_plan(["row a", "row b"]))
    assert throughput.main([*_TOY_ARGS, "--out", str(tmp_path / "run.json")]) == 0
    assert seen == [(True, 1), (True, 2), (False, 2)]


def test_a_users_run_never_writes_the_committed_reference(tmp_path):
    args = throughput.parse_args(["--device", "cpu"])
    path = throughput.output_path(args, "cpu-intel-xeon-2c", "2026-11-30T16:15:00+00:00")
    assert path == os.path.join(throughput.LOCAL_RESULTS_DIR, "cpu-intel-xeon-2c-20261130T161500.json")
    ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
    assert ignored.returncode == 0, "results/local/ must be git-ignored"
    quick = throughput.output_path(throughput.parse_args(["--quick"]), "d", "2026-11-30T16:15:00+00:00")
    assert quick.endswith("d-20261130T161500-quick.json")
    ref = throughput.output_path(throughput.parse_args(["--reference"]), "cpu-intel-xeon-2c", "2026-11-30T16:15:00")
    assert ref == os.path.join(throughput.RESULTS_DIR, "cpu-intel-xeon-2c.json")


def test_missing_diffusers_is_a_row_saying_why_and_how(monkeypatch):
    import _baselines as B

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    assert B.diffusers_scheduler(10, 1e-4, 0.02) is None
    reason = B.diffusers_missing("DDPMScheduler")
    assert "diffusers not importable" in reason and "pip install '.[bench]'" in reason
    row = _toy_row("r")
    row.variants.append(_rows.skipped("diffusers DDPMScheduler loop", "baseline", reason))
    args = throughput.parse_args(["--repeat", "2", "--warmup", "0", "--min-sample-s", "0"])
    throughput.run_row(row, _rows.Settings(torch.device("cpu"), True, False, [], 2), args)
    assert row.variants[-1].status == "skipped" and row.variants[-1].timing is None
    R.derive([row], None)
    assert "diffusers DDPMScheduler loop" in R.table([row], []) and "SKIPPED: diffusers not importable" in R.table([row], [])


def test_time_left_comes_from_per_row_estimates(tmp_path):
    import _progress as P

    names = ["q_sample/fp32/64x3x32x32", "ddpm sampling/unet-tiny/4x3x16x16/1000 steps", "new row"]
    earlier = {"machine": {"date_utc": "2026-11-30T10:00:00"}, "mode": "default", "partial": False,
               "rows": [{"name": names[1], "duration_s": 123.0}]}
    (tmp_path / "dev-20261130T100000.json").write_text(json.dumps(earlier))
    stale = {**earlier, "partial": True, "rows": [{"name": names[1], "duration_s": 999.0}]}
    (tmp_path / "dev-20261130T110000.json").write_text(json.dumps(stale))  # a stopped run: not used
    previous = P.previous_durations([str(tmp_path)], "dev", "default")
    assert previous == {names[1]: 123.0}
    est = P.estimates(names, "default", previous)
    assert est[1] == 123.0 and est[2] > 0
    assert est[0] == P.estimates([names[0]], "default", {})[0] < P.estimates([names[1]], "default", {})[0]


def test_library_output_goes_above_the_bar_line_by_line(monkeypatch):
    # torch's log handler follows sys.stderr ("W1130 ... No CUDA runtime is found ..." landed inside the bar)
    import _progress as P
    from tqdm.auto import tqdm

    written = []
    monkeypatch.setattr(tqdm, "write", classmethod(lambda cls, s, file=None, end="\n", nolock=False: written.append(s)))
    bar = P.RowBar(["a"], [1.0])
    with P.library_output_above(bar):
        print("W1130 cpp_extension.py:183] No CUDA runtime is found, using CUDA_HOME='/x'", file=sys.stderr)
        sys.stderr.write("a warning in ")
        sys.stderr.write("two writes\nand an unfinished line")
    bar.close()
    assert written == ["W1130 cpp_extension.py:183] No CUDA runtime is found, using CUDA_HOME='/x'",
                       "a warning in two writes", "and an unfinished line"]
    assert not isinstance(sys.stderr, P._LinesAboveTheBar)
