"""Load a LLaMA-family checkpoint into our `Transformer`.

Sources: a local HF checkpoint folder (safetensors or .bin shards), a `.gguf` file (converted once to
safetensors in the cache, see weights/default_model.py), a hub id (when a hub is reachable), or None for the
embedded default model. HF transformers supplies the config and the tokenizer; the weights are read
with safetensors and renamed into our fused layout (q|k|v -> wqkv, gate|up -> w13).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cee_gen.config import LoadConfig
from cee_gen.errors import CeeGenError, ModelLoadError, one_line
from cee_gen.model import ModelArgs, Transformer
from cee_gen.ops import flash
from cee_gen.ops.lowbit import FORMATS
from cee_gen.weights import gguf_file, lowbit, placement
from cee_gen.weights.provenance import Provenance
from cee_gen.weights.quant import quantize_

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Model:
    """A loaded model: our network, its tokenizer, where it came from and what weights it carries."""

    net: Transformer
    tokenizer: object
    args: ModelArgs
    name: str
    path: Path
    eos_token_ids: list[int]
    pad_token_id: int
    meta: dict = field(default_factory=dict)
    weights: Provenance = field(default_factory=Provenance)  # merged LoRA, quantization, base probe
    decoders: dict = field(default_factory=dict, repr=False)  # (compile, mode) -> engine.Decoder
    exit_heads: dict = field(default_factory=dict, repr=False)  # heads path (None: logit lens) -> ExitHeads
    cascade_models: dict = field(default_factory=dict, repr=False)  # path -> small Model (cascade)

    @property
    def device(self) -> torch.device:
        return self.net.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.dtype

    @property
    def n_layers(self) -> int:
        return self.args.n_layers


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CeeGenError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CeeGenError(f"device {device!r} asked for, but this machine has no usable CUDA GPU: "
                          "use device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise CeeGenError(f"device type {dev.type!r} is not supported: use cpu or cuda")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """A LoadConfig dtype (validated) as a torch dtype: auto is bfloat16 on CUDA, float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def resolve_checkpoint(name_or_path: str | None) -> Path:
    """A local HF folder for the requested model, fetching/converting it once if needed."""
    if name_or_path is None:
        from cee_gen.weights.default_model import ensure_default_model

        return ensure_default_model()
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} has no config.json: pass a Hugging Face checkpoint folder "
                                 "(config.json + *.safetensors + tokenizer files) or a .gguf file")
        return p
    if p.is_file():
        if p.suffix == ".gguf":
            from cee_gen.weights.default_model import ensure_converted_gguf

            return ensure_converted_gguf(p)
        raise ModelLoadError(f"{p} is a file but not a .gguf: pass a checkpoint folder or a .gguf file")
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
    if looks_local:
        raise ModelLoadError(f"model path {name_or_path!r} does not exist: pass an existing "
                             "checkpoint folder or .gguf file, or leave the model out for the default one")
    return _download_from_hub(name_or_path)


def auto_weights(name_or_path: str | None, dtype: str, dev: torch.device | None, quantize: str,
                 device_map: str | None) -> str:
    """What weights="auto" loads: "gguf" (a GGUF's own blocks: the same weights as its floats, the same
    logits, a fifth of the bytes) for the default model or a .gguf file, on the CPU in float32, with the
    CPU kernels built and every block type one they read; "fp" otherwise (a GPU, bfloat16, bitsandbytes,
    a device map, an HF checkpoint, a file with other block types: said on stderr)."""
    from cee_gen.ops import cpu

    if quantize != "none" or device_map is not None or dev is None or dev.type != "cpu" \
            or resolve_dtype(dtype, dev) != torch.float32:
        return "fp"
    if name_or_path is not None and not (Path(name_or_path).expanduser().is_file()
                                         and name_or_path.endswith(".gguf")):
        return "fp"
    if not cpu.load():  # the kernels did not build (cpu.load warned why): floats through torch
        return "fp"
    path = resolve_gguf(name_or_path)
    others = sorted({kind.name for kind, *_ in gguf_file.gguf_tensor_index(path).values()}
                    - {"F32", "F16", *(f.upper() for f in FORMATS)})
    if others:
        print(f"cee-gen: {path.name} holds {', '.join(others)} blocks, which the CPU kernels do not read: "
              "loading its floats (weights fp)", file=sys.stderr)
        return "fp"
    return "gguf"


def resolve_gguf(name_or_path: str | None) -> Path:
    """The GGUF file whose own blocks `weights="gguf"` reads: the default model's, or the one given."""
    if name_or_path is None:
        from cee_gen.weights.default_model import ensure_default_gguf

        return ensure_default_gguf()
    p = Path(name_or_path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p
    raise ModelLoadError(f"weights gguf reads a GGUF file's own blocks, and {name_or_path} is not a .gguf "
                         "file: "
                         "pass a .gguf model, or quantize this checkpoint with weights q8_0, q4_1 or q4_0")


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))
    except Exception as e:  # offline, unknown repo, gated repo: all one message for the user
        raise ModelLoadError(f"could not fetch {repo_id!r} from the Hugging Face hub ({one_line(e)}): "
                             "check the name and the network, or pass a local folder") from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if files:
        sd = {}
        for f in files:
            try:
                sd.update(load_file(f))
            except Exception as e:
                raise ModelLoadError(f"cannot read weights {f} ({one_line(e)}): the file is damaged or "
                                     "incomplete; re-download or re-convert it") from None
        return sd
    files = sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise ModelLoadError(f"no *.safetensors or pytorch_model*.bin weights in {path}")
    sd = {}
    for f in files:
        try:
            sd.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:
            raise ModelLoadError(f"cannot read weights {f} ({one_line(e)}): the file is damaged") from None
    return sd


def convert_hf_state_dict(sd: dict[str, torch.Tensor], a: ModelArgs) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM names -> ours, fusing q|k|v into wqkv and gate|up into w13."""
    sd = {re.sub(r"^model\.", "", k): v for k, v in sd.items()}
    out = {"tok_embeddings.weight": sd.pop("embed_tokens.weight"), "norm.weight": sd.pop("norm.weight")}
    if "lm_head.weight" in sd and not a.tie_word_embeddings:
        out["output.weight"] = sd.pop("lm_head.weight")
    for i in range(a.n_layers):
        p = q = f"layers.{i}."
        at, mlp = p + "self_attn.", p + "mlp."
        out[q + "attention.wqkv.weight"] = torch.cat(
            [sd.pop(at + f"{n}_proj.weight") for n in "qkv"])
        if a.qkv_bias:
            out[q + "attention.wqkv.bias"] = torch.cat([sd.pop(at + f"{n}_proj.bias") for n in "qkv"])
        out[q + "attention.wo.weight"] = sd.pop(at + "o_proj.weight")
        if a.o_bias:
            out[q + "attention.wo.bias"] = sd.pop(at + "o_proj.bias")
        out[q + "feed_forward.w13.weight"] = torch.cat(
            [sd.pop(mlp + "gate_proj.weight"), sd.pop(mlp + "up_proj.weight")])
        out[q + "feed_forward.w2.weight"] = sd.pop(mlp + "down_proj.weight")
        if a.mlp_bias:
            out[q + "feed_forward.w13.bias"] = torch.cat(
                [sd.pop(mlp + "gate_proj.bias"), sd.pop(mlp + "up_proj.bias")])
            out[q + "feed_forward.w2.bias"] = sd.pop(mlp + "down_proj.bias")
        out[q + "attention_norm.weight"] = sd.pop(p + "input_layernorm.weight")
        out[q + "ffn_norm.weight"] = sd.pop(p + "post_attention_layernorm.weight")
    return out


def to_hf_state_dict(net: Transformer) -> dict[str, torch.Tensor]:
    """Ours -> HF LlamaForCausalLM names (the inverse of convert_hf_state_dict), with the weights
    as they are now: LoRA deltas merged into `net` are in them. Lets HF run the same weights."""
    a, sd = net.args, net.state_dict()
    q, kv, inter = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.intermediate_size
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    if not a.tie_word_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    for i in range(a.n_layers):
        p, hp = f"layers.{i}.", f"model.layers.{i}."
        for suffix in ("weight", "bias") if a.qkv_bias else ("weight",):
            w = sd[p + f"attention.wqkv.{suffix}"]
            for n, part in zip("qkv", w.split([q, kv, kv])):
                out[hp + f"self_attn.{n}_proj.{suffix}"] = part
        for ours, theirs, bias in (("attention.wo", "self_attn.o_proj", a.o_bias),
                                   ("feed_forward.w2", "mlp.down_proj", a.mlp_bias)):
            out[hp + theirs + ".weight"] = sd[p + ours + ".weight"]
            if bias:
                out[hp + theirs + ".bias"] = sd[p + ours + ".bias"]
        for suffix in ("weight", "bias") if a.mlp_bias else ("weight",):
            gate, up = sd[p + f"feed_forward.w13.{suffix}"].split([inter, inter])
            out[hp + f"mlp.gate_proj.{suffix}"], out[hp + f"mlp.up_proj.{suffix}"] = gate, up
        out[hp + "input_layernorm.weight"] = sd[p + "attention_norm.weight"]
        out[hp + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"]
    return out


def build_transformer(args: ModelArgs, hf_sd: dict[str, torch.Tensor], dtype: torch.dtype,
                      device: torch.device) -> Transformer:
    with torch.device("meta"):
        net = Transformer(args)
    try:
        sd = convert_hf_state_dict(hf_sd, args)
    except KeyError as e:
        raise ModelLoadError(f"checkpoint is missing weight {e.args[0]!r}: it is incomplete or not a "
                             "LLaMA-family model") from None
    sd = {k: v.to(dtype) for k, v in sd.items()}
    missing, unexpected = net.load_state_dict(sd, strict=False, assign=True)
    missing = [m for m in missing if not (m == "output.weight" and args.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelLoadError(f"checkpoint does not match the config: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    if args.tie_word_embeddings:
        net.output.weight = net.tok_embeddings.weight
    return net.to(device).eval().requires_grad_(False)


def load_model(name_or_path: str | None = None, *, dtype: str = "auto",
               device: str = "auto", quantize: str = "none", attention: str = "auto",
               device_map: str | None = None, weights: str = "auto") -> Model:
    """Load a model: None = the embedded default model (SmolLM2-135M-Instruct).

    weights fp / gguf / q8_0 / q4_1 / q4_0: floats, a GGUF's own blocks, or RTN-quantized blocks, for
    the CPU (weights/lowbit.py); auto: gguf where it serves (auto_weights), else fp.
    quantize 8bit / 4bit: the decoder layers' weights through bitsandbytes (weights/quant.py).
    attention auto / sdpa / flash: the attention kernel (ops/flash.py).
    device_map auto or DEV=N,...: layers split across devices (weights/placement.py); `device` is
    then ignored, the map's first device is the model's."""
    LoadConfig(model=name_or_path, dtype=dtype, device=device, quantize=quantize,
               attention=attention, device_map=device_map, weights=weights).validate()
    dev = resolve_device(device) if device_map is None else None
    if weights == "auto":
        weights = auto_weights(name_or_path, dtype, dev, quantize, device_map)
    if weights != "fp":
        lowbit.check_target(weights, resolve_dtype(dtype, dev), dev)
    gguf = resolve_gguf(name_or_path) if weights == "gguf" else None
    path = resolve_checkpoint(name_or_path)  # config and tokenizer (and the float weights unless gguf)

    hf_cfg = _read_config(path, own=name_or_path is None)
    args = ModelArgs.from_hf_config(hf_cfg)
    devs = [dev] if device_map is None else placement.devices(device_map, args.n_layers)
    dt = resolve_dtype(dtype, devs[0])
    some_cpu = any(d.type == "cpu" for d in devs)  # flash-attn serves only when every layer is on a GPU
    attn = flash.choose(attention, torch.device("cpu") if some_cpu else devs[0], dt, args.head_dim)
    tok = _read_tokenizer(path, own=name_or_path is None)
    prov = Provenance()
    if gguf is not None:  # the file's own blocks: no float copy of the weights is ever made
        net = _build_gguf(args, gguf)
        prov.lowbit = f"gguf {lowbit.describe(net)}"
    else:
        # split: built in host memory, then each part moved to its device (the whole may not fit on one)
        net = build_transformer(args, _read_state_dict(path), dt, dev or torch.device("cpu"))
    if device_map is not None:
        placement.place(net, placement.plan(net, device_map))
    if quantize != "none":
        prov.changing(net)  # heads files keep matching the full-precision weights
        quantize_(net, quantize)
        prov.quantized = quantize
    if weights in FORMATS:
        prov.changing(net)
        lowbit.quantize_net_(net, weights)
        prov.lowbit = weights
    net.attn_impl = attn

    eos = _eos_ids(path, hf_cfg, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    name = name_or_path or "SmolLM2-135M-Instruct"
    return Model(net=net, tokenizer=tok, args=args, name=str(name), path=path, eos_token_ids=eos,
                 pad_token_id=pad, meta={"config": {**hf_cfg.to_dict(), "model_type": hf_cfg.model_type}},
                 weights=prov)


# The Auto classes import the model family's modules, and through them torch.distributed: ~2 s of a
# one-shot run. The default model's folder is cee-gen's own (its config.json written whole by transformers'
# LlamaConfig, a tokenizer.json beside it), so the generic classes read it as they would
# (tests/test_default_model.py compares both ways); any other checkpoint goes through the Auto classes,
# which know its family's defaults.

def _read_config(path: Path, own: bool):
    from transformers import AutoConfig, PretrainedConfig

    try:
        if own:
            d = json.loads((path / "config.json").read_text())
            cfg = PretrainedConfig.from_dict(d)
            cfg.model_type = d["model_type"]  # an instance attribute: the generic class has none
            return cfg
        return AutoConfig.from_pretrained(path)
    except Exception as e:
        raise ModelLoadError(f"cannot read {path / 'config.json'} ({one_line(e)})") from None


def _read_tokenizer(path: Path, own: bool):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return (PreTrainedTokenizerFast if own else AutoTokenizer).from_pretrained(path)
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer from {path} ({one_line(e)}): the folder needs "
                             "tokenizer.json or tokenizer.model") from None


@contextlib.contextmanager
def _no_random_init():
    """Module constructors skip their random initialization (every weight is replaced after): on the meta
    device torch's init functions run through torch._refs, which imports torch.compile's machinery
    (~70 MB of resident memory a one-shot run on GGUF blocks does not otherwise need)."""
    names = ("normal_", "uniform_", "kaiming_uniform_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def _build_gguf(args: ModelArgs, gguf: Path) -> Transformer:
    with torch.device("meta"), _no_random_init():
        net = Transformer(args)
    gguf_file.build_from_gguf(net, gguf)
    return net.eval().requires_grad_(False)


def _eos_ids(path: Path, hf_cfg, tok) -> list[int]:
    """EOS ids as HF generate would use them: generation_config.json first, then config, tokenizer."""
    ids = None
    gc = path / "generation_config.json"
    if gc.is_file():
        ids = json.loads(gc.read_text()).get("eos_token_id")
    if ids is None:
        ids = getattr(hf_cfg, "eos_token_id", None)
    if ids is None:
        ids = tok.eos_token_id
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)
