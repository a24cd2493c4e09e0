"""KV-cache copy-forward: the K/V of the layers an exited token skipped, so later tokens can attend to it.

A token that exits after layer e (it ran layers [0, e)) must still be visible to later tokens at
layers [e, L). Modes (`ExitConfig.kv_fill`; ConsistentEE, EE-LLM, docs/kv-fill.md):
- `propagate` (default, as ConsistentEE trains): its exit hidden state h is copied forward and each
  skipped layer j projects it: K_j = RoPE(W_k^j RMSNorm_j(h)), V_j = W_v^j RMSNorm_j(h).
- `propagate-raw`: the same without RMSNorm_j (what ConsistentEE's released inference code does).
- `copy-kv`: layer e-1's K/V copied into layers [e, L) (cheapest; known to hurt quality).
- `recompute` (EE-LLM): nothing is filled; the exit state runs the deeper layers later, with the next
  token of its row that goes deeper, so the deep K/V is exact.

Which path runs when:
- full depth: nothing to fill.
- every token at one depth k (`static`), plain step (engine/decoder.py): with `propagate` deferred
  nothing is written, since no later token runs layers >= k; otherwise `KVFiller` runs inside the
  step (compiled with it under --compile).
- the exit step (engine/exit_step.py), one of the three below through the same three calls:
  `begin(state)` at a new token, `layers(state, lo, hi, run)` to run layers [lo, hi) of the running
  rows, `exited(state, out, idx, layer)` for the rows that leave after `layer` layers:
  - `DeferredFill` (deferred.py): `propagate` with fill_timing auto/deferred. The next token that runs
    each layer writes the waiting K/V in that layer's own projection (model.FillColumns).
  - `EagerFill` (eager.py): `propagate` with fill_timing eager, `propagate-raw`, `copy-kv`. One op
    (`cee_gen::kv_fill` / `kv_copy`: the CUDA kernel of csrc/ on a GPU, else its PyTorch twin,
    ops/reference.py) writes every skipped layer at the exit.
  - `RecomputeFill` (recompute.py): `recompute`.
- training (train/rollout.py) freezes exited positions and lets the deeper layers project them,
  which is `propagate` by construction.
"""

from __future__ import annotations

from cee_gen.kv_fill.deferred import DeferredFill
from cee_gen.kv_fill.eager import FILL_MODES, EagerFill, KVFiller
from cee_gen.kv_fill.recompute import RecomputeFill

__all__ = ["DeferredFill", "EagerFill", "FILL_MODES", "KVFiller", "RecomputeFill", "fill_kind"]


def fill_kind(mode: str, deferred: bool) -> type:
    """The exit step's fill for KV-fill mode `mode` (deferred: propagate's fill_timing is deferred)."""
    if mode == "recompute":
        return RecomputeFill
    return DeferredFill if deferred and mode == "propagate" else EagerFill
