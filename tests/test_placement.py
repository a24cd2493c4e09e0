"""A model split across devices (`device_map`, cee_gen/placement.py).

On the CPU, maps with several segments on the one CPU run every piece of the split code (a step per
segment device, h moved at each boundary, the KV cache per layer, the KV fill per segment, copy-kv
across a boundary) with transfers that cost nothing; a segment on the `meta` device shows that each
tensor lands where the map says and that the fill writes each segment on its own device. A real
split across a GPU and the CPU, or two GPUs, is tested where they exist; those tests skip, saying
why, elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny_checkpoint

import cee_gen
from cee_gen import ExitConfig
from cee_gen.engine import Decoder
from cee_gen.errors import CeeGenError
from cee_gen.kv_fill import KVFiller
from cee_gen.model import ModelArgs
from cee_gen.weights import placement
from cee_gen.weights.loading import build_transformer

PROMPTS = ["the quick brown fox", "give three tips", "a b c d e f", "z"]
GIB = 2 ** 30
CPU, META = torch.device("cpu"), torch.device("meta")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny4-split")
    make_tiny_checkpoint(path, n_layers=4, seed=3)
    return str(path)


@pytest.fixture(scope="module")
def whole(ckpt):
    return cee_gen.load_model(ckpt, dtype="float32", device="cpu")


def _run(model, ex):
    res = cee_gen.generate(model, PROMPTS, max_new_tokens=12, batch_size=len(PROMPTS),
                           **({} if ex is None else {"exit": ex}))
    return [r.token_ids for r in res], [r.stats["layers_per_token"] for r in res]


@pytest.mark.parametrize("ex", [
    None,
    ExitConfig(strategy="static", exit_layer=1),  # the fill crosses from the first segment on
    ExitConfig(strategy="confidence", threshold=0.5),
    ExitConfig(strategy="entropy", threshold=0.5, kv_fill="copy-kv"),  # copy across a boundary
    ExitConfig(strategy="patience", patience=1, kv_fill="propagate-raw"),
    ExitConfig(strategy="confidence", threshold=0.5, kv_fill="recompute"),
], ids=["full", "static1", "confidence", "copy-kv", "propagate-raw", "recompute"])
@pytest.mark.parametrize("spec", ["cpu=1,cpu=3", "cpu=2,cpu=1,cpu=1"])
def test_split_model_gives_the_whole_models_tokens_and_exit_layers(ckpt, whole, spec, ex):
    split = cee_gen.load_model(ckpt, dtype="float32", device_map=spec)
    assert len(split.net.segments) == spec.count(",") + 1
    ids_w, layers_w = _run(whole, ex)
    ids_s, layers_s = _run(split, ex)
    assert ids_s == ids_w
    assert layers_s == layers_w
    if ex is not None and ex.strategy != "static":
        assert len({d for ls in layers_w for d in ls[1:]}) > 1, "every token exited at one layer"


def test_split_model_reports_its_map(ckpt):
    split = cee_gen.load_model(ckpt, dtype="float32", device_map="cpu=1,cpu=3")
    [r] = cee_gen.generate(split, "a b", max_new_tokens=2)
    assert r.stats["device_map"] == "cpu=1,cpu=3"
    whole = cee_gen.load_model(ckpt, dtype="float32", device_map="cpu=4")  # one segment: not split
    assert whole.net.segments is None


def _tiny_net(ckpt):
    """The checkpoint's Transformer alone, on the CPU (no tokenizer, not placed)."""
    from transformers import AutoConfig

    from cee_gen.weights.loading import _read_state_dict

    args = ModelArgs.from_hf_config(AutoConfig.from_pretrained(ckpt))
    return build_transformer(args, _read_state_dict(Path(ckpt)), torch.float32, CPU)


def test_each_layer_its_cache_and_its_fill_weights_go_to_the_segments_device(ckpt):
    net = _tiny_net(ckpt)
    placement.place(net, placement.Placement(home=CPU, segments=[(0, 2, CPU), (2, 4, META)]))
    assert net.tok_embeddings.weight.device == net.output.weight.device == net.norm.weight.device == CPU
    assert net.output.weight is net.tok_embeddings.weight, "tied weights stay tied"
    for i, blk in enumerate(net.layers):
        assert {p.device for p in blk.parameters()} == {CPU if i < 2 else META}
    cache = Decoder(net).new_cache(2, 16)
    assert [t.device for t in cache.k] == [t.device for t in cache.v] == [CPU, CPU, META, META]
    f = KVFiller(net)
    assert [w.device for w in f.stacks()[1]] == [CPU, META] and [w.shape[0] for w in f.stacks()[1]] == [2, 2]


@pytest.mark.parametrize("mode", ["propagate", "copy-kv"])
@pytest.mark.parametrize("exit_layer", [1, 2, 3])
def test_fill_writes_each_segment_on_its_own_device(ckpt, mode, exit_layer):
    """Layers on meta take no data, so any tensor the fill forgot to move raises a device error."""
    net = _tiny_net(ckpt)
    placement.place(net, placement.Placement(home=CPU, segments=[(0, 2, CPU), (2, 4, META)]))
    cache = Decoder(net).new_cache(2, 16)
    for t in cache.k[:2] + cache.v[:2]:
        t.normal_()
    with torch.inference_mode():
        step = net.make_step(torch.tensor([5]), torch.zeros(2, dtype=torch.long), 16, 6)
        before = [t.clone() for t in cache.k[:2]]
        h = torch.randn(2, 1, net.args.dim)
        KVFiller(net).fill(cache, h, exit_layer, step, mode)
    for j in range(exit_layer, 2):  # the CPU segment's skipped layers got the entries
        if mode == "copy-kv":
            torch.testing.assert_close(cache.k[j][:, :, 5], before[exit_layer - 1][:, :, 5])
        else:
            assert not torch.equal(cache.k[j][:, :, 5], before[j][:, :, 5])
    for j in range(2):  # nothing else touched
        torch.testing.assert_close(cache.k[j][:, :, :5], before[j][:, :, :5])
        if j < exit_layer:
            torch.testing.assert_close(cache.k[j], before[j])


def test_forward_moves_the_hidden_state_and_the_step_to_a_segment(ckpt):
    """Layers 2-3 on meta: every tensor they meet must be on meta (elementwise ops check devices);
    the hidden state comes back home at the end, which from meta cannot carry data."""
    net = _tiny_net(ckpt)
    placement.place(net, placement.Placement(home=CPU, segments=[(0, 2, CPU), (2, 4, META)]))
    cache = Decoder(net).new_cache(1, 8)
    with torch.inference_mode():
        step = net.make_step(torch.arange(3), torch.zeros(1, dtype=torch.long), 8, 3)
        h = net.forward_layers(net.embed(torch.tensor([[5, 6, 7]])), 0, 2, step, cache)
        assert h.device == CPU and cache.filled == [0] * 4
        with pytest.raises(NotImplementedError, match="Cannot copy out of meta"):
            net.forward_layers(h, 2, 4, step, cache)  # the layers ran on meta; only the way home fails
        assert set(step._on) == {META}


@pytest.mark.parametrize("free, want", [
    ({0: 80 * GIB, 1: 80 * GIB}, [15, 17]),  # Llama-2-7B-like on two GPUs: GPU 0 also holds the home
    ({0: 80 * GIB, 1: 80 * GIB, 2: 80 * GIB}, [10, 11, 11]),
    ({0: 12 * GIB, 1: 40 * GIB}, None),  # a small GPU 0 takes what fits
    ({0: 40 * GIB, 1: 4 * GIB}, None),  # a small GPU 1: the rest goes back to GPU 0
])
def test_balance_spreads_bytes_evenly_within_each_gpus_memory(free, want):
    home, layer, L = int(0.5 * GIB), int(0.4 * GIB), 32
    counts = placement.balance(home, layer, L, free)
    assert sum(counts) == L
    caps = [free[g] * (1 - placement.RESERVE) for g in sorted(free)]
    used = [c * layer + (home if i == 0 else 0) for i, c in enumerate(counts)]
    assert all(u <= c for u, c in zip(used, caps))
    if want is not None:
        assert counts == want
        assert max(used) - min(used) <= 2 * layer


def test_balance_says_how_much_is_missing():
    with pytest.raises(CeeGenError, match=r"needs 33.0 GiB .* 27.0 GiB"):
        placement.balance(GIB, GIB, 32, {0: 20 * GIB, 1: 10 * GIB})


def test_module_bytes_counts_the_home_modules_and_one_layer(ckpt):
    net = _tiny_net(ckpt)
    home, layer = placement.module_bytes(net)
    a = net.args
    assert home == 4 * (a.vocab_size * a.dim + a.dim)  # tied: the LM head is the embedding
    assert layer == 4 * sum(p.numel() for p in net.layers[0].parameters())


@pytest.mark.parametrize("spec, words", [
    ("cpu=3", "places 3 layers, but the model has 4"),
    ("cpu=2,cpu", "write DEV=N"),
    ("cpu=0,cpu=4", "write DEV=N"),
    ("gpu=4", "unknown device"),
    ("cuda:0=2,cpu=2", "CUDA GPU"),
])
def test_bad_device_maps_are_clear_errors(ckpt, spec, words):
    if "cuda" in spec and torch.cuda.is_available():
        pytest.skip("checks a machine without CUDA")
    with pytest.raises(CeeGenError, match=words):
        cee_gen.load_model(ckpt, dtype="float32", device_map=spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_device_map_auto_without_a_gpu_says_what_to_do(ckpt):
    with pytest.raises(CeeGenError, match="auto splits the model across CUDA GPUs"):
        cee_gen.load_model(ckpt, device_map="auto")


def test_quantize_with_a_device_map_is_refused(ckpt):
    with pytest.raises(CeeGenError, match="quantize with a device map"):
        cee_gen.load_model(ckpt, quantize="8bit", device_map="cpu=4")


def test_cli_device_map_reaches_the_model(ckpt, capsys):
    import json

    from cee_gen.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--model", ckpt, "--dtype", "float32", "--device-map", "cpu=1,cpu=3", "--json",
              "--max-new-tokens", "3", "hi"])
    assert e.value.code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["stats"]["device_map"] == "cpu=1,cpu=3"


# ---- real devices --------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: none here")
@pytest.mark.parametrize("ex", [None, ExitConfig(strategy="confidence", threshold=0.5),
                                ExitConfig(strategy="entropy", threshold=0.5, kv_fill="copy-kv")])
def test_split_across_a_gpu_and_the_cpu_gives_the_whole_models_tokens(ckpt, ex):
    whole = cee_gen.load_model(ckpt, dtype="float32", device="cuda")
    split = cee_gen.load_model(ckpt, dtype="float32", device_map="cuda:0=2,cpu=2")
    assert split.net.layers[3].attention.wqkv.weight.device == CPU
    assert _run(split, ex) == _run(whole, ex)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_device_map_auto_on_two_gpus_gives_the_whole_models_tokens(ckpt):
    whole = cee_gen.load_model(ckpt, dtype="float32", device="cuda:0")
    split = cee_gen.load_model(ckpt, dtype="float32", device_map="cuda:0=2,cuda:1=2")
    assert _run(split, ExitConfig(strategy="confidence", threshold=0.5)) == \
        _run(whole, ExitConfig(strategy="confidence", threshold=0.5))
