"""What the row-window kernels' launchers share, host and device side.

Host: `prepare_rows` is every launcher's prologue (operand checks with `check_rows`, then the launch
settings, or None for empty data) and `launch_rows` the launch itself (one program per row window,
the arguments ``(*head, n, nwin, *tail)``, ``BLOCK`` and the warps of the settings). The kernels
with a host-side key (q_sample, iso_sums, iso_grad) take it as four int32 halves after ``nwin``
(`launch_keyed`) and read their noise operand with `keyed_noise`: the explicit tensor when
``HAS_E``, else the contract draw of that key.
"""
from __future__ import annotations

import triton
import triton.language as tl

from isofast.kernels.philox import contract_normals, join_u64, split_u64
from isofast.kernels.settings import LaunchSettings, calculate_settings, check_rows


def prepare_rows(name: str, x, e=None, *others) -> LaunchSettings | None:
    """Check the data operand ``x`` (called ``name`` in errors), each ``(other_name, other)`` of
    ``others`` and the optional noise tensor ``e`` against it; return the launch settings of its
    rows, or None when ``x`` is empty (nothing to launch)."""
    check_rows(name, x)
    for other_name, other in others:
        check_rows(other_name, other, x, name)
    if e is not None:
        check_rows("noise", e, x, name)
    return calculate_settings(x.shape[1]) if x.numel() else None


def launch_rows(kernel, x, cfg: LaunchSettings, head, *tail, **constexprs) -> None:
    """Launch a row-window ``kernel`` over the (B, n) data ``x``: one program per (row, window), with
    the arguments ``(*head, n, nwin, *tail)`` and the constexprs plus ``BLOCK`` and the warps of ``cfg``."""
    batch, n = x.shape
    kernel[(batch * cfg.nwin,)](*head, n, cfg.nwin, *tail,
                                BLOCK=cfg.block, num_warps=cfg.num_warps, **constexprs)


def launch_keyed(kernel, x, cfg: LaunchSettings, head, e, seed: int, offset: int, **constexprs) -> None:
    """`launch_rows` for a kernel read by `keyed_noise`: ``(seed, offset)`` as int32 halves after
    ``nwin``, ``HAS_E`` whether the explicit noise ``e`` is given, then the kernel's own constexprs.
    (Written out, not through `launch_rows`: a second call level with repacked arguments costs about
    0.5 us a launch.)"""
    batch, n = x.shape
    kernel[(batch * cfg.nwin,)](*head, n, cfg.nwin, *split_u64(seed), *split_u64(offset),
                                HAS_E=e is not None, BLOCK=cfg.block, num_warps=cfg.num_warps, **constexprs)


@triton.jit
def keyed_noise(e_ptr, flat, mask, counter_index, lane, seed_lo, seed_hi, offset_lo, offset_hi,
                HAS_E: tl.constexpr):
    """The float32 noise block of a row window: loaded from ``e_ptr`` when ``HAS_E``, else the
    contract draw keyed by the rejoined ``(seed, offset)``."""
    if HAS_E:
        eps = tl.load(e_ptr + flat, mask=mask, other=0.0).to(tl.float32)
    else:
        eps = contract_normals(join_u64(seed_lo, seed_hi), join_u64(offset_lo, offset_hi), counter_index, lane)
    return eps
