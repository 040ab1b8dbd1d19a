"""``python -m isofast.selfcheck``: every fused op against the reference, forward and backward.

On a machine with a CUDA GPU it runs the Triton kernels (and the compiled CUDA kernels when
``isofast._C`` was built with them) at real sizes, B=128 samples of 3x64x64 in float32 and
bfloat16, and prints one pass/fail line per (op, backend, dtype). Without a GPU it says so and
checks what can run on CPU: the compiled CPU kernels when built, the Triton kernels only if
``TRITON_INTERPRET=1`` was set before start-up (the interpreter is slow: a small size is used),
and otherwise that every Triton kernel compiles to an sm_90 cubin with the ptxas Triton ships
(no GPU needed; this catches lowering errors the interpreter cannot).
Exit status 1 when any check fails, 0 otherwise (also when nothing could be checked: the table
says which backends were skipped and why).

Each check compares the fused op with ``backend="reference"`` on the same inputs and the same
NoiseKey (the reference materialises the key's noise) by the error relative to the largest
magnitude of the reference result: ``max|fused - ref| / max|ref| <= tol`` with tol 2e-5 for
float32 and 1.6e-2 (about two ulp) for bfloat16, whose inputs and outputs are rounded to
bfloat16 (both sides compute in float32 with the contract's float32 noise).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

import isofast
from isofast import NoiseKey, NoiseSchedule
from isofast.ops import backends

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@dataclass
class Result:
    op: str
    backend: str
    dtype: str
    error: float | None  # relative error, None when the check raised
    tol: float
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.error is not None and self.error <= self.tol


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        raise ValueError(f"shape {tuple(got.shape)} != reference {tuple(want.shape)}")
    if not torch.isfinite(got).all():
        return float("inf")
    scale = want.abs().max().clamp_min(1e-30)
    return float((got - want).abs().max() / scale)


def _loss_case(mode: str, keyed: bool, weighted: bool, prediction_type: str = "epsilon"):
    def run(backend, x0, t, sched, key):
        noise = key if keyed else key.materialize()
        batch = x0.shape[0]
        weights = torch.linspace(0.5, 1.5, batch, device=x0.device) if weighted else None
        p = (0.9 * x0.float() + 0.3).to(x0.dtype).requires_grad_(True)
        extra = {}
        if prediction_type != "epsilon":  # the context (x0, t, schedule) as q_sample hands it over with its key
            _, noise = isofast.q_sample(x0, t, sched, noise, backend=backend)
            extra = dict(prediction_type=prediction_type, snr_gamma=5.0)
        loss, parts = isofast.iso_ddpm_loss(p, noise, 0.3, mode, weights, return_parts=True, backend=backend, **extra)
        (loss * 1.7).backward()  # an upstream gradient != 1 exercises its folding into c1/c2
        return [loss, *parts, p.grad]

    return run


def _cases() -> dict[str, Callable]:
    def q_sample(backend, x0, t, sched, key):
        return [isofast.q_sample(x0, t, sched, key, backend=backend)[0]]

    def ddpm(backend, x0, t, sched, key):
        return [isofast.ddpm_step(x0, 0.5 * x0, t, sched, key, clip_x0=True, backend=backend)]

    def ddim(eta):
        def run(backend, x0, t, sched, key):
            return [isofast.ddim_step(x0, 0.5 * x0, t, t - 7, sched, eta, key, backend=backend)]

        return run

    return {
        "q_sample (key)": q_sample,
        "loss batch (key) fwd+bwd": _loss_case("batch", keyed=True, weighted=False),
        "loss batch (tensor, weights) fwd+bwd": _loss_case("batch", keyed=False, weighted=True),
        "loss sample (key, weights) fwd+bwd": _loss_case("sample", keyed=True, weighted=True),
        "loss batch v-pred min-SNR (key) fwd+bwd": _loss_case("batch", keyed=True, weighted=True,
                                                              prediction_type="v_prediction"),
        "ddpm_step (key, clip)": ddpm,
        "ddim_step eta=0": ddim(0.0),
        "ddim_step eta=1 (key)": ddim(1.0),
    }


def check_backend(backend: str, device: str, batch: int, shape: tuple[int, ...],
                  dtypes: tuple[torch.dtype, ...]) -> list[Result]:
    """Every case on ``backend`` against the reference at (batch, *shape) for each dtype."""
    results = []
    sched = NoiseSchedule.linear(T=1000).to(device=device)
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        x0 = torch.randn((batch, *shape), generator=gen).to(device=device, dtype=dtype)
        t = torch.randint(7, sched.T, (batch,), generator=gen).to(device)
        key = NoiseKey(seed=0x9E3779B97F4A7C15, offset=2**33 + 5, shape=(batch, *shape), dtype=dtype,
                       device=torch.device(device))
        for name, case in _cases().items():
            tol = TOLERANCE[dtype]
            try:
                got = case(backend, x0, t, sched, key)
                want = case("reference", x0, t, sched, key)
                error = max(_relative_error(g, w) for g, w in zip(got, want, strict=True))
                results.append(Result(name, backend, str(dtype).removeprefix("torch."), error, tol))
            except Exception as exc:  # a crash is a failed check, reported with its cause
                results.append(Result(name, backend, str(dtype).removeprefix("torch."), None, tol,
                                      f"{type(exc).__name__}: {exc}"[:160]))
    return results


def _kernel_signatures(dtype: str):
    """(name, kernel, signature, constexprs) of every Triton kernel, for an ahead-of-time compile."""
    import importlib

    # by module path: the package re-exports the primitive `q_sample` under the module's name
    iso_loss, philox, q_sample, steps = (importlib.import_module(f"isofast.kernels.{m}")
                                         for m in ("iso_loss", "philox", "q_sample", "steps"))

    i64_ptrs = {"t_ptr", "t_prev_ptr", "key_ptr"}
    f32_ptrs = {"sqrt_ab_ptr", "sqrt_1mab_ptr", "table_ptr", "c1_ptr", "c2_ptr", "coef_ptr",
                "sse_part_ptr", "ssq_part_ptr"}
    block = 2048
    cases = [
        ("q_sample", q_sample.q_sample_kernel, {"HAS_E": False, "BLOCK": block}),
        ("iso_sums", iso_loss.iso_sums_kernel, {"HAS_E": False, "AFFINE": False, "BLOCK": block}),
        ("iso_grad", iso_loss.iso_grad_kernel, {"HAS_E": False, "AFFINE": False, "BLOCK": block}),
        ("iso_sums v/x0", iso_loss.iso_sums_kernel, {"HAS_E": False, "AFFINE": True, "BLOCK": block}),
        ("iso_grad v/x0", iso_loss.iso_grad_kernel, {"HAS_E": False, "AFFINE": True, "BLOCK": block}),
        ("ddpm_step", steps.ddpm_step_kernel, {"HAS_E": False, "CLIP_X0": True, "BLOCK": block}),
        ("ddim_step", steps.ddim_step_kernel, {"STOCHASTIC": True, "HAS_NOISE": True, "HAS_E": False, "CLIP_X0": False,
                                                     "BLOCK": block}),
        ("contract_draw", philox._contract_draw_kernel, {"BLOCK": 1024}),
    ]
    for name, kernel, constexprs in cases:
        signature = {}
        for arg in kernel.arg_names:
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg == "ints_ptr":
                signature[arg] = "*i32"
            elif arg in i64_ptrs:
                signature[arg] = "*i64"
            elif arg in f32_ptrs or (name == "contract_draw" and arg == "out_ptr"):
                signature[arg] = "*fp32"
            elif arg.endswith("_ptr"):
                signature[arg] = f"*{dtype}"
            else:
                signature[arg] = "fp32" if arg == "eta" else "i32"
        yield name, kernel, signature, constexprs


def compile_check(arch: int = 90, dtypes: tuple[str, ...] = ("fp32", "bf16")) -> list[Result]:
    """Compile every Triton kernel for an sm_``arch`` GPU without one (for each data dtype).

    Needs the kernels jitted, not interpreted: run without ``TRITON_INTERPRET=1``.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = []
    target = GPUTarget("cuda", arch, 32)
    for dtype in dtypes:
        for name, kernel, signature, constexprs in _kernel_signatures(dtype):
            if name == "contract_draw" and dtype != "fp32":
                continue
            pointer_args = [i for i, a in enumerate(kernel.arg_names) if signature[a].startswith("*")]
            attrs = {(i,): [["tt.divisibility", 16]] for i in pointer_args}
            try:
                src = ASTSource(kernel, signature=signature, constexprs=constexprs, attrs=attrs)
                compiled = triton.compile(src, target=target, options={"num_warps": 4})
                ok = bool(compiled.asm.get("cubin"))
                results.append(Result(f"compile {name} sm_{arch}", "triton", dtype, 0.0 if ok else None, 0.0,
                                      "" if ok else "no cubin produced"))
            except Exception as exc:
                results.append(Result(f"compile {name} sm_{arch}", "triton", dtype, None, 0.0,
                                      f"{type(exc).__name__}: {exc}"[:160]))
    return results


def _plan(args: argparse.Namespace) -> tuple[str, list[tuple[str, int, tuple[int, ...]]], list[str]]:
    """(device, [(backend, batch, shape)], skipped-lines) for this machine."""
    plan, skipped = [], []
    real = (args.batch, tuple(args.shape))
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        device = "cuda"
        for name in ("triton", "cuda"):
            ok, reason = backends.status(name)
            (plan.append((name, *real)) if ok else skipped.append(f"{name}: {reason}"))
        return device, plan, skipped
    device = "cpu"
    print("No CUDA GPU here (or TRITON_INTERPRET=1): the GPU kernels cannot be checked at real size;"
          " checking what runs on CPU.")
    ok, reason = backends.status("cpu")
    (plan.append(("cpu", 8, (3, 16, 16))) if ok else skipped.append(f"cpu: {reason}"))
    if os.environ.get("TRITON_INTERPRET") == "1":
        plan.append(("triton", 2, (3, 4, 5)))  # interpreter: ~1e5 elements/s
        skipped.append("triton sm_90 compile check: not under TRITON_INTERPRET=1 (kernels are interpreted)")
    else:
        plan.append(("triton-compile", 0, ()))
        skipped.append("triton numerics: no GPU; run with TRITON_INTERPRET=1 to check them in the (slow) interpreter")
    skipped.append("cuda: no CUDA GPU")
    return device, plan, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m isofast.selfcheck", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128, help="GPU batch size (default 128)")
    parser.add_argument("--shape", type=int, nargs="+", default=[3, 64, 64], help="GPU sample shape (default 3 64 64)")
    args = parser.parse_args(argv)

    device, plan, skipped = _plan(args)
    dtypes = (torch.float32, torch.bfloat16)
    results: list[Result] = []
    for backend, batch, shape in plan:
        if backend == "triton-compile":
            print("compiling every Triton kernel for sm_90 (no GPU needed) ...", flush=True)
            results += compile_check(90)
            continue
        print(f"checking {backend} on {device}: B={batch}, sample shape {shape} ...", flush=True)
        results += check_backend(backend, device, batch, shape, dtypes)

    width = max([len(r.op) for r in results] + [10])
    print(f"\n{'op':<{width}}  {'backend':<7}  {'dtype':<8}  {'rel.err':>9}  {'tol':>7}  result")
    for r in results:
        err = "error" if r.error is None else ("ok" if r.op.startswith("compile") else f"{r.error:9.2e}")
        line = f"{r.op:<{width}}  {r.backend:<7}  {r.dtype:<8}  {err:>9}  {r.tol:7.1e}  {'PASS' if r.passed else 'FAIL'}"
        print(line + (f"  {r.note}" if r.note else ""))
    for line in skipped:
        print(f"skipped  {line}")
    failed = sum(not r.passed for r in results)
    print(f"\n{len(results) - failed} passed, {failed} failed, {len(skipped)} backends skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
