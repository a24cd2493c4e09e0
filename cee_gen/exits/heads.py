"""Exit heads: internal classifiers and policy heads attached to an unmodified base model.

- **Internal classifier** at layer l (the hidden state after l layers): the model's own final
  RMSNorm and LM head read h_l, optionally through a small low-rank adapter in hidden space,
  z = n + U (D n) with n = norm(h_l), logits = W_out z. A rank-r adapter costs 2 r d parameters
  (74 K for SmolLM2 at r = 64), not a V x d matrix per layer: ConsistentEE's released code keeps 32
  full heads, 4.2 B extra parameters for LLaMA-7B (its released code). Without an
  adapter the classifier is the logit lens. At l = L it is always the model's own head, unchanged,
  so exits disabled reproduce the full model exactly.
- **Policy head** at layer l (ConsistentEE): Linear(d, 1) or an MLP d -> hidden ->
  1 with GELU (ConsistentEE-BERT), reading norm(h_l) and giving p(exit). It costs one dot product;
  the LM head then runs once per token, at the exit layer only.
- **LoRA deltas** of the backbone (optional, weights/lora.py): exit-aware fine-tuning makes the
  intermediate layers predictive. They ride in the same file and are merged into the base weights
  when the file is loaded; the base checkpoint on disk is never modified.

One side file holds them: safetensors tensors plus JSON metadata under the header key
`cee_gen_heads` (format version, base model identity and fingerprint, candidate layers, head types,
how they were made). The fingerprint is a hash of the model's shape config plus a probe of a few
weights from every tensor (weights/provenance.py), stored as values and compared with a tolerance, so
the same checkpoint matches in fp32, bf16 or fp16 and any other checkpoint does not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from cee_gen.errors import CeeGenError, one_line
from cee_gen.files import atomic_path
from cee_gen.model import Transformer, linear
from cee_gen.weights.lora import LoRA
from cee_gen.weights.provenance import probes_match, weight_probe

if TYPE_CHECKING:
    from cee_gen.weights.loading import Model

FORMAT_VERSION = 1
META_KEY = "cee_gen_heads"
POLICY_KINDS = ("linear", "mlp")


class HeadsFileError(CeeGenError):
    """A heads file is missing, damaged, or made for another base model."""


def config_sha(net: Transformer) -> str:
    """sha256 of the model's shape config: the part of the identity that must match exactly."""
    a = dataclasses.asdict(net.args)
    return hashlib.sha256(json.dumps(a, sort_keys=True, default=str).encode()).hexdigest()


class Policy(nn.Module):
    """p(exit | norm(h_l)): Linear(d, 1), or d -> hidden -> 1 with GELU."""

    def __init__(self, dim: int, kind: str = "linear", hidden: int = 32, init_p: float = 0.05):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.net = nn.Linear(dim, 1)
        else:
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        # A new policy starts near "never exit" (p ~ init_p, small random weights as ConsistentEE's
        # N(0, 0.02)), so training starts from the full model instead of exiting half the tokens
        # at layer 1 (a default-initialized head gives p ~ 0.5 everywhere).
        last = self.net if kind == "linear" else self.net[-1]
        nn.init.normal_(last.weight, 0.0, 0.02)
        nn.init.constant_(last.bias, math.log(init_p / (1 - init_p)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(z).squeeze(-1).float())  # (..., D) -> (...,) fp32


class Adapter(nn.Module):
    """z + U (D z), rank r, in hidden space. U starts at zero: a new adapter is the logit lens."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.up(self.down(z))


def exit_logits(norm: nn.Module, adapter: nn.Module | None, output: nn.Linear, h: torch.Tensor
                ) -> torch.Tensor:
    """The classifier: output(adapter(norm(h))) in fp32, (b, D) -> (b, V). A free function of the
    modules, so one compiled graph serves every layer's adapter (they differ only in weights)."""
    z = norm(h)
    if adapter is not None:
        z = adapter(z)
    return linear(z, output).float()


def exit_policy(norm: nn.Module, policy: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The policy's p(exit | norm(h)) in fp32, (b, D) -> (b,): a free function, like exit_logits,
    so the compiled exit step has one graph for every layer's policy."""
    return policy(norm(h))


class ExitHeads(nn.Module):
    """Internal classifiers and (optional) policy heads at candidate layers of one base model.

    `layers` are 1-based layer counts l in 1..L-1 (exit after l layers). A model without a heads
    file gets `ExitHeads.logit_lens(net)`: classifiers at every layer, no adapters, no policies.
    """

    def __init__(self, net: Transformer, layers: list[int], *, adapter_rank: int = 0,
                 policy: str | None = None, policy_hidden: int = 32, meta: dict | None = None,
                 policy_init_p: float = 0.05, lora: LoRA | None = None):
        super().__init__()
        L = net.args.n_layers
        self.layers = sorted(set(int(x) for x in layers))
        if any(not 1 <= x < L for x in self.layers):
            raise CeeGenError(f"exit-head layers must be in 1..{L - 1}, got {self.layers}")
        if policy is not None and policy not in POLICY_KINDS:
            raise CeeGenError(f"unknown policy head type {policy!r}: use linear or mlp")
        self.adapter_rank, self.policy_kind, self.policy_hidden = adapter_rank, policy, policy_hidden
        self.meta = dict(meta or {})
        self._net = [net]  # not a submodule: the base model's weights are not ours to save
        D = net.args.dim
        self.adapters = nn.ModuleDict(
            {str(x): Adapter(D, adapter_rank) for x in self.layers} if adapter_rank else {})
        self.policies = nn.ModuleDict(
            {str(x): Policy(D, policy, policy_hidden, policy_init_p) for x in self.layers} if policy else {})
        self.lora = lora  # backbone deltas; part of the file, merged into the net at load time
        self.to(device=net.device, dtype=net.dtype)
        if lora is not None:
            lora.to(device=net.device, dtype=torch.float32)

    @classmethod
    def logit_lens(cls, net: Transformer) -> ExitHeads:
        return cls(net, list(range(1, net.args.n_layers)), meta={"made_by": "logit lens (no file)"})

    @property
    def net(self) -> Transformer:
        return self._net[0]

    @property
    def has_policy(self) -> bool:
        return bool(self.policies)

    def normed(self, h: torch.Tensor) -> torch.Tensor:
        """The model's final RMSNorm of h (..., D): what classifiers and policies read."""
        return self.net.norm(h)

    def logits(self, layer: int, h: torch.Tensor, fn=None) -> torch.Tensor:
        """Exit-head logits after `layer` layers: h (b, D) -> (b, V) fp32. `fn`: exit_logits or a
        compiled copy of it (the engine's compiled exit step)."""
        net = self.net
        adapter = self.adapters[str(layer)] if self.adapters and layer < net.args.n_layers else None
        return (fn or exit_logits)(net.norm, adapter, net.output, h)

    def p_exit(self, layer: int, h: torch.Tensor, z: torch.Tensor | None = None, fn=None) -> torch.Tensor:
        """Policy's p(exit) after `layer` layers: h (b, D) -> (b,) fp32. `fn`: a compiled exit_policy
        (which computes the norm itself, so z is not used)."""
        policy = self.policies[str(layer)]
        if fn is not None:
            return fn(self.net.norm, policy, h)
        return policy(self.normed(h) if z is None else z)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- the side file ------------------------------------------------------------------------

    def metadata(self) -> dict:
        net = self.net
        return {
            "format_version": FORMAT_VERSION,
            "base": {"name": self.meta.get("base_name"), "config_sha256": config_sha(net),
                     "n_layers": net.args.n_layers, "dim": net.args.dim, "vocab_size": net.args.vocab_size},
            "layers": self.layers,
            "adapter_rank": self.adapter_rank,
            "policy": self.policy_kind,
            "policy_hidden": self.policy_hidden,
            "lora": None if self.lora is None else {"rank": self.lora.rank, "alpha": self.lora.alpha,
                                                    "targets": self.lora.targets},
            "training": self.meta.get("training", {}),
            # calibrated thresholds: name -> {"threshold": t, "how": ...}; the default is used for
            # the policy strategy when no threshold is given (set_operating_points)
            "operating_points": self.meta.get("operating_points", {}),
            "default_operating_point": self.meta.get("default_operating_point"),
        }

    def save(self, path: str | Path, base_name: str | None = None, half: bool = False,
             probe: torch.Tensor | None = None) -> Path:
        """Write the heads file atomically (temporary file + rename). `half`: adapters in fp16 too
        (LoRA factors always are; policies stay fp32). `probe`: the base weights' probe when the
        model's weights have changed since loading (Provenance.base_probe); default: probed now."""
        from safetensors.torch import save_file

        if base_name is not None:
            self.meta["base_name"] = base_name
        path = Path(path).expanduser()
        if not path.parent.is_dir():
            raise HeadsFileError(f"cannot write heads file {path}: folder {path.parent} does not exist")
        # LoRA factors in fp16 (half the bytes; merged in fp32); adapters too when `half`
        low = ("lora.", "adapters.") if half else ("lora.",)
        tensors = {k: v.detach().to(torch.float16 if k.startswith(low) else torch.float32).cpu()
                   .contiguous() for k, v in self.state_dict().items()}
        tensors["base_probe"] = weight_probe(self.net) if probe is None else probe
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(self.metadata())})
        return path


def load_heads(path: str | Path, model: Model, merge: bool = True) -> ExitHeads:
    """Read a heads file made for `model`; every problem is one clear HeadsFileError. Its LoRA deltas,
    if any, are merged into the model (once; recorded in model.weights), unless `merge` is False
    (cee-train --init)."""
    from safetensors import safe_open

    net, model_name, prov = model.net, model.name, model.weights
    path = Path(path).expanduser()
    if not path.is_file():
        raise HeadsFileError(f"heads file {path} does not exist: pass the path of a .safetensors heads "
                             "file (python -m cee_gen.exits.quickfit makes one for the default model)")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise HeadsFileError(f"cannot read heads file {path} ({one_line(e)}): it is damaged or "
                             "incomplete; make it again") from None
    if META_KEY not in header:
        raise HeadsFileError(f"{path} is not a cee-gen heads file (its header has no {META_KEY!r} "
                             "metadata)")
    try:
        meta = json.loads(header[META_KEY])
        layers, base = meta["layers"], meta["base"]
        version = meta["format_version"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise HeadsFileError(f"heads file {path} has broken metadata ({one_line(e)}): "
                             "make it again") from None
    if version != FORMAT_VERSION:
        raise HeadsFileError(f"heads file {path} has format version {version}; this cee-gen reads "
                             f"version {FORMAT_VERSION}: make it again with this version")
    base_desc = f"{base.get('name') or 'a model'} ({base.get('n_layers')} layers, dim {base.get('dim')})"
    here = f"{model_name or 'the loaded model'} ({net.args.n_layers} layers, dim {net.args.dim})"
    probe = tensors.pop("base_probe", None)
    if base.get("config_sha256") != config_sha(net) or probe is None \
            or not probes_match(prov.base_probe(net), probe):
        raise HeadsFileError(f"heads file {path} was made for {base_desc}, not for {here}: load the "
                             "base model it was made for, or make heads for this model")
    identity = str(path.resolve())
    merged = prov.merged
    if merged is not None and merged != identity:
        raise HeadsFileError(f"this model already carries the fine-tuned weights of {merged}; heads file "
                             f"{path} was made for other weights: load the base model again to use it")
    lora_meta = meta.get("lora")
    try:
        lora = None if not lora_meta else LoRA(net.args, int(lora_meta["rank"]), list(lora_meta["targets"]),
                                               float(lora_meta["alpha"]))
    except (KeyError, TypeError, ValueError, CeeGenError) as e:
        raise HeadsFileError(f"heads file {path} has broken LoRA metadata ({one_line(e)}): "
                             "make it again") from None
    heads = ExitHeads(net, layers, adapter_rank=int(meta.get("adapter_rank") or 0),
                      policy=meta.get("policy"), policy_hidden=int(meta.get("policy_hidden") or 32),
                      meta={"base_name": base.get("name"), "training": meta.get("training", {}),
                            "operating_points": meta.get("operating_points") or {},
                            "default_operating_point": meta.get("default_operating_point"),
                            "path": str(path)}, lora=lora)
    want = heads.state_dict()
    missing = sorted(set(want) - set(tensors))
    if missing:
        raise HeadsFileError(f"heads file {path} lacks tensor(s) {missing[:3]} that its metadata "
                             f"(layers {layers}) calls for: it is incomplete; make it again")
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise HeadsFileError(f"heads file {path} has tensor(s) {extra[:3]} its metadata does not "
                             "describe: make it again")
    for k, t in tensors.items():
        if t.shape != want[k].shape:
            raise HeadsFileError(f"heads file {path}: tensor {k!r} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(want[k].shape)}: make it again")
    heads.load_state_dict({k: t.to(device=net.device,
                                   dtype=torch.float32 if k.startswith("lora.") else net.dtype)
                           for k, t in tensors.items()})
    if lora is not None and merged is None and merge:
        if prov.quantized:
            raise HeadsFileError(f"heads file {path} carries LoRA deltas, which cannot be merged into "
                                 f"{prov.quantized} weights: load the model with quantize none, or use "
                                 "heads without LoRA")
        prov.changing(net)
        lora.merge(net)
        prov.merged = identity
    return heads.eval().requires_grad_(False)


def default_operating_point(heads: ExitHeads) -> tuple[str, float] | None:
    """The heads file's default calibrated policy threshold: (name, threshold), or None."""
    name = heads.meta.get("default_operating_point")
    point = (heads.meta.get("operating_points") or {}).get(name) if name else None
    return None if point is None else (name, float(point["threshold"]))


def set_operating_points(path: str | Path, points: dict, default: str | None) -> None:
    """Rewrite a heads file's metadata with calibrated operating points (name -> {"threshold": t,
    "how": what it meets and where it was measured}); tensors unchanged, written atomically."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header[META_KEY])
    if default is not None and default not in points:
        raise CeeGenError(f"default operating point {default!r} is not among {sorted(points)}")
    meta["operating_points"], meta["default_operating_point"] = points, default
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**header, META_KEY: json.dumps(meta)})
