"""Early exit: exit heads (heads.py), strategies (strategies.py, cascade.py), quick head fitting
(quickfit.py), and `make_strategy`, the strategy an ExitConfig names."""

from __future__ import annotations

from cee_gen.config import ExitConfig
from cee_gen.errors import CeeGenError
from cee_gen.exits.cascade import Cascade, CascadeModels
from cee_gen.exits.heads import ExitHeads, HeadsFileError, load_heads
from cee_gen.exits.strategies import (
    Confidence,
    Entropy,
    Full,
    Hash,
    Patience,
    PolicyExit,
    Saturation,
    Signals,
    Static,
    Strategy,
)

__all__ = ["Cascade", "CascadeModels", "ExitHeads", "HeadsFileError", "load_heads", "Signals", "Strategy",
           "make_strategy"]


def make_strategy(ex: ExitConfig, heads: ExitHeads, vocab_size: int, special_ids=()) -> Strategy:
    """The strategy an ExitConfig names, for the model `heads` is attached to."""
    L = heads.net.args.n_layers
    s = ex.strategy
    if s == "full":
        return Full([], L)
    if s == "static":
        return Static(ex.exit_layer, L)
    if s == "cascade":
        if ex.cascade_model is not None:  # a second checkpoint: the engine's cascade step
            return Cascade([], L, ex.thresh)
        if ex.exit_layer not in heads.layers:
            raise CeeGenError(f"cascade exit_layer {ex.exit_layer} has no exit head (the heads file "
                              f"covers {heads.layers})")
        return Cascade([ex.exit_layer], L, ex.thresh)
    layers = ex.candidates(L, heads.layers)
    if s == "hash":
        return Hash(layers, L, vocab_size, ex.hash_method, special_ids)
    if s == "policy":
        if not heads.has_policy:
            raise CeeGenError(f"exit policy: heads file {heads.meta.get('path')} has no policy heads: "
                              "pass heads trained by cee-train (or python -m cee_gen.exits.quickfit)")
        return PolicyExit(layers, L, ex.thresh)
    if s == "confidence":
        return Confidence(layers, L, ex.thresh)
    if s == "entropy":
        return Entropy(layers, L, ex.thresh)
    if s == "patience":
        return Patience(layers, L, ex.patience)
    if s == "saturation":
        return Saturation(layers, L, ex.thresh)
    raise CeeGenError(f"unknown exit strategy {s!r}")
