"""Build entry point: pure Python everywhere, plus the optional CUDA extension (csrc/) where it can build.

All metadata lives in pyproject.toml. This file only decides whether to compile `cee_gen._C`, the
fused KV-cache copy-forward kernels (csrc/, loaded by cee_gen/ops/native.py), driven by environment
variables as flash-attention's build is:

    CEE_GEN_BUILD_CUDA   unset: build when torch is a CUDA build and a CUDA toolkit is found, else skip
                         1: build, and fail loudly if it cannot; 0: never build
    TORCH_CUDA_ARCH_LIST the GPU architectures to compile for (torch's own variable, e.g. "8.0;9.0")
    MAX_JOBS             parallel compile jobs (torch's own variable)

The build needs torch in the build environment, so a CUDA build is installed with
`CEE_GEN_BUILD_CUDA=1 pip install --no-build-isolation -e .`. A plain `pip install -e .` builds in an
isolated environment without torch and so installs the pure-Python package, as on a CPU machine.
Without the extension every op runs its PyTorch twin (cee_gen/ops/reference.py).
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

SOURCES = ["csrc/kv_fill.cpp", "csrc/kv_fill_kernel.cu"]


def cuda_build_plan(flag: str | None, torch_cuda: str | None | bool,
                    cuda_home: str | None) -> tuple[bool, str]:
    """Whether to build the extension, and why. Raises SystemExit when CEE_GEN_BUILD_CUDA=1 cannot build.

    flag: CEE_GEN_BUILD_CUDA; torch_cuda: torch.version.cuda, or False when torch is not importable;
    cuda_home: torch.utils.cpp_extension.CUDA_HOME.
    """
    flag = (flag or "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"cee-gen: CEE_GEN_BUILD_CUDA={flag!r}: use 1 (build), 0 (skip) or leave it unset")
    if flag == "0":
        return False, "CEE_GEN_BUILD_CUDA=0"
    if torch_cuda is False:
        problem = ("torch is not importable in the build environment (pip builds in isolation: "
                   "install torch first and add --no-build-isolation)")
    elif torch_cuda is None:
        problem = "the installed torch is a CPU build (install a CUDA build of torch)"
    elif cuda_home is None:
        problem = "no CUDA toolkit was found (install one, or set CUDA_HOME)"
    else:
        return True, f"torch CUDA {torch_cuda}, toolkit {cuda_home}"
    if flag == "1":
        raise SystemExit(f"cee-gen: CEE_GEN_BUILD_CUDA=1 but {problem}")
    return False, problem


def _torch_facts() -> tuple[str | None | bool, str | None]:
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return False, None
    return torch.version.cuda, CUDA_HOME


def _extension_kwargs() -> dict:
    build, why = cuda_build_plan(os.environ.get("CEE_GEN_BUILD_CUDA"), *_torch_facts())
    print(f"cee-gen: {'building' if build else 'not building'} the CUDA extension: {why}", file=sys.stderr)
    if not build:
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext = CUDAExtension("cee_gen._C", SOURCES,
                        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


if __name__ == "__main__":
    setup(**_extension_kwargs())
