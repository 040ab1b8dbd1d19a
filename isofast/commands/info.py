"""`isofast info`: versions, devices and which backends are available (and why not)."""
from __future__ import annotations

import os
import platform


def describe() -> dict:
    """Facts about this installation, as printed by `isofast info`."""
    import torch

    from .. import __version__
    from ..ops import backends

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"not importable ({type(exc).__name__})"
    cuda = torch.cuda.is_available()
    facts = {
        "isofast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch cuda": torch.version.cuda or "none (CPU build)",
        "triton": triton_version,
        "devices": torch.cuda.get_device_name(0) if cuda else f"CPU only ({os.cpu_count()} cores)",
        "ISOFAST_BACKEND": os.environ.get("ISOFAST_BACKEND", "(unset: auto)"),
    }
    backend_status = {name: backends.status(name) for name in backends.BACKENDS}
    auto = {dev: backends.resolve(None, torch.device(dev)) for dev in (["cpu", "cuda"] if cuda else ["cpu"])}
    return {"facts": facts, "backends": backend_status, "auto": auto}


def run(args) -> int:
    info = describe()
    width = max(len(k) for k in info["facts"])
    for key, value in info["facts"].items():
        print(f"{key:<{width}}  {value}")
    print("\nbackends:")
    for name, (ok, reason) in info["backends"].items():
        print(f"  {name:<10} {'yes' if ok else 'no ':<4} {reason}")
    print("\nauto picks:")
    for device, name in info["auto"].items():
        print(f"  {device} tensors -> {name}")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("info", help="versions and available backends")
    parser.set_defaults(func=run)
