"""Splitting a model across devices (`--device-map`): contiguous runs of decoder layers per device.

For models larger than one GPU. The *home* device (the first of the map) holds the token
embeddings, the final norm, the LM head, the exit heads and all of the engine's state (tokens,
logits, masks); the decoder layers are split into segments, one run of layers per device, and each
layer's KV cache lives with the layer. `Transformer.forward_layers` takes and returns hidden states
on the home device and moves them at segment boundaries, once per segment and step (B x T x D
values); the step's RoPE tables and mask move with them, once per device (`Step.on`). The KV fill
of an exited token runs per segment (kv_fill.py). Batch-1 decoding runs the devices one after
another, so a split buys memory, not speed.

Maps:
- `auto`: accelerate reads each GPU's free memory (`get_max_memory`) and the modules' sizes
  (`compute_module_sizes`); the layers are balanced so every GPU holds about the same bytes, the
  home GPU fewer layers for the embeddings and heads, and a tenth of each GPU is left for the KV
  cache and activations. It is an error, saying how much is missing, when the model does not fit.
- `DEV=N,DEV=N,...`: N layers on each device, in order (e.g. `cuda:0=12,cuda:1=20`, or
  `cuda:0=16,cpu=16` to put half of the layers in host memory). The counts must sum to the depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cee_gen.errors import CeeGenError

RESERVE = 0.10  # of each GPU's free memory, kept for the KV cache and activations (auto)


@dataclass
class Placement:
    home: torch.device
    segments: list[tuple[int, int, torch.device]]  # (first layer, end layer, device), in order


def _device(name: str) -> torch.device:
    try:
        d = torch.device(name)
    except RuntimeError:
        raise CeeGenError(f"unknown device {name!r} in the device map: use cpu or cuda:N") from None
    if d.type == "cuda":
        d = torch.device("cuda", d.index or 0)
        if not torch.cuda.is_available() or d.index >= torch.cuda.device_count():
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise CeeGenError(f"the device map names {d}, and this machine has {n} CUDA GPU(s)")
    elif d.type != "cpu":
        raise CeeGenError(f"device {name!r} in the device map: only cpu and cuda:N are supported")
    return d


def parse(spec: str, n_layers: int) -> list[tuple[torch.device, int]] | None:
    """The explicit form `DEV=N,...` as [(device, n)], or None for `auto`."""
    if spec == "auto":
        return None
    out = []
    for part in spec.split(","):
        name, sep, n = part.strip().partition("=")
        if not sep or not n.strip().isdigit() or int(n) < 1:
            raise CeeGenError(f"bad device map entry {part.strip()!r}: write DEV=N (N >= 1 layers), e.g. "
                              "cuda:0=16,cuda:1=16, or use auto")
        out.append((_device(name.strip()), int(n)))
    total = sum(n for _, n in out)
    if total != n_layers:
        raise CeeGenError(f"the device map places {total} layers, but the model has {n_layers}: the "
                          "counts must add up to its depth")
    return out


def devices(spec: str, n_layers: int) -> list[torch.device]:
    """The devices a map uses, the home device first (auto: every visible GPU)."""
    entries = parse(spec, n_layers)
    if entries is None:
        if not torch.cuda.is_available():
            raise CeeGenError("device map auto splits the model across CUDA GPUs, and this machine has "
                              "none: use device cpu, or an explicit map such as cpu=30")
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [d for d, _ in entries]


def balance(home_bytes: int, layer_bytes: int, n_layers: int, free: dict[int, int]) -> list[int]:
    """Layers per GPU (in index order) so each GPU holds about the same bytes, GPU 0 also the home
    modules, each within (1 - RESERVE) of its free memory."""
    gpus = sorted(free)
    caps = [int(free[g] * (1 - RESERVE)) for g in gpus]
    total = home_bytes + n_layers * layer_bytes
    if home_bytes > caps[0] or total > sum(caps):
        gib = 2 ** 30
        raise CeeGenError(f"the model needs {total / gib:.1f} GiB and the {len(gpus)} GPU(s) have "
                          f"{sum(caps) / gib:.1f} GiB to give (free memory less {RESERVE:.0%} for the "
                          "KV cache): load it quantized to fit one GPU (quantize 8bit or 4bit, no "
                          "device map), or write the map by hand to put some layers on the cpu")
    target = total / len(gpus)
    counts, left = [], n_layers
    for i, cap in enumerate(caps):
        have = home_bytes if i == 0 else 0
        fits = (cap - have) // layer_bytes
        want = round((target - have) / layer_bytes) if i < len(caps) - 1 else left
        c = max(0, min(fits, want, left))
        counts.append(c)
        left -= c
    # what balance could not place (a small GPU) goes to the first GPUs with room, in order
    for i, cap in enumerate(caps):
        room = (cap - (home_bytes if i == 0 else 0)) // layer_bytes - counts[i]
        take = min(room, left)
        counts[i] += take
        left -= take
    if left:  # cannot happen when total <= sum(caps) up to rounding of whole layers
        raise CeeGenError(f"{left} layers do not fit on the GPUs: quantize the model or use the CPU too")
    return counts


def module_bytes(net) -> tuple[int, int]:
    """(bytes of the home modules: embeddings, final norm, untied LM head; bytes of one layer), as
    accelerate counts them."""
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(net)
    home = sizes["tok_embeddings"] + sizes["norm"]
    if not net.args.tie_word_embeddings:
        home += sizes["output"]
    return home, sizes["layers.0"]


def plan(net, spec: str) -> Placement:
    """A placement for net (built on the CPU, in its final dtype) from a device-map spec."""
    L = net.args.n_layers
    entries = parse(spec, L)
    home = None if entries is None else entries[0][0]
    if entries is None:
        devices(spec, L)  # the error when there is no GPU
        from accelerate.utils import get_max_memory

        free = {k: v for k, v in get_max_memory().items() if isinstance(k, int)}
        counts = balance(*module_bytes(net), L, free)
        entries = [(torch.device("cuda", g), c) for g, c in zip(sorted(free), counts) if c]
        home = torch.device("cuda", min(free))  # balance counted the home modules there
    segments, a = [], 0
    for dev, n in entries:
        segments.append((a, a + n, dev))
        a += n
    return Placement(home=home, segments=segments)


def place(net, placement: Placement) -> None:
    """Move net's modules where the placement says and record it (net.segments)."""
    home = placement.home
    for name in ("tok_embeddings", "norm", "output"):
        getattr(net, name).to(home)
    net.rope_cos, net.rope_sin = net.rope_cos.to(home), net.rope_sin.to(home)
    for a, b, dev in placement.segments:
        for i in range(a, b):
            net.layers[i].to(dev)
    net.segments = placement.segments if len(placement.segments) > 1 or placement.segments[0][2] != home \
        else None


def describe(net) -> str | None:
    """The model's split as a map (`cuda:0=16,cuda:1=16`), or None when it is on one device."""
    segs = getattr(net, "segments", None)
    return None if segs is None else ",".join(f"{d}={b - a}" for a, b, d in segs)
