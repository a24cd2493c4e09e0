"""Native ops (cee_gen/ops): the twins against a plain per-entry computation, the op registration
(opcheck, torch.compile), the optional build's decisions, the CUDA sources compiling with nvcc, and,
on a GPU with the extension, the kernels against their twins.

The GPU tests skip, saying why, where there is no CUDA device or the extension is not built.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from cee_gen import ops
from cee_gen.ops import native, reference

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
needs_kernel = pytest.mark.skipif(
    not (HAS_CUDA and native.available()),
    reason="needs a CUDA device and the built extension (CEE_GEN_BUILD_CUDA=1 pip install "
           "--no-build-isolation -e ., or CEE_GEN_JIT=1)" if HAS_CUDA else "needs a CUDA device: none here")

POISON = -512.0  # exact in every dtype; an entry still holding it was not written


def make_case(N=5, L=6, B=3, H=2, S=11, hd=8, D=24, dtype=torch.float32, device="cpu", bias=True,
              exits=None, seed=0):
    """Random inputs of kv_fill in real layouts; caches poisoned; distinct (row, slot) entries."""
    g = torch.Generator().manual_seed(seed)
    kv = H * hd

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)

    pairs = torch.randperm(B * S, generator=g)[:N]
    rows, slots = (pairs // S).to(device), (pairs % S).to(device)
    if exits is None:
        exits = torch.randint(1, L, (N,), generator=g)
    exits = torch.as_tensor(exits).to(device)
    pos = torch.randint(0, 100, (N, 1), generator=g).float()
    freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.cat([pos * freq, pos * freq], -1)  # (N, hd) rotate-half layout
    return dict(h=rnd(N, D, scale=3.0), w=rnd(L, 2 * kv, D, scale=D ** -0.5),
                bias=rnd(L, 2 * kv, scale=0.1) if bias else None,
                cos=ang.cos().to(dtype=dtype, device=device), sin=ang.sin().to(dtype=dtype, device=device),
                rows=rows, slots=slots, exit_layer=exits, first_layer=int(exits.min()),
                k_cache=[torch.full((B, H, S, hd), POISON, dtype=dtype, device=device) for _ in range(L)],
                v_cache=[torch.full((B, H, S, hd), POISON, dtype=dtype, device=device) for _ in range(L)],
                eps=1e-5, normalize=True)


FILL_ARGS = ("h", "w", "bias", "cos", "sin", "rows", "slots", "exit_layer", "first_layer", "k_cache",
             "v_cache", "eps", "normalize")


def call(op, case):
    args = [case[k] for k in FILL_ARGS]
    if case.get("uniform"):  # every entry exits at first_layer: the engine passes exit_layer None
        args[FILL_ARGS.index("exit_layer")] = None
    op(*args)


def plain_kv(case, n, j):
    """Entry n's K, V (H, hd) at layer j, one entry at a time in float64."""
    h = case["h"][n].double()
    H, hd = case["k_cache"][0].shape[1], case["k_cache"][0].shape[3]
    x = h / torch.sqrt(h.pow(2).mean() + case["eps"]) if case["normalize"] else h
    y = case["w"][j].double() @ x
    if case["bias"] is not None:
        y = y + case["bias"][j].double()
    k, v = y[:H * hd].view(H, hd), y[H * hd:].view(H, hd)
    c, s = case["cos"][n].double(), case["sin"][n].double()
    rot = torch.cat([-k[:, hd // 2:], k[:, :hd // 2]], -1)
    return k * c + rot * s, v


def assert_only_entries_written(case, expect):
    """expect(n, j) -> (k, v) or None: entries written as expected, every other cache value poisoned."""
    for j, (kc, vc) in enumerate(zip(case["k_cache"], case["v_cache"])):
        untouched_k = torch.ones_like(kc, dtype=torch.bool)
        untouched_v = torch.ones_like(vc, dtype=torch.bool)
        for n in range(len(case["rows"])):
            r, s = int(case["rows"][n]), int(case["slots"][n])
            want = expect(n, j)
            if want is None:
                continue
            untouched_k[r, :, s] = untouched_v[r, :, s] = False
            torch.testing.assert_close(kc[r, :, s].double(), want[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(vc[r, :, s].double(), want[1], atol=1e-4, rtol=1e-4)
        assert (kc[untouched_k] == POISON).all() and (vc[untouched_v] == POISON).all(), f"layer {j}"


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_kv_fill_twin_writes_each_entrys_skipped_layers_and_nothing_else(normalize, bias):
    case = make_case(bias=bias, exits=[1, 3, 5, 2, 6])  # 6 = L: that entry writes nothing
    case["normalize"] = normalize
    call(ops.kv_fill, case)
    exits = case["exit_layer"].tolist()
    assert_only_entries_written(case, lambda n, j: plain_kv(case, n, j) if j >= exits[n] else None)


def test_kv_fill_twin_treats_exits_below_first_layer_as_first_layer():
    case = make_case(exits=[1, 1, 2, 4, 1])
    case["first_layer"] = 2  # the caller promises the layers below 2 are not to be written
    call(ops.kv_fill, case)
    exits = case["exit_layer"].tolist()
    assert_only_entries_written(case, lambda n, j: plain_kv(case, n, j) if j >= max(exits[n], 2) else None)


def test_kv_copy_twin_repeats_layer_e_minus_1_per_entry():
    case = make_case(exits=[1, 3, 5, 2, 6])
    src = [(torch.randn_like(k), torch.randn_like(v)) for k, v in zip(case["k_cache"], case["v_cache"])]
    for (k, v), (sk, sv) in zip(zip(case["k_cache"], case["v_cache"]), src):
        k.copy_(sk)
        v.copy_(sv)
    ops.kv_copy(case["rows"], case["slots"], case["exit_layer"], 1, case["k_cache"], case["v_cache"])
    exits = case["exit_layer"].tolist()
    for j in range(len(src)):
        for n in range(5):
            r, s, e = int(case["rows"][n]), int(case["slots"][n]), exits[n]
            want = src[e - 1] if j >= e else src[j]
            assert torch.equal(case["k_cache"][j][r, :, s], want[0][r, :, s])
            assert torch.equal(case["v_cache"][j][r, :, s], want[1][r, :, s])


def test_kv_copy_without_a_computed_layer_is_rejected():
    case = make_case(exits=[0, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="at least one computed layer"):
        ops.kv_copy(case["rows"], case["slots"], case["exit_layer"], 0, case["k_cache"], case["v_cache"])


def test_ops_pass_opcheck_schema_fake_and_aot_dispatch():
    case = make_case()
    torch.library.opcheck(torch.ops.cee_gen.kv_fill.default, tuple(case[k] for k in FILL_ARGS))
    torch.library.opcheck(torch.ops.cee_gen.kv_copy.default,
                          (case["rows"], case["slots"], case["exit_layer"], 1, case["k_cache"],
                           case["v_cache"]))


@pytest.mark.parametrize("how", ["op", "wrapper, one exit layer"])
def test_kv_fill_inside_a_compiled_graph_equals_eager(how):
    """The op (as the CUDA kernel runs under torch.compile) and the wrapper's path on the CPU (the
    twin traced whole: with exit_layer None it has no sync) compile to one graph and match eager."""
    op = torch.ops.cee_gen.kv_fill if how == "op" else ops.kv_fill
    eager, compiled = make_case(), make_case()
    if how != "op":
        eager["exit_layer"] = compiled["exit_layer"] = None

    def f(c):
        call(op, c)
        return c["k_cache"][-1].sum()

    f(eager)
    torch.compile(f, backend="aot_eager", fullgraph=True)(compiled)
    for a, b in zip(eager["k_cache"] + eager["v_cache"], compiled["k_cache"] + compiled["v_cache"]):
        assert torch.equal(a, b)
    assert (eager["k_cache"][-1] != POISON).any()  # something was written


# ---- the optional build -------------------------------------------------------------------------


def _setup_module():
    spec = importlib.util.spec_from_file_location("cee_gen_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines the plan; setup() runs only as __main__
    return mod


@pytest.mark.parametrize("flag, torch_cuda, cuda_home, build", [
    (None, "12.4", "/usr/local/cuda", True),
    ("1", "12.4", "/usr/local/cuda", True),
    ("0", "12.4", "/usr/local/cuda", False),
    (None, None, "/usr/local/cuda", False),  # CPU torch: the CPU-only install stays pure Python
    (None, False, None, False),  # isolated build env without torch
    (None, "12.4", None, False),
])
def test_build_plan_builds_only_where_it_can(flag, torch_cuda, cuda_home, build):
    assert _setup_module().cuda_build_plan(flag, torch_cuda, cuda_home)[0] is build


@pytest.mark.parametrize("torch_cuda, cuda_home, says", [
    (None, "/usr/local/cuda", "CPU build"), (False, None, "--no-build-isolation"),
    ("12.4", None, "CUDA_HOME")])
def test_forced_build_that_cannot_build_fails_loudly(torch_cuda, cuda_home, says):
    with pytest.raises(SystemExit, match=says):
        _setup_module().cuda_build_plan("1", torch_cuda, cuda_home)


def test_bad_build_flag_is_rejected():
    with pytest.raises(SystemExit, match="CEE_GEN_BUILD_CUDA='yes'"):
        _setup_module().cuda_build_plan("yes", "12.4", "/usr/local/cuda")


NVCC = shutil.which("nvcc")


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA source compile check needs it")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_kernels_compile_with_nvcc(arch, tmp_path):
    out = subprocess.run([NVCC, "-std=c++17", "-O3", f"-arch={arch}", "-Werror", "all-warnings",
                          "-c", str(ROOT / "csrc" / "kv_fill_kernel.cu"), "-o", str(tmp_path / "k.o")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the binding check needs the CUDA headers")
def test_torch_binding_compiles_against_torch_and_cuda_headers(tmp_path):
    inc = Path(torch.__file__).parent / "include"
    (tmp_path / "x.cu").write_text("")  # nvcc's dry run names the toolkit's include directories
    dry = subprocess.run([NVCC, "-dryrun", "-c", str(tmp_path / "x.cu")], capture_output=True, text=True)
    cuda_inc = re.findall(r'-I"?([^" ]+)', "".join(ln for ln in dry.stderr.splitlines() if "INCLUDES=" in ln))
    assert cuda_inc, dry.stderr
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    # A CPU build of torch lacks c10/cuda's generated macros header; the define stands in for it.
    out = subprocess.run([cxx, "-std=c++20", "-fsyntax-only", "-DC10_USING_CUSTOM_GENERATED_MACROS",
                          f"-I{inc}", f"-I{inc / 'torch/csrc/api/include'}", *(f"-I{d}" for d in cuda_inc),
                          f"-I{sysconfig.get_paths()['include']}", str(ROOT / "csrc" / "kv_fill.cpp")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_without_the_extension_cpu_ops_run_the_twin():
    if native.available():
        pytest.skip("the extension is loaded here; this checks the pure-Python install")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("cee_gen::kv_fill", "CUDA")
    case = make_case()
    call(ops.kv_fill, case)
    twin = make_case()
    call(reference.kv_fill_ref, twin)
    assert all(torch.equal(a, b) for a, b in zip(case["k_cache"], twin["k_cache"]))


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU build of torch")
def test_jit_build_on_a_cpu_torch_warns_once_and_the_twins_serve(monkeypatch):
    monkeypatch.setenv("CEE_GEN_JIT", "1")
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_loaded", None)
    with pytest.warns(UserWarning, match="CEE_GEN_JIT=1 but the CUDA extension did not build.*CPU build"):
        assert native.load() is None
    assert native.load() is None  # tried once per process
    with pytest.raises(RuntimeError, match="CPU build"):
        native.jit_build(verbose=False)


# ---- GPU: the kernels against their twins ------------------------------------------------------

# Shapes: (N entries, L, B, H_kv, S, hd, D). GQA/MHA, head sizes 64, 80, 128, a D that is not a
# multiple of 8 (the scalar path), batch 1 and more entries than one chunk of 8.
SHAPES = [(1, 30, 1, 3, 64, 64, 576), (3, 8, 4, 8, 40, 128, 1024), (9, 5, 3, 4, 17, 80, 640),
          (2, 4, 2, 2, 9, 64, 100), (17, 6, 8, 2, 33, 64, 256)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


DEVICE = "cuda"  # tests of the test code itself set it to "cpu", where the twin stands in for the kernel


def _cuda_case(shape, dtype, seed, bias=True, normalize=True, uniform=False):
    N, L, B, H, S, hd, D = shape
    exits = torch.randint(1, L + 1, (N,), generator=torch.Generator().manual_seed(seed))
    if uniform:
        exits = torch.full((N,), L // 2)
    c = make_case(N, L, B, H, S, hd, D, dtype=dtype, device=DEVICE, bias=bias, exits=exits, seed=seed)
    c["normalize"], c["uniform"] = normalize, uniform
    return c


def _written(case):
    """(N, L, 2, H, hd) what the op wrote, NaN where it must not have written; and the poison check."""
    out = []
    for n in range(len(case["rows"])):
        r, s = int(case["rows"][n]), int(case["slots"][n])
        out.append(torch.stack([torch.stack([k[r, :, s], v[r, :, s]]) for k, v in
                                zip(case["k_cache"], case["v_cache"])]))
    return torch.stack(out).double()


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("normalize, uniform", [(True, False), (False, False), (True, True)],
                         ids=["propagate-mixed-exits", "raw-mixed-exits", "propagate-one-exit-layer"])
def test_kv_fill_kernel_error_is_at_most_twice_the_twins(dtype, shape, normalize, uniform):
    kernel, twin, ref = (_cuda_case(shape, dt, seed=1, normalize=normalize, uniform=uniform)
                         for dt in (dtype, dtype, torch.float64))  # ref: the twin in float64
    call(torch.ops.cee_gen.kv_fill, kernel)  # the CUDA kernel (registered for the CUDA key)
    call(reference.kv_fill_ref, twin)  # the twin, called directly, in the same dtype
    call(reference.kv_fill_ref, ref)
    k, t, r = _written(kernel), _written(twin), _written(ref)
    written = r != POISON
    assert torch.equal(k == POISON, ~written) and torch.equal(t == POISON, ~written)
    err_k = (k - r)[written].abs().max().item()
    err_t = (t - r)[written].abs().max().item()
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    assert err_k <= 2 * err_t + floor, (err_k, err_t)
    assert_poison_elsewhere(kernel)


def assert_poison_elsewhere(case):
    for j, (kc, vc) in enumerate(zip(case["k_cache"], case["v_cache"])):
        mask = torch.ones(kc.shape[0], kc.shape[2], dtype=torch.bool, device=kc.device)
        for n in range(len(case["rows"])):
            if int(case["exit_layer"][n]) <= j:
                mask[int(case["rows"][n]), int(case["slots"][n])] = False
        for c in (kc, vc):
            assert (c.transpose(1, 2)[mask] == POISON).all(), f"layer {j}: a value outside the entries"


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kv_copy_kernel_equals_twin(dtype):
    kernel, twin = (_cuda_case((9, 7, 3, 4, 17, 80, 64), dtype, seed=2) for _ in range(2))
    for c in (kernel, twin):
        g = torch.Generator().manual_seed(3)
        for t in c["k_cache"] + c["v_cache"]:
            t.copy_(torch.randn(t.shape, generator=g))
    args = lambda c: (c["rows"], c["slots"], c["exit_layer"], 1, c["k_cache"], c["v_cache"])  # noqa: E731
    torch.ops.cee_gen.kv_copy(*args(kernel))
    reference.kv_copy_ref(*args(twin))
    assert all(torch.equal(a, b) for a, b in zip(kernel["k_cache"] + kernel["v_cache"],
                                                 twin["k_cache"] + twin["v_cache"]))


@needs_kernel
def test_cuda_kernels_are_registered_and_pass_opcheck():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("cee_gen::kv_fill", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("cee_gen::kv_copy", "CUDA")
    c = _cuda_case((3, 5, 2, 2, 9, 64, 128), torch.bfloat16, seed=4)
    torch.library.opcheck(torch.ops.cee_gen.kv_fill.default, tuple(c[k] for k in FILL_ARGS))


@needs_kernel
def test_kv_fill_kernel_is_captured_by_a_cuda_graph():
    eager, graphed = (_cuda_case((2, 6, 2, 2, 9, 64, 128), torch.bfloat16, seed=5) for _ in range(2))
    call(torch.ops.cee_gen.kv_fill, eager)
    g = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        call(torch.ops.cee_gen.kv_fill, graphed)
    g.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(eager["k_cache"], graphed["k_cache"]))


def test_twin_on_cuda_without_the_extension_says_so_once(monkeypatch):
    """The notice reads only the tensor's device: a stand-in for a CUDA tensor tests it anywhere."""
    from types import SimpleNamespace

    monkeypatch.setattr(native, "_noticed", False)
    monkeypatch.setattr(native, "available", lambda: False)
    t = SimpleNamespace(is_cuda=True)
    with pytest.warns(UserWarning, match="not built"):
        native.notice_if_twin(t)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second notice would raise here
        native.notice_if_twin(t)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
