"""isofast throughput: side-by-side speed and memory against what users would use instead.

    python benchmarks/throughput.py            # every row (CPU: 400 s, 23 rows, on a 2-core VM at load 1.9-2.1, see README)
    python benchmarks/throughput.py --quick    # reduced sizes (CPU: 11.5 s on the same VM)
    python benchmarks/throughput.py --only 'noise\\+loss'   # rows whose name matches a regex

Every row times isofast and its baselines in the same process on the same inputs: the eager
PyTorch a user would write (`_baselines`), the same under ``torch.compile``, diffusers'
``DDPMScheduler`` for sampling (when installed), and isofast on every backend available here
(`isofast info` lists them; unavailable ones are listed with the reason). Each variant is
checked against `isofast.reference` before it is timed: a wrong answer is a FAILED line, not a
time. Rows: q_sample; loss fwd+bwd ("batch" and "sample" modes); noising + loss fwd+bwd (fp32,
bf16; two shapes); one DDPM sampler step; full DDPM sampling of the 2D MLP (10,000 points) and
a UNet; 50-step DDIM sampling of the UNet; one UNet training step; one step of diffusers' training loop on a
tiny UNet2DModel, add_noise + mse_loss vs isofast fused. See `_harness` for the timing and memory method.

Output: the table on stdout, a JSON file (machine, versions, every figure, date) and a PNG chart of the
speed-ups beside it. A run writes ``benchmarks/results/local/<device-name>-<date>.json`` (git-ignored; a
new file per run), rewritten after every row with ``"partial": true`` until the run ends, so a run that
is stopped (Ctrl-C, SIGTERM) keeps what finished and prints its table. ``--reference`` writes
``benchmarks/results/<device-name>.json`` instead: the committed reference the README cites. Ratios are
the result: absolute times depend on the machine and, on a shared machine, on its load (recorded in the JSON).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager

# The installed isofast (with its compiled extension) wins; only a checkout that was never installed
# falls back to the repository's sources, which then run without isofast._C.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
if importlib.util.find_spec("isofast") is None:
    sys.path.insert(1, os.path.abspath(os.path.join(_HERE, "..")))

import _harness as H  # noqa: E402
import _progress as P  # noqa: E402
import _report as R  # noqa: E402
import _rows as rows_ops  # noqa: E402
import _rows_diffusers as rows_diffusers  # noqa: E402
import _rows_ensemble as rows_ensemble  # noqa: E402
import _rows_models as rows_models  # noqa: E402
import torch  # noqa: E402
from _interrupt import Stopped, stop_on_signals  # noqa: E402
from _rows import Row, Settings  # noqa: E402

RESULTS_DIR = os.path.join(_HERE, "results")  # the committed reference results (written only with --reference)
LOCAL_RESULTS_DIR = os.path.join(RESULTS_DIR, "local")  # every other run's results, git-ignored
_MEMORY_CALL_LIMIT_S = 5.0
_RESOLUTION = {"tiny": 16, "flowers64": 64}  # image size of the UNet configs the rows use


def _sizes(device: torch.device, quick: bool) -> dict:
    """Shapes and run lengths per device and mode (the issue's sizes; --quick cuts them on CPU)."""
    if device.type == "cuda":
        return {
            "shapes": [(64, 3, 32, 32)] if quick else [(64, 3, 32, 32), (256, 3, 64, 64)],
            "mlp": (10_000, 1000),
            "unet_sampling": ("flowers64", 8, 100 if quick else 1000),
            "ddim_steps": 50,
            "train": ("flowers64", 16 if quick else 32),
            "diffusers_loop": (64, 32),
            "trainer_modes": [("fp32", {}), ("bf16+channels_last", {"precision": "bf16", "channels_last": True})],
        }
    return {
        "shapes": [(64, 3, 32, 32)] if quick else [(64, 3, 32, 32), (16, 3, 64, 64)],
        "mlp": (2_000, 50) if quick else (10_000, 1000),
        "unet_sampling": ("tiny", 4, 20 if quick else 1000),
        "ddim_steps": 10 if quick else 50,
        "train": ("tiny", 8 if quick else 16),
        "diffusers_loop": (16, 16),
        "trainer_modes": [("fp32", {})],
    }


def plan(settings: Settings) -> list[tuple[str, Callable[[], Row]]]:
    """(row name, builder) in run order; builders run only for the rows --only keeps."""
    from isofast.models.mlp import TimeMLP
    from isofast.models.unet import build_unet

    s, quick = settings, settings.quick
    size = _sizes(s.device, quick)
    comp = s.compile
    compile_op_rows = comp and not quick  # --quick compiles only the noise+loss rows (each compile costs ~30 s on a CPU)
    entries: list[tuple[str, Callable[[], Row]]] = []
    small = size["shapes"][0]
    for shape in size["shapes"]:
        shp = rows_ops.shape_text(shape)
        for dt in ("fp32", "bf16"):
            if quick and dt != "fp32":
                continue
            entries.append((f"q_sample/{dt}/{shp}",
                            lambda dt=dt, shape=shape: rows_ops.q_sample_row(s, dt, shape, compile_op_rows and dt == "fp32")))
        for mode in ("batch", "sample"):
            for dt in ("fp32", "bf16"):
                if quick and (dt != "fp32" or mode != "batch"):
                    continue
                entries.append((f"loss fwd+bwd/{mode}/{dt}/{shp}", lambda mode=mode, dt=dt, shape=shape: rows_ops.loss_row(
                    s, mode, dt, shape, compile_op_rows and dt == "fp32", tensor_noise=not quick)))
        for dt in ("fp32", "bf16"):
            entries.append((f"noise+loss fwd+bwd/batch/{dt}/{shp}", lambda dt=dt, shape=shape: rows_ops.noise_loss_row(
                s, dt, shape, comp and (dt == "fp32" or not quick))))
    entries.append((f"ddpm step/fp32/{rows_ops.shape_text(small)}",
                    lambda: rows_ops.ddpm_step_row(s, "fp32", small, comp and not quick)))
    n_points, mlp_T = size["mlp"]
    mlp_target = rows_ops.Target(vs_eager=10.0, variant_suffix="+graph") if s.device.type == "cuda" else None
    entries.append((f"ddpm sampling/mlp-2d/{n_points}x2/{mlp_T} steps",
                    lambda n_points=n_points, mlp_T=mlp_T, mlp_target=mlp_target: rows_models.sampling_row(
                        s, "mlp-2d", _seeded(TimeMLP), (n_points, 2), mlp_T, target=mlp_target)))
    # Builders run later: every value they use is bound now (default arguments), not looked up then.
    cfg, batch, unet_T = size["unet_sampling"]
    shape = (batch, 3, _RESOLUTION[cfg], _RESOLUTION[cfg])
    entries.append((f"ddpm sampling/unet-{cfg}/{rows_ops.shape_text(shape)}/{unet_T} steps",
                    lambda cfg=cfg, shape=shape, unet_T=unet_T: rows_models.sampling_row(
                        s, f"unet-{cfg}", _seeded(build_unet, cfg), shape, unet_T)))
    ddim_steps = size["ddim_steps"]
    entries.append((f"ddim sampling/unet-{cfg}/{rows_ops.shape_text(shape)}/{ddim_steps} of 1000 steps",
                    lambda cfg=cfg, shape=shape, ddim_steps=ddim_steps: rows_models.ddim_sampling_row(
                        s, f"unet-{cfg}", _seeded(build_unet, cfg), shape, 1000, ddim_steps)))
    cfg, batch = size["train"]
    shape = (batch, 3, _RESOLUTION[cfg], _RESOLUTION[cfg])
    entries.append((f"train step/unet-{cfg}/{rows_ops.shape_text(shape)}",
                    lambda cfg=cfg, batch=batch: rows_models.train_row(s, cfg, batch, size["trainer_modes"])))
    if not quick:  # a whole UNet step per call, ~0.2 s on a loaded 2-core CPU: as long as the rest of --quick
        batch, side = size["diffusers_loop"]
        entries.append((f"diffusers loop step/unet2d-tiny/{rows_ops.shape_text((batch, 3, side, side))}",
                        lambda batch=batch, side=side: rows_diffusers.diffusers_loop_row(s, batch, side)))
    members, num, steps = (4, 1000, 2) if quick else (18, 10_000, 5)
    entries.append((f"ensemble train step/TimeMLP x{members}/batch 64",
                    lambda members=members: rows_ensemble.train_row(s, members, 64, rows_ensemble.matmul_rate())))
    entries.append((f"ensemble sampling/TimeMLP x{members}/{num}x2/{steps} steps",
                    lambda members=members, num=num, steps=steps: rows_ensemble.sample_row(
                        s, members, num, steps, rows_ensemble.matmul_rate())))
    return entries


def _seeded(factory, *args):
    torch.manual_seed(0)
    return factory(*args)


@contextmanager
def _no_value_checks():
    """ISOFAST_CHECK_VALUES=0 while timing.

    The ops validate timestep values with a host read (``(t < 0) | (t >= T)``), which on CUDA is a
    device sync per call and would serialise the timed loop; the correctness checks before timing
    run with the validation on.
    """
    old = os.environ.get("ISOFAST_CHECK_VALUES")
    os.environ["ISOFAST_CHECK_VALUES"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["ISOFAST_CHECK_VALUES"]
        else:
            os.environ["ISOFAST_CHECK_VALUES"] = old


def run_row(row: Row, settings: Settings, args) -> None:
    """Check every variant, then time the ones that passed, round-robin."""
    for v in row.variants:
        if v.status == "skipped":  # a baseline that cannot run here (e.g. diffusers absent): listed, not timed
            continue
        try:
            v.check_note = v.check()
            v.status = "ok"
        except AssertionError as exc:
            v.status, v.message = "failed", f"wrong answer: {exc}"
        except Exception as exc:  # a variant that cannot run (compile failure, missing feature) is reported
            v.status, v.message = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    live = [v for v in row.variants if v.status == "ok"]
    if not live:
        return
    warmup = 0 if row.long else args.warmup
    repeat = args.long_repeat if row.long else args.repeat
    min_sample = 0.0 if row.long else args.min_sample_s
    with _no_value_checks():
        timings = H.measure_interleaved([v.fn for v in live], row.n_inputs, settings.device, warmup=warmup,
                                        repeat=repeat, min_sample_s=min_sample)
    for v, t in zip(live, timings, strict=True):
        v.timing = t


def measure_memory(rows: list[Row], settings: Settings) -> str:
    """Peak memory of one call of every timed variant (after all timings: see `_harness`)."""
    if settings.device.type == "cpu":
        pinned = H.pin_mmap_threshold()
        note = "CPU: peak RSS growth during one call (VmHWM), malloc mmap threshold pinned at 64 KiB" + (
            "" if pinned else " (pinning failed: cached heap memory may hide allocations)")
    else:
        note = "CUDA: max_memory_allocated during one call minus memory allocated before it"
    with _no_value_checks():
        for row in rows:
            for v in row.variants:
                # One more call of each variant; skipped for whole runs that take minutes (slow CPUs).
                if v.status == "ok" and v.timing.median < _MEMORY_CALL_LIMIT_S:
                    v.peak_bytes = H.peak_bytes(lambda v=v: v.fn(0), settings.device)
    return note


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced sizes and repeats (11 rows; its first 9 took 11.5 s on a 2-core VM at load 1, the full run 400 s)")
    p.add_argument("--only", metavar="PATTERN", help="run only rows whose name matches this regex (re.search)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--repeat", type=int, default=None, help="timed samples per variant (default 15; quick 5)")
    p.add_argument("--long-repeat", type=int, default=None, help="samples of whole sampling runs (default 3; quick 2)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up calls per variant (op rows)")
    p.add_argument("--min-sample-s", type=float, default=None, help="min seconds per timed sample (default 0.05; quick 0.02)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out-dir", default=None,
                   help="folder for the default-named JSON and PNG (default benchmarks/results/local, git-ignored)")
    p.add_argument("--out", default=None, help="JSON path (default <out-dir>/<device-name>-<date>.json, "
                   "with -quick before .json for --quick)")
    p.add_argument("--reference", action="store_true",
                   help="write benchmarks/results/<device-name>[-quick].json, the committed reference results the "
                        "README cites (a deliberate act: commit the file with the README's figures)")
    p.add_argument("--no-chart", action="store_true", help="do not write the PNG chart")
    p.add_argument("--list", action="store_true", help="print the row names and exit")
    p.add_argument("--ceiling-mib", type=int, default=None,
                   help="buffer size of the copy-bandwidth ceiling (default 1024 on GPU, 256 on CPU: beyond the caches)")
    p.add_argument("--note", default="", help="free text stored in the JSON and printed (e.g. 'shared machine')")
    args = p.parse_args(argv)
    args.repeat = args.repeat or (5 if args.quick else 15)
    args.long_repeat = args.long_repeat or (2 if args.quick else 3)
    args.min_sample_s = args.min_sample_s if args.min_sample_s is not None else (0.02 if args.quick else 0.05)
    return args


def output_path(args, device_name: str, date_utc: str) -> str:
    """Where this run's JSON goes (the PNG goes beside it).

    A user's run writes a new, dated file in the git-ignored ``results/local/``; only ``--reference`` writes
    ``results/<device-name>.json``, the committed reference the README cites; ``--out`` names the file.
    """
    if args.out:
        return args.out
    suffix = "-quick" if args.quick else ""
    if args.reference:
        return os.path.join(args.out_dir or RESULTS_DIR, f"{device_name}{suffix}.json")
    stamp = date_utc[:19].replace(":", "").replace("-", "")  # 20261130T161500
    return os.path.join(args.out_dir or LOCAL_RESULTS_DIR, f"{device_name}-{stamp}{suffix}.json")


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if hasattr(torch, "_dynamo"):
        # One compiled graph per row (shapes and dtypes differ): keep them all rather than fall back to eager.
        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)
    fused, backend_report = rows_ops.fused_backends(device)
    settings = Settings(device, args.quick, not args.no_compile, fused, args.repeat)
    entries = plan(settings)
    if args.only:
        entries = [(n, b) for n, b in entries if re.search(args.only, n)]
    if args.list:
        print("\n".join(n for n, _ in entries))
        return 0
    if not entries:
        print(f"no row matches --only {args.only!r}", file=sys.stderr)
        return 2

    meta = {"machine": H.machine_info(device)}
    machine = meta["machine"]
    mode = "quick" if args.quick else "default"
    out = output_path(args, machine["device_name"], machine["date_utc"])
    ceiling_bytes = (args.ceiling_mib << 20) if args.ceiling_mib else (1 << 30 if device.type == "cuda" else 1 << 28)
    copy_bw = H.copy_bandwidth(device, ceiling_bytes)
    meta.update(
        mode=mode, only=args.only, note=args.note, copy_bandwidth_bytes_per_s=copy_bw,
        copy_bandwidth_buffer_bytes=ceiling_bytes, backends=backend_report,
        settings={"repeat": args.repeat, "long_repeat": args.long_repeat, "warmup": args.warmup,
                  "min_sample_s": args.min_sample_s, "compile": settings.compile,
                  "torch_threads": torch.get_num_threads()},
        command=" ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]), rows_planned=[n for n, _ in entries],
    )

    def save(rows: list[Row], partial: bool, memory_note: str | None = None, stopped: str | None = None) -> None:
        # rewritten after every row: a run that is killed leaves valid JSON of the rows that finished
        meta.update(partial=partial, stopped_by=stopped, memory_method=memory_note,
                    duration_s=time.perf_counter() - started)
        R.write_json(out, R.to_json(rows, meta))

    names = [n for n, _ in entries]
    previous = P.previous_durations([LOCAL_RESULTS_DIR, RESULTS_DIR, os.path.dirname(os.path.abspath(out))],
                                    machine["device_name"], mode)
    bar = P.RowBar(names, P.estimates(names, mode, previous))
    rows: list[Row] = []
    stopped = None
    try:
        with stop_on_signals(), P.library_output_above(bar):
            for name, build in entries:
                bar.start(name)
                row_start = time.perf_counter()
                row = build()
                if row.name != name:  # the plan's name is what --only matched: it must describe what was built
                    raise RuntimeError(f"row built as {row.name!r} but planned as {name!r}")
                run_row(row, settings, args)
                row.duration_s = time.perf_counter() - row_start
                R.derive([row], copy_bw)
                rows.append(row)
                save(rows, partial=True)
                bar.finish_row()
            bar.close()
            memory_note = measure_memory(rows, settings)
    except Stopped as exc:
        bar.close()
        stopped, memory_note = exc, "not measured (the run was stopped)"

    machine["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    header = [
        f"isofast throughput — {machine['device_name']} — {machine['date_utc']}",
        f"torch {machine['versions']['torch']}, triton {machine['versions']['triton']}, diffusers "
        f"{machine['versions']['diffusers'] or 'not installed'}; {machine['cpu_cores_usable']} CPU cores usable, "
        f"torch threads {torch.get_num_threads()}; load average at start {_load(machine['load_average_at_start'])}, "
        f"at end {_load(machine['load_average_at_end'])}",
        f"copy bandwidth ceiling (measured now, {ceiling_bytes >> 20} MiB copy): {copy_bw / 1e9:.1f} GB/s",
        "backends: " + "; ".join(f"{k}: {v}" for k, v in backend_report.items()),
        f"mode: {'--quick' if args.quick else 'default'}; repeats {args.repeat} (op rows), {args.long_repeat} (whole runs);"
        f" medians and ±half-IQR of per-call time; memory: {memory_note}",
        "ratios are medians of the same run (variants timed round-robin); GB/s and %copy use the fused op's minimum bytes",
    ] + ([f"note: {args.note}"] if args.note else [])
    if stopped is not None:
        header.append(f"STOPPED by {stopped.signame} after {len(rows)} of {len(entries)} rows: the table below is partial")
    print(R.table(rows, header))
    elapsed = time.perf_counter() - started
    print(f"\n{'stopped' if stopped else 'finished'} in {elapsed:.0f} s")

    save(rows, partial=stopped is not None, memory_note=memory_note,
         stopped=stopped.signame if stopped is not None else None)
    print(f"wrote {out}" + (" (partial)" if stopped is not None else ""))
    if not args.no_chart and rows:
        png = os.path.splitext(out)[0] + ".png"
        title = f"isofast speed-ups over eager PyTorch — {machine['device_name']} — {machine['date_utc'][:10]}"
        if R.chart(rows, png, title):
            print(f"wrote {png}")
    if stopped is not None:
        return stopped.exit_code
    failed = [f"{r.name} {v.name}" for r in rows for v in r.variants if v.status == "failed" and v.role == "isofast"]
    return 1 if failed else 0


def _load(values) -> str:
    return "n/a" if not values else "/".join(f"{x:.1f}" for x in values)


if __name__ == "__main__":
    sys.exit(main())
