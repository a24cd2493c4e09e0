"""What weights a loaded model carries: one explicit record, kept on the `Model`, never on the network.

A model's weights start as a checkpoint's and may then change in two ways, each recorded here:
- LoRA deltas of a heads file merged into them (weights/lora.py, when the heads file loads);
- the decoder layers' projections quantized through bitsandbytes (weights/quant.py, at load time), or
  to GGUF blocks (weights/lowbit.py: `--weights q8_0|q4_1|q4_0`; a GGUF read in its own blocks, `--weights
  gguf`, carries the checkpoint's own weights, and its probe reads them dequantized).

Heads files identify the base model they were made for by a probe of its weights (a few evenly spaced
values of every tensor, compared with a tolerance, so fp32/bf16/fp16 copies of one checkpoint match).
Once the weights change, the probe of the *base* weights is the one taken before: `base_probe`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROBE_PER_TENSOR = 16


def weight_probe(net: torch.nn.Module) -> torch.Tensor:
    """A few evenly spaced values from every weight tensor, in fp32 (N,): the weights' identity."""
    blocks = {name: mod for name, mod in net.named_modules() if hasattr(mod, "probe_values")}  # lowbit.py
    tensors = {k: t for k, t in net.state_dict().items()
               if not (k.rpartition(".")[0] in blocks and k.rpartition(".")[2] in ("qs", "d", "m"))}
    tensors.update({f"{name}.weight": mod for name, mod in blocks.items()})  # read as the floats they hold
    vals, n = [], PROBE_PER_TENSOR
    for _, t in sorted(tensors.items()):
        if isinstance(t, torch.Tensor):
            flat = t.detach().reshape(-1)
            idx = torch.arange(n, device=flat.device) * (flat.numel() - 1) // (n - 1)  # integer: exact ends
            vals.append(flat[idx].float().cpu())
        else:
            numel = t.qs.shape[0] * t.in_features
            vals.append(t.probe_values(torch.arange(n) * (numel - 1) // (n - 1)).float().cpu())
    return torch.cat(vals)


def probes_match(a: torch.Tensor, b: torch.Tensor) -> bool:
    # fp16/bf16 round-trips move a value by < 0.4 %; another checkpoint moves it by ~100 %
    return a.shape == b.shape and bool(((a - b).abs() <= 0.02 * b.abs() + 1e-3).all())


@dataclass
class Provenance:
    """The weights a model carries. `probe` is None while they are still the checkpoint's own."""

    probe: torch.Tensor | None = None  # the base weights' probe, taken before they first changed
    merged: str | None = None  # the heads file (resolved path) whose LoRA deltas are merged in
    quantized: str | None = None  # "8bit" or "4bit" (bitsandbytes), or None
    lowbit: str | None = None  # "gguf q4_1+q8_0", "q8_0", ...: projections in GGUF blocks, or None (floats)

    def base_probe(self, net: torch.nn.Module) -> torch.Tensor:
        """The probe of the base weights, whether or not they have changed since."""
        return weight_probe(net) if self.probe is None else self.probe

    def changing(self, net: torch.nn.Module) -> None:
        """Call just before the weights first change: keeps the base weights' probe."""
        if self.probe is None:
            self.probe = weight_probe(net)

    @property
    def label(self) -> str:
        """For stats: "base", or the heads file whose deltas are merged."""
        return self.merged or "base"
