"""Loading the optional CUDA extension (csrc/): built at install time, or just in time.

- Built with the package (`CEE_GEN_BUILD_CUDA=1 pip install --no-build-isolation -e .`, setup.py):
  the module `cee_gen._C`, imported here.
- Just in time, for kernel development: `CEE_GEN_JIT=1` builds csrc/ with
  `torch.utils.cpp_extension.load` on first use (cached in TORCH_EXTENSIONS_DIR), or call `jit_build()`.

Loading the library registers the CUDA kernels of the ops that cee_gen/ops/__init__.py declares;
without it those ops run their PyTorch twins (ops/reference.py) on every device, and CUDA callers
get a one-time notice saying so and how to build.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("kv_fill.cpp", "kv_fill_kernel.cu")

_loaded: str | None = None  # how the extension was loaded: "built", "jit", or None
_tried = False
_noticed = False


def jit_build(verbose: bool = True) -> None:
    """Compile csrc/ now and load it into this process (needs nvcc and a CUDA build of torch)."""
    global _loaded
    from torch.utils.cpp_extension import load

    if torch.version.cuda is None:
        raise RuntimeError("cee-gen: cannot JIT-build the CUDA extension: this torch is a CPU build "
                           "(install a CUDA build of torch)")
    missing = [s for s in SOURCES if not (CSRC / s).exists()]
    if missing:
        raise RuntimeError(f"cee-gen: cannot JIT-build the CUDA extension: {CSRC} lacks {', '.join(missing)} "
                           "(JIT builds need a source checkout)")
    load(name="cee_gen_C", sources=[str(CSRC / s) for s in SOURCES], extra_cflags=["-O3"],
         extra_cuda_cflags=["-O3", "-lineinfo"], is_python_module=False, verbose=verbose)
    _loaded = "jit"


def load() -> str | None:
    """Load the extension once if it is there; returns how it was loaded, or None."""
    global _loaded, _tried
    if _tried:
        return _loaded
    _tried = True
    try:
        import cee_gen._C  # noqa: F401  (registers the CUDA kernels)

        _loaded = "built"
    except ImportError:
        if os.environ.get("CEE_GEN_JIT") == "1":
            try:
                jit_build()
            except Exception as e:  # asked for, so say so loudly; the ops still work through the twins
                lines = [ln for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
                warnings.warn(f"CEE_GEN_JIT=1 but the CUDA extension did not build ({lines[0][:200]}): "
                              "the ops run their PyTorch twins", stacklevel=2)
    return _loaded


def available() -> bool:
    return load() is not None


def notice_if_twin(t: torch.Tensor) -> None:
    """Once per process: CUDA tensors, but the kernels are not built, so the twin runs."""
    global _noticed
    if _noticed or not t.is_cuda or available():
        return
    _noticed = True
    warnings.warn("cee-gen: the CUDA extension is not built, so the KV fill runs its PyTorch twin "
                  "(correct, slower). Build it with `CEE_GEN_BUILD_CUDA=1 pip install "
                  "--no-build-isolation -e .`, or set CEE_GEN_JIT=1 to build it on first use.", stacklevel=3)
