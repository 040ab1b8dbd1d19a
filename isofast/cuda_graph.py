"""Capture a step function as a CUDA graph, generically.

``step()`` must be graph-safe: it reads and writes only tensors that live at fixed addresses (the
caller's static buffers), reads nothing on the host and draws no host randomness. `capture` warms it
up on a side stream (Triton compilation, cuBLAS workspaces and the caching allocator settle there,
outside the graph), then records one call. Warm-up runs the step for real, so the caller resets its
buffers after capture; replaying the graph then runs the step with whatever the buffers hold.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

WARMUP_STEPS = 3


def capture(step: Callable[[], None], device: torch.device, warmup: int = WARMUP_STEPS) -> torch.cuda.CUDAGraph:
    """Warm ``step`` up ``warmup`` times on a side stream, then record one call of it as a CUDA graph."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph
