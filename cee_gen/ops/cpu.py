"""CPU matmul kernels for small M (decode, draft verification, small batches), fp32 and GGUF low-bit.

Batch-1 decode on a CPU is bound by reading the weights. MKL's sgemm is tuned for large M: at M = 1..16
it reads W more than once and loses to a plain loop (bench_cpu_linear.py). These kernels read each
weight once per call, dequantize it in registers (exactly: the fp32 weights gguf-py's dequantization
gives, see csrc/cpu/linear.h) and do M rows of FMAs with it, on torch's own thread pool.

    linear_f32(Tensor x, Tensor w, Tensor? bias) -> Tensor
        x (..., K) float32 @ w (N, K)^T + bias
    linear_q(Tensor x, Tensor qs, Tensor d, Tensor? m, str fmt, Tensor? bias) -> Tensor
        the same with W in a GGUF block format (q4_0, q4_1, q8_0), laid out as lowbit.QuantWeight
    dequant(Tensor qs, Tensor d, Tensor? m, str fmt) -> Tensor
        the (N, K) fp32 weights of such blocks, as the kernels dequantize them (long prefills hand
        them to MKL a chunk of rows at a time); its twin is lowbit.dequantize
    layer(Tensor h, Tensor?[] w, str fmts, Tensor(a!) k_cache, Tensor(b!) v_cache, ...) -> Tensor
        one whole decoder layer for a few query rows (decode steps, verify passes), in one parallel
        region; its twin is model.Block's own forward (see `layer` below, csrc/cpu/layer.cpp)

The schemas live here, in the `cee_cpu` namespace (ops/__init__.py owns `cee_gen`), with the PyTorch
twins as their CompositeExplicitAutograd kernels and fake kernels for torch.compile, which keeps the
ops opaque (Inductor calls them; no graph break). The CPU kernels come from csrc/cpu/, compiled just
in time on first use with torch.utils.cpp_extension.load (ninja and a C++ compiler; ~1 min once, then
cached in TORCH_EXTENSIONS_DIR); if that fails the twins serve, with one warning saying why.

    CEE_GEN_CPU_KERNELS=0           never build or load the library (twins only)
    CEE_GEN_CPU_ISA=avx512|avx2|scalar   cap the instruction set (default: the best the CPU has)
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from cee_gen.errors import one_line
from cee_gen.ops import lowbit
from cee_gen.ops.lowbit import QuantWeight, linear_q_ref

CSRC = Path(__file__).resolve().parents[2] / "csrc" / "cpu"
SOURCES = ("linear.cpp", "linear_scalar.cpp", "linear_avx2.cpp", "linear_avx512.cpp", "layer.cpp",
           "layer_math.cpp")
SMALL_M = 128  # rows up to which the kernels beat MKL here (benchmarks/bench_cpu_linear.py); past it, MKL
NAME = "cee_gen_cpu"  # the library's name, and its folder under TORCH_EXTENSIONS_DIR
ISAS = ("scalar", "avx2", "avx512")  # index = the library's Isa enum

LINEAR_F32_SCHEMA = "linear_f32(Tensor x, Tensor w, Tensor? bias) -> Tensor"
LINEAR_Q_SCHEMA = "linear_q(Tensor x, Tensor qs, Tensor d, Tensor? m, str fmt, Tensor? bias) -> Tensor"
DEQUANT_SCHEMA = "dequant(Tensor qs, Tensor d, Tensor? m, str fmt) -> Tensor"
LAYER_SCHEMA = ("layer(Tensor h, Tensor?[] w, str fmts, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cos, "
                "Tensor sin, Tensor slots, Tensor? rows, Tensor mask, int n_heads, int n_kv_heads, "
                "float eps, Tensor? fill_h, Tensor? fill_slots, Tensor? fill_cos, Tensor? fill_sin, "
                "Tensor[] lr, int[] lr_meta) -> Tensor")


def linear_f32_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Twin of cee_cpu::linear_f32."""
    return F.linear(x, w, bias)


def dequant_ref(qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """Twin of cee_cpu::dequant."""
    N, K = qs.shape[0], qs.shape[1] * (1 if fmt == "q8_0" else 2)
    return lowbit.dequantize(QuantWeight(fmt, N, K, qs, d, m))


# The low-level Library API rather than torch.library.custom_op: a much cheaper call (ops/__init__.py).
_lib = torch.library.Library("cee_cpu", "DEF")
_lib.define(LINEAR_F32_SCHEMA)
_lib.define(LINEAR_Q_SCHEMA)
_lib.define(DEQUANT_SCHEMA)
_lib.define(LAYER_SCHEMA)  # a CPU kernel only (csrc/cpu/layer.cpp): callers check `ready` first
_lib.impl("linear_f32", linear_f32_ref, "CompositeExplicitAutograd")
_lib.impl("linear_q", linear_q_ref, "CompositeExplicitAutograd")
_lib.impl("dequant", dequant_ref, "CompositeExplicitAutograd")


@torch.library.register_fake("cee_cpu::linear_f32", lib=_lib)
def _(x, w, bias):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.register_fake("cee_cpu::linear_q", lib=_lib)
def _(x, qs, d, m, fmt, bias):
    return x.new_empty((*x.shape[:-1], qs.shape[0]))


@torch.library.register_fake("cee_cpu::dequant", lib=_lib)
def _(qs, d, m, fmt):
    return d.new_empty((qs.shape[0], qs.shape[1] * (1 if fmt == "q8_0" else 2)), dtype=torch.float32)


@torch.library.register_fake("cee_cpu::layer", lib=_lib)
def _(h, w, fmts, k_cache, v_cache, cos, sin, slots, rows, mask, n_heads, n_kv_heads, eps, fill_h, fill_slots,
      fill_cos, fill_sin, lr, lr_meta):
    return torch.empty_like(h)


_so: ctypes.CDLL | None = None  # the loaded library, or None (not tried, failed, or disabled)
_tried = False
ready = False  # the kernels are loaded: a plain bool, which torch.compile reads as a constant
_why_not: str | None = None  # why the kernels are not there, once tried


def _build(verbose: bool) -> str:
    from torch.utils.cpp_extension import _get_build_directory, load

    missing = [s for s in SOURCES if not (CSRC / s).exists()]
    if missing:
        raise RuntimeError(f"{CSRC} lacks {', '.join(missing)} (JIT builds need a source checkout)")
    build_dir = Path(_get_build_directory(NAME, verbose=False))
    if _stale(build_dir / f"{NAME}.so"):  # what torch will (re)compile: say so before the wait
        print(f"cee-gen: building the CPU kernels (csrc/cpu/, ~1 min, once; cached in {build_dir})",
              file=sys.stderr, flush=True)
    # -fopenmp: at::parallel_for's and layer.cpp's pragmas; libgomp.so.1 then resolves to the copy torch
    # already loaded. -fno-trapping-math: lets the compiler vectorize layer_math.inc's loops.
    return load(name=NAME, sources=[str(CSRC / s) for s in SOURCES],
                extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math"], extra_ldflags=["-fopenmp"],
                extra_include_paths=[str(CSRC)],
                is_python_module=False, verbose=verbose)


def _stale(lib: Path) -> bool:
    """Whether the built library is missing or older than a source (torch then compiles it again)."""
    if not lib.exists():
        return True
    built = lib.stat().st_mtime
    return any(p.stat().st_mtime > built for p in CSRC.iterdir() if p.suffix in (".cpp", ".h", ".inc"))


def load(verbose: bool = False) -> bool:
    """Build (first time) and load the CPU kernels once; whether they are there. Never raises."""
    global _so, _tried, _why_not, ready
    if _tried:
        return _so is not None
    _tried = True
    if os.environ.get("CEE_GEN_CPU_KERNELS", "1") == "0":
        _why_not = "disabled by CEE_GEN_CPU_KERNELS=0"
        return False
    try:
        path = _build(verbose)
        so = ctypes.CDLL(path)  # already loaded by torch: the same handle, for the ISA switches
        for fn in (so.cee_cpu_best_isa, so.cee_cpu_get_isa, so.cee_cpu_set_isa, so.cee_cpu_threads_used):
            fn.restype = ctypes.c_int
        so.cee_cpu_set_isa.argtypes = [ctypes.c_int]
        so.cee_cpu_threads_used.argtypes = [ctypes.c_long]
    except Exception as e:  # no compiler, no ninja, no sources, a compile error: the twins serve
        _why_not = one_line(e)
        warnings.warn(f"cee-gen: the CPU matmul kernels did not build ({_why_not}); linear layers run their "
                      "PyTorch twins (correct, slower). Fix: install a C++ compiler and `pip install ninja`, "
                      "run from a source checkout (csrc/cpu/), and see `python -c \"from cee_gen.ops import "
                      "cpu; cpu.load(verbose=True)\"`; or set CEE_GEN_CPU_KERNELS=0 to silence this.",
                      stacklevel=2)
        return False
    _so, ready = so, True
    cap = os.environ.get("CEE_GEN_CPU_ISA")
    if cap is not None and cap not in ISAS:
        warnings.warn(f"cee-gen: CEE_GEN_CPU_ISA={cap!r} is not one of {', '.join(ISAS)}: ignored",
                      stacklevel=2)
    return True


def available() -> bool:
    return load()


def why_not() -> str | None:
    """Why the kernels are not available (None when they are, or before the first try)."""
    return _why_not


def isa() -> str:
    """The variant that runs: 'avx512', 'avx2', 'scalar', or 'twin' (no library)."""
    return ISAS[_so.cee_cpu_get_isa()] if load() else "twin"


def best_isa() -> str:
    return ISAS[_so.cee_cpu_best_isa()] if load() else "twin"


def set_isa(name: str) -> str:
    """Cap the instruction set (for tests and comparisons); returns what then runs, as isa()."""
    if name not in ISAS:
        raise ValueError(f"unknown ISA {name!r}: use one of {', '.join(ISAS)}")
    return ISAS[_so.cee_cpu_set_isa(ISAS.index(name))] if load() else "twin"


def threads_used(tiles: int = 64) -> int:
    """How many threads one kernel call splits `tiles` 16-row tiles over (0 without the library)."""
    return _so.cee_cpu_threads_used(tiles) if load() else 0


def _library() -> bool:
    """Whether the library is loaded, loading it on the first call (never inside a compiled region: the
    Decoder loads it before it compiles)."""
    return _so is not None or not (_tried or torch.compiler.is_compiling() or not load())


def _kernel_for(x: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether the kernel serves this call: fp32 CPU activations, no gradient wanted, library built.
    Otherwise the wrappers call the twin directly, which torch.compile then traces as plain code.
    (Kept cheap: a decode step makes ~120 of these calls.)"""
    if not _library():
        return False
    if x.dtype != torch.float32 or not x.is_cpu:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (a is not None and a.requires_grad)
                                    or (b is not None and b.requires_grad)):
        return False  # the ops have no backward; the twin does
    return True


def linear_f32(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) for x (..., K), w (N, K); the kernel for fp32 CPU tensors."""
    if _kernel_for(x, w, bias) and w.dtype == torch.float32:
        return torch.ops.cee_cpu.linear_f32.default(x, w, bias)
    return linear_f32_ref(x, w, bias)


def linear_q(x: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ dequantize(qw)^T + bias, with qw a lowbit.QuantWeight (on the CPU)."""
    if _kernel_for(x, bias, None):
        return torch.ops.cee_cpu.linear_q.default(x, qw.qs, qw.d, qw.m, qw.fmt, bias)
    return linear_q_ref(x, qw.qs, qw.d, qw.m, qw.fmt, bias)


def dequantize(qw: QuantWeight) -> torch.Tensor:
    """The (N, K) fp32 weights of qw (a lowbit.QuantWeight on the CPU): the kernel, else its twin."""
    if _library():
        return torch.ops.cee_cpu.dequant.default(qw.qs, qw.d, qw.m, qw.fmt)
    return dequant_ref(qw.qs, qw.d, qw.m, qw.fmt)


__all__ = ["available", "isa", "best_isa", "set_isa", "load", "linear_f32", "linear_q", "dequantize",
           "QuantWeight", "lowbit", "why_not", "threads_used"]
