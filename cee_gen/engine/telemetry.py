"""Per-token telemetry of the decode loop: each row's tokens and the layers each one ran, and the
batch's timings (prefill, decode, compile, strategy decisions, KV fill, recomputed positions)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RowOutput:
    token_ids: list[int] = field(default_factory=list)
    layers_per_token: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    sources: list[str] = field(default_factory=list)  # verify mode: each token's origin (see verify.py)


@dataclass
class BatchTimings:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compile_s: float = 0.0
    decision_s: float = 0.0  # strategy decisions at candidate layers, their host syncs included
    fill_s: float = 0.0  # eager KV fill of skipped layers (propagate eager, propagate-raw, copy-kv)
    recompute_rows: int = 0  # recompute: extra (position, layer) pairs run to catch the deep KV up
    verify: dict | None = None  # verify mode: engine/verify.py's VerifyStats.summary()


def exit_histogram(layers: list[int]) -> dict[int, int]:
    """Exit layer -> number of tokens, sorted by layer."""
    out: dict[int, int] = {}
    for x in layers:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items()))
