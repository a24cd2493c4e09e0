"""CPU matmul kernels (cee_gen/ops/cpu.py, csrc/cpu/) and the GGUF block formats (cee_gen/ops/lowbit.py).

The formats are checked against gguf-py itself (a tiny .gguf written and read back); each kernel, in
every instruction-set variant this CPU has, against its PyTorch twin on odd shapes, with the twin
computed in float64 as the truth: the kernel's error may be at most 2x the fp32 twin's (or a few ulps
of the result). Kernel tests skip, saying why, only when the library cannot build here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cee_gen.errors import CeeGenError
from cee_gen.ops import cpu, lowbit
from cee_gen.weights import gguf_file

gguf = pytest.importorskip("gguf")

FORMATS = ("q8_0", "q4_0", "q4_1")
GGML = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
        "q4_1": gguf.GGMLQuantizationType.Q4_1}
ISA_ORDER = ("scalar", "avx2", "avx512")

HAS_KERNELS = cpu.load()
needs_kernels = pytest.mark.skipif(not HAS_KERNELS, reason=f"the CPU kernels did not build: {cpu.why_not()}")

# (N, K, M): N not a multiple of the row tiles, K from one block up, M = 1..16 and beyond the 8-row pass.
SHAPES = [(1, 32, 1), (7, 64, 2), (33, 96, 3), (200, 576, 4), (7, 1536, 5), (33, 576, 6), (200, 64, 7),
          (1, 96, 8), (33, 32, 9), (7, 576, 12), (200, 1536, 16), (33, 576, 40)]


def weights(N: int, K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g) * K ** -0.5


@pytest.fixture(params=ISA_ORDER)
def isa(request):
    """Each variant the CPU has, forced through the library's cap; the best one is restored after."""
    if not HAS_KERNELS:
        pytest.skip(f"the CPU kernels did not build: {cpu.why_not()}")
    if ISA_ORDER.index(request.param) > ISA_ORDER.index(cpu.best_isa()):
        pytest.skip(f"this CPU has no {request.param} (best: {cpu.best_isa()})")
    prev = cpu.isa()
    assert cpu.set_isa(request.param) == request.param
    yield request.param
    cpu.set_isa(prev)


def assert_close_to_truth(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None):
    """y within a rounding bound of the float64 result, element by element: sqrt(K) ulps of the sum of
    |x_k w_k| (+ |bias|), the typical error of an fp32 sum of K products whatever its order (machines
    and libraries sum in different orders, so the fp32 twin's own error is no fixed yardstick). A wrong
    weight, a dropped block or an fp16 rounding of a weight is thousands of times larger."""
    truth = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
    mag = torch.nn.functional.linear(x.double().abs(), w.double().abs(),
                                     None if bias is None else bias.double().abs())
    bound = x.shape[-1] ** 0.5 * torch.finfo(torch.float32).eps * mag
    err = (y.double() - truth).abs()
    worst = (err / bound).max().item()
    assert worst <= 1, f"error {err.max().item():.3g}: {worst:.2f}x the rounding bound"


# ---- formats: gguf-py is the reference ----

def write_gguf(path, tensors: dict[str, tuple[np.ndarray, str]]) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    for name, (data, fmt) in tensors.items():
        w.add_tensor(name, gguf.quants.quantize(data, GGML[fmt]), raw_dtype=GGML[fmt])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_blocks_repack_to_gguf_py_dequantization_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    data = {f: rng.standard_normal((12, 96)).astype(np.float32) * 0.05 for f in FORMATS}
    data["q4_1"][3, :32] = 0.25  # a constant block: d = 0
    write_gguf(tmp_path / "tiny.gguf", {f"blk.0.{f}": (data[f], f) for f in FORMATS})
    reader = gguf.GGUFReader(str(tmp_path / "tiny.gguf"))
    seen = set()
    for t in reader.tensors:
        fmt = t.tensor_type.name.lower()
        qw = lowbit.from_gguf_blocks(t.data, t.tensor_type, name=t.name)
        assert (qw.fmt, qw.N, qw.K) == (fmt, 12, 96)
        expect = torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type))
        assert torch.equal(lowbit.dequantize(qw), expect), fmt
        assert torch.equal(lowbit.to_gguf_blocks(qw), torch.from_numpy(np.asarray(t.data)))
        seen.add(fmt)
    assert seen == set(FORMATS)


def test_the_header_index_is_gguf_pys_and_blocks_read_in_pieces_are_the_whole(tmp_path, monkeypatch):
    """gguf_tensor_index reads names, types, shapes, sizes and offsets from the header alone; blocks read
    a few rows at a time (READ_ROWS) repack to what from_gguf_blocks makes of the whole tensor."""
    from cee_gen.weights.gguf_file import GGUFTensors, gguf_tensor_index

    rng = np.random.default_rng(1)
    path = tmp_path / "meta.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(300)])  # metadata to skip over
    w.add_array("llama.some_ints", list(range(7)))
    w.add_string("general.name", "x" * 3000)
    w.add_float32("llama.eps", 1e-5)
    data = {f: rng.standard_normal((37, 64)).astype(np.float32) for f in FORMATS}
    for f in FORMATS:
        w.add_tensor(f"blk.0.{f}", gguf.quants.quantize(data[f], GGML[f]), raw_dtype=GGML[f])
    w.add_tensor("norm", rng.standard_normal(64).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(str(path))
    expect = {t.name: (t.tensor_type, tuple(reversed(t.shape.tolist())), int(t.n_bytes), int(t.data_offset))
              for t in reader.tensors}
    assert gguf_tensor_index(path) == expect
    monkeypatch.setattr(gguf_file, "READ_ROWS", 5)  # 37 rows in 8 pieces
    tensors = GGUFTensors(path)
    for t in reader.tensors:
        got = tensors.take(t.name)
        if t.name == "norm":
            assert torch.equal(got, torch.from_numpy(np.asarray(t.data)))
            continue
        whole = lowbit.from_gguf_blocks(t.data, t.tensor_type)
        assert torch.equal(got.qs, whole.qs) and torch.equal(got.d, whole.d)
        assert (got.m is None) == (whole.m is None) and (got.m is None or torch.equal(got.m, whole.m))


def test_an_unsupported_block_type_or_a_truncated_file_is_named_before_anything_is_built(tmp_path):
    from cee_gen.errors import ModelLoadError
    from cee_gen.weights.gguf_file import GGUFTensors, build_from_gguf

    path = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    x = np.random.default_rng(2).standard_normal((4, 256)).astype(np.float32)
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q5_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q5_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match=r"attn_q.weight.*Q5_0.*supported are q8_0, q4_0, q4_1") as e:
        build_from_gguf(None, path)
    assert "\n" not in str(e.value)
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    with pytest.raises(ModelLoadError, match="truncated"):
        GGUFTensors(path).take("blk.0.attn_q.weight")
    path.write_bytes(raw[:40])
    with pytest.raises(ModelLoadError, match="damaged"):
        GGUFTensors(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_gives_gguf_py_reference_blocks_byte_for_byte(fmt):
    w = weights(40, 192, seed=1)
    w[0, :32] = 0.0  # an all-zero block
    w[1, 32:64] = -0.5
    expect = gguf.quants.quantize(w.numpy(), GGML[fmt])
    assert torch.equal(lowbit.to_gguf_blocks(lowbit.quantize(w, fmt)), torch.from_numpy(expect))


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_dequantize_round_trip_within_half_a_step(fmt):
    w = weights(64, 256, seed=2)
    qw = lowbit.quantize(w, fmt)
    err = (lowbit.dequantize(qw) - w).abs().reshape(64, 8, 32)
    d = qw.d.float().abs()[..., None]  # (N, nb, 1) the block's step
    # half a step, plus the fp16 rounding of d (and m) that the quants were not chosen for; q4_0 puts
    # the block's largest magnitude at -8 steps, so the opposite extreme may clip by up to one step.
    scale = {"q8_0": 127, "q4_0": 8, "q4_1": 15}[fmt]
    bound = d * ((1.0 if fmt == "q4_0" else 0.5) + scale * 2.0**-10)
    if fmt == "q4_1":
        bound = bound + qw.m.float().abs()[..., None] * 2.0**-10
    assert (err <= bound + 1e-9).all()
    assert err.mean() < 0.3 * d.mean()


def test_unsupported_block_type_is_named_with_the_supported_ones():
    with pytest.raises(CeeGenError, match=r"Q4_K is not supported.*q8_0, q4_0, q4_1"):
        lowbit.from_gguf_blocks(np.zeros((2, 144), np.uint8), gguf.GGMLQuantizationType.Q4_K)
    with pytest.raises(lowbit.UnsupportedBlockType, match="q5_1"):
        lowbit.quantize(torch.zeros(2, 32), "q5_1")


def test_k_not_a_multiple_of_32_names_the_tensor():
    with pytest.raises(CeeGenError, match=r"'blk\.3\.ffn_down\.weight'.*multiple of 32"):
        lowbit.from_gguf_blocks(np.zeros((2, 30), np.uint8), "q4_1", name="blk.3.ffn_down.weight")
    with pytest.raises(lowbit.BadBlockShape, match="K=48"):
        lowbit.quantize(torch.zeros(2, 48), "q8_0")


# ---- kernels against their twins ----

@pytest.mark.parametrize("fmt", ("f32",) + FORMATS)
def test_kernel_matches_twin_on_odd_shapes_every_isa(isa, fmt):
    for i, (N, K, M) in enumerate(SHAPES):
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(M, K, generator=g)
        bias = torch.randn(N, generator=g) if i % 2 else None
        if fmt == "f32":
            w = weights(N, K, seed=i)
            y = torch.ops.cee_cpu.linear_f32(x, w, bias)
        else:
            qw = lowbit.quantize(weights(N, K, seed=i), fmt)
            w = lowbit.dequantize(qw)
            y = torch.ops.cee_cpu.linear_q(x, qw.qs, qw.d, qw.m, fmt, bias)
        assert y.shape == (M, N)
        assert_close_to_truth(y, x, w, bias)


@pytest.mark.parametrize("fmt", ("f32",) + FORMATS)
def test_a_rows_result_is_the_same_bit_for_bit_whatever_the_row_count(isa, fmt):
    """What keeps verify mode's multi-position pass equal to the single-token step (docs/verify.md)."""
    N, K = 77, 160
    g = torch.Generator().manual_seed(11)
    w = weights(N, K, seed=5)
    qw = None if fmt == "f32" else lowbit.quantize(w, fmt)

    def lin(x):
        return cpu.linear_f32(x, w) if qw is None else cpu.linear_q(x, qw)

    x = torch.randn(16, K, generator=g)
    alone = torch.cat([lin(x[i:i + 1]) for i in range(16)])
    for M in range(2, 17):
        assert torch.equal(lin(x[:M]), alone[:M]), M


@pytest.mark.parametrize("fmt", ("f32",) + FORMATS)
def test_kernel_takes_strided_and_batched_x(isa, fmt):
    N, K = 33, 96
    g = torch.Generator().manual_seed(7)
    w = weights(N, K, seed=3)
    qw = None if fmt == "f32" else lowbit.quantize(w, fmt)
    w = w if qw is None else lowbit.dequantize(qw)
    bias = torch.randn(N, generator=g)
    cases = [torch.randn(2, 3, K, generator=g),                 # leading batch dims
             torch.randn(5, 2 * K, generator=g)[:, ::2],         # stride 2 along K
             torch.randn(K, 4, generator=g).t(),                 # transposed
             torch.randn(3, 10, K, generator=g)[:, ::3],         # strided rows
             torch.randn(K, generator=g)]                        # a vector
    for x in cases:
        y = cpu.linear_f32(x, w, bias) if qw is None else cpu.linear_q(x, qw, bias)
        assert y.shape == (*x.shape[:-1], N)
        assert_close_to_truth(y.reshape(-1, N), x.reshape(-1, K), w, bias)


@needs_kernels
def test_empty_and_zero_rows():
    qw = lowbit.quantize(weights(7, 64, seed=0), "q4_1")
    assert cpu.linear_q(torch.zeros(0, 64), qw).shape == (0, 7)
    assert cpu.linear_f32(torch.zeros(2, 0), torch.zeros(5, 0), torch.ones(5)).eq(1).all()


@needs_kernels
def test_kernel_rejects_bad_arguments_with_a_message():
    qw = lowbit.quantize(weights(7, 64, seed=0), "q4_1")
    with pytest.raises(RuntimeError, match="unsupported block type 'q5_0'"):
        torch.ops.cee_cpu.linear_q(torch.randn(1, 64), qw.qs, qw.d, qw.m, "q5_0", None)
    with pytest.raises(RuntimeError, match="K=64"):
        torch.ops.cee_cpu.linear_q(torch.randn(1, 32), qw.qs, qw.d, qw.m, "q4_1", None)
    with pytest.raises(RuntimeError, match="needs the mins"):
        torch.ops.cee_cpu.linear_q(torch.randn(1, 64), qw.qs, qw.d, None, "q4_1", None)


# ---- dispatch, threads, registration ----

@needs_kernels
def test_isa_env_var_caps_the_variant_in_a_fresh_process():
    want = "avx2" if cpu.best_isa() == "avx512" else "scalar"  # a cap below what the CPU has
    env = dict(os.environ, CEE_GEN_CPU_ISA=want)
    code = "from cee_gen.ops import cpu; print(cpu.isa())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1:] == [want], out.stderr[-2000:]


@needs_kernels
def test_set_isa_caps_at_what_the_cpu_has():
    prev = cpu.isa()
    try:
        assert cpu.set_isa("avx512") == cpu.best_isa() if cpu.best_isa() != "avx512" else "avx512"
        assert cpu.set_isa("scalar") == "scalar"
    finally:
        cpu.set_isa(prev)
    with pytest.raises(ValueError, match="unknown ISA"):
        cpu.set_isa("neon")


@needs_kernels
def test_kernel_runs_on_torchs_threads():
    assert cpu.threads_used(64) == min(torch.get_num_threads(), 64)


@needs_kernels
def test_wrappers_fall_back_to_the_twin_for_grad_and_other_dtypes():
    w = weights(7, 64, seed=0).requires_grad_()
    x = torch.randn(3, 64)
    cpu.linear_f32(x, w).sum().backward()  # the op has no backward; the twin does
    assert w.grad is not None
    qw = lowbit.quantize(w.detach(), "q8_0")
    y = cpu.linear_q(x.to(torch.bfloat16), qw)
    assert y.dtype == torch.bfloat16


@needs_kernels
@pytest.mark.parametrize("fmt", ("f32", "q4_1"))
def test_opcheck(fmt):
    x, bias = torch.randn(3, 64), torch.randn(7)
    if fmt == "f32":
        torch.library.opcheck(torch.ops.cee_cpu.linear_f32, (x, weights(7, 64, seed=0), bias))
    else:
        qw = lowbit.quantize(weights(7, 64, seed=0), fmt)
        torch.library.opcheck(torch.ops.cee_cpu.linear_q, (x, qw.qs, qw.d, qw.m, fmt, bias))


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
def test_dequant_kernel_gives_its_twins_weights_bit_for_bit(fmt):
    """cee_cpu::dequant (long prefills' weights for MKL) against lowbit.dequantize, odd shapes, subnormal
    and zero scales included; and the op's schema, fake kernel and dispatch (opcheck)."""
    for i, (N, K) in enumerate([(1, 32), (7, 64), (33, 96), (200, 576), (7, 1536)]):
        qw = lowbit.quantize(weights(N, K, seed=i), fmt)
        qw.d[0, 0] = 2.0 ** -20  # a subnormal fp16 scale
        qw.d[-1, -1] = 0.0
        assert torch.equal(cpu.dequantize(qw), lowbit.dequantize(qw)), (N, K)
    torch.library.opcheck(torch.ops.cee_cpu.dequant, (qw.qs, qw.d, qw.m, fmt))


@needs_kernels
def test_compiled_function_using_the_ops_matches_eager_without_graph_breaks():
    w1, w2 = weights(96, 64, seed=0), lowbit.quantize(weights(48, 96, seed=1), "q4_1")
    bias = torch.randn(48)

    def mlp(x):
        return cpu.linear_q(torch.relu(cpu.linear_f32(x, w1)), w2, bias) * 2

    compiled = torch.compile(mlp, fullgraph=True, dynamic=False)
    for M in (1, 3):
        x = torch.randn(M, 64)
        assert torch.equal(compiled(x), mlp(x))


def test_a_build_of_the_kernels_is_announced_and_a_cached_one_is_not(tmp_path, monkeypatch, capsys):
    """The first use compiles csrc/cpu/ (~1 min): stderr says so before the wait; a library newer
    than every source is torch's cached build, and loads silently."""
    import torch.utils.cpp_extension as ext

    monkeypatch.setattr(ext, "_get_build_directory", lambda name, verbose: str(tmp_path))
    monkeypatch.setattr(ext, "load", lambda **kw: str(tmp_path / f"{cpu.NAME}.so"))
    cpu._build(verbose=False)
    assert "building the CPU kernels" in capsys.readouterr().err
    lib = tmp_path / f"{cpu.NAME}.so"
    lib.write_bytes(b"")
    newest = max(p.stat().st_mtime for p in cpu.CSRC.iterdir())
    os.utime(lib, (newest + 10, newest + 10))
    cpu._build(verbose=False)
    assert capsys.readouterr().err == ""
    os.utime(lib, (newest - 10, newest - 10))  # a source changed since: torch compiles again
    cpu._build(verbose=False)
    assert "building the CPU kernels" in capsys.readouterr().err
