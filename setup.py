"""Build of the compiled extension isofast._C (metadata lives in pyproject.toml).

- The C++ CPU kernels are built wherever a C++ compiler works; without one the package
  installs as pure Python and ``isofast.ops.extension.available`` says why.
- The CUDA kernels are added when torch has CUDA, nvcc is found and a GPU is present, or
  when ``ISOFAST_CUDA=1`` (cross-compiling without a GPU; ``TORCH_CUDA_ARCH_LIST`` is
  honoured, default "8.0;9.0" plus the local GPU's arch). ``ISOFAST_CUDA=0`` skips them. When CUDA was chosen, a
  CUDA compile error fails the build with the compiler's message: no silent fallback.
- ``ISOFAST_NO_EXT=1`` skips the extension entirely (pure-Python install).

Use ``pip install --no-build-isolation [-e] .`` (torch is then not installed twice) or
``python setup.py build_ext --inplace`` for an in-place build next to the sources.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"isofast setup: {msg}", file=sys.stderr)


def _cxx_works() -> tuple[bool, str]:
    """Can the C++ compiler that setuptools will use compile a trivial file?"""
    cxx = os.environ.get("CXX") or "c++"  # what torch.utils.cpp_extension's ninja build runs
    exe = cxx.split()[0]
    if shutil.which(exe) is None:
        return False, f"no C++ compiler ({exe!r} not found)"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        proc = subprocess.run([*cxx.split(), "-c", src, "-o", os.path.join(tmp, "probe.o")], capture_output=True)
    if proc.returncode != 0:
        return False, f"{cxx!r} cannot compile C++: {proc.stderr.decode(errors='replace')[:500]}"
    return True, cxx


def _want_cuda(torch) -> tuple[bool, str]:
    """(build the CUDA kernels?, why) from ISOFAST_CUDA, torch, nvcc and the GPU."""
    flag = os.environ.get("ISOFAST_CUDA", "").strip()
    if flag == "0":
        return False, "ISOFAST_CUDA=0"
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        if flag == "1":
            raise RuntimeError("ISOFAST_CUDA=1 but this torch has no CUDA support")
        return False, "torch built without CUDA"
    if CUDA_HOME is None:
        if flag == "1":
            raise RuntimeError("ISOFAST_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return False, "nvcc not found"
    if flag == "1":
        return True, "ISOFAST_CUDA=1"
    if torch.cuda.is_available():
        return True, "GPU present"
    return False, "no GPU (set ISOFAST_CUDA=1 to cross-compile)"


def _cuda_include_dirs() -> list[str]:
    """Headers torch's CUDA wheels ship (curand, cusparse, ...) that a bare CUDA toolkit may lack."""
    dirs = []
    for base in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
            path = os.path.join(base, sub)
            if os.path.isdir(path) and path not in dirs:
                dirs.append(path)
    return dirs


def _cudart_dirs(cuda_home: str) -> list[str]:
    """Where libcudart.so is: torch guesses CUDA_HOME from nvcc's path, which may be a wrapper
    outside the toolkit (here /usr/local/bin/nvcc, toolkit in /usr/local/cuda/lib)."""
    candidates = [os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")]
    for home in (os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates += [os.path.join(home, "lib64"), os.path.join(home, "lib")]
    found = []
    for d in candidates:
        if os.path.exists(os.path.join(d, "libcudart.so")) and d not in found:
            found.append(d)
    return found


def _extensions() -> tuple[list, dict]:
    if os.environ.get("ISOFAST_NO_EXT") == "1":
        _log("ISOFAST_NO_EXT=1: pure-Python install")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        _log(f"torch not importable ({exc}); pure-Python install (use pip --no-build-isolation)")
        return [], {}
    ok, why = _cxx_works()
    if not ok:
        _log(f"{why}; pure-Python install without isofast._C")
        return [], {}

    sources = [os.path.relpath(p, ROOT) for p in ["csrc/ops.cpp", "csrc/autograd.cpp", *sorted(glob.glob(os.path.join(ROOT, "csrc/cpu/*.cpp")))]]
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-fno-math-errno"]  # -g0: Python's CFLAGS add -g (a 9 MB .so)
    # Portable: baseline x86-64 code; the noise generator carries its own AVX2/AVX-512 clones.
    define_macros = []
    use_cuda, why_cuda = _want_cuda(torch)
    _log(f"CUDA kernels: {'yes' if use_cuda else 'no'} ({why_cuda})")
    extra = {"cxx": cxx_flags}
    if use_cuda:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ:
            archs = ["8.0", "9.0"]
            if torch.cuda.is_available():  # also the local GPU's, so the kernels run where they are built
                major, minor = torch.cuda.get_device_capability()
                if f"{major}.{minor}" not in archs:
                    archs.append(f"{major}.{minor}")
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
        _log(f"CUDA architectures: {os.environ['TORCH_CUDA_ARCH_LIST']}")
        sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc/cuda/*.cu")))]
        define_macros.append(("ISOFAST_WITH_CUDA", "1"))
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        from torch.utils.cpp_extension import CUDA_HOME

        ext = CUDAExtension(
            "isofast._C", sources, include_dirs=[os.path.join(ROOT, "csrc"), *_cuda_include_dirs()],
            library_dirs=_cudart_dirs(CUDA_HOME), define_macros=define_macros, extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "isofast._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros, extra_compile_args=extra, extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


if __name__ == "__main__":  # also under pip: setuptools runs this file as __main__
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
