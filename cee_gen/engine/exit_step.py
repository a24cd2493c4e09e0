"""The early-exit decode step: one token per running row, each leaving after its own number of layers.

It runs the layers from one decision point to the next (the strategy's candidate layers, or the
planned exit layers), asks the strategy which rows exit, emits their tokens from the exit head, lets
the KV fill handle their skipped layers, and goes on with the other rows only (gathered: exited and
finished rows cost nothing deeper). One state object, `Running`, holds the rows still going deeper;
the fill (kv_fill/) runs their layers and takes the rows that exit:

    st = Running(...)                        embed the new tokens, make the step
    for stop in decision points:
        fill.layers(st, lo, stop, run)       layers [lo, stop), with the fill's extra columns
        exits = decide(stop)                 planned, or the strategy on the exit signals
        emit(exits)                          logits from the exit head at `stop`
        fill.exited(st, exits, stop)         eager: write K/V now; deferred/recompute: remember them
        st.keep(not exited)

Under compile the control flow stays eager and the fixed-shape pieces (a layer, an exit head, a
policy head, a layer fused with the policy head) run as compiled graphs, one per piece, shared by all
layers (engine/decoder.py compiles them). Host syncs: one per candidate layer (`tolist()` of the exit
mask: whether to run the next layer at all is data-dependent), counted in `decision_s`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cee_gen.exits.heads import ExitHeads
from cee_gen.exits.strategies import Signals, Strategy
from cee_gen.kv_fill import RecomputeFill
from cee_gen.model import Transformer, run_layer
from cee_gen.step import Step


@dataclass
class ExitRun:
    """A strategy ready to run: the strategy, the exit heads it reads, the KV-fill mode and timing."""

    strategy: Strategy
    heads: ExitHeads
    kv_fill: str = "propagate"
    small: Transformer | None = None  # cascade with a second checkpoint: the small model
    deferred: bool = False  # propagate's fill written by the next tokens that run each layer
    draft: str | None = None  # verify mode (engine/verify.py): the draft source; None = no verify mode
    max_draft: int = 8
    ngram: int = 3
    threshold: float | None = None  # the strategy's threshold in effect (stats)
    operating_point: str | None = None  # its name, when it is the heads file's calibrated default

    @property
    def uniform_depth(self) -> int | None:
        """The depth of every token when the strategy exits every row at one layer (full, static)."""
        s = self.strategy
        if s.name in ("full", "static") and self.kv_fill != "recompute":
            return getattr(s, "k", s.L)
        return None


@dataclass
class Running:
    """The rows of one exit step still going deeper, and where their queries sit."""

    net: Transformer
    cache: object  # StaticKVCache
    slot: list[int]  # each running row's new token's cache slot (verify mode: rows differ)
    h: torch.Tensor  # (b, Q, D): column 0 is the new token; recompute appends waiting positions
    rows: torch.Tensor  # (b,) cache rows
    host: list[int]  # the same rows, host ints
    pad: torch.Tensor  # (b,) left padding of these rows
    step: Step
    kv_len: int | None  # eager: attend to [0, kv_len); compiled: the whole (dynamic) cache
    plan: list[int] | None  # planned strategies: each row's exit layer
    slots: torch.Tensor | None = None  # (b, Q) per-row query slots once recompute adds columns
    extra: list[int] | None = None  # per row: real waiting columns it carries (recompute)

    @property
    def sub_rows(self) -> torch.Tensor | None:
        """rows for make_step: None when every cache row runs, in order."""
        return None if len(self.host) == self.cache.batch else self.rows

    def keep(self, keep: list[int], compiled: bool) -> None:
        """Narrow to the rows at positions `keep`."""
        kt = torch.tensor(keep, device=self.rows.device)
        self.h, self.rows, self.pad, self.step = self.h[kt], self.rows[kt], self.pad[kt], self.step.select(kt)
        self.host = [self.host[i] for i in keep]
        self.slot = [self.slot[i] for i in keep]
        self.extra = [self.extra[i] for i in keep]
        if self.plan is not None:
            self.plan = [self.plan[i] for i in keep]
        if self.slots is not None:
            self.slots = self.slots[kt]
        if compiled:
            rows_dynamic(self.h, self.step)


def batch_dynamic(*ts) -> None:
    """Compiled exit step: the row count of these tensors (dim 0) is dynamic from their first graph
    on, so one graph serves every count >= 2 (1 is specialized) instead of one per count seen."""
    for t in ts:
        if torch.is_tensor(t) and t.dim() > 0:
            torch._dynamo.maybe_mark_dynamic(t, 0)


def rows_dynamic(h: torch.Tensor, step: Step) -> None:
    """batch_dynamic for the exit step's hidden states and every per-row tensor of its step."""
    a = step.attn
    batch_dynamic(h, step.cos, step.sin, step.rows, getattr(a, "mask", None), getattr(a, "seqlens", None),
                  getattr(a, "leftpad", None), getattr(a, "batch_idx", None),
                  step.slots if step.slots.dim() == 2 else None)


class ExitStep:
    """Decodes one token per alive row with early exit: `__call__` -> logits (B, V), {row: layers}.

    `trace`, when a list, receives (layer, rows, h (b, D)) after every layer: the new tokens' hidden
    states after that many layers, for the cache rows `rows` (verify mode starts its pass from them)."""

    def __init__(self, decoder, run: ExitRun, fill, timings):
        self.dec, self.run, self.fill, self.tm = decoder, run, fill, timings
        self.trace: list | None = None

    def __call__(self, cache, tok: torch.Tensor, tok_ids: list[int], slot: int | list[int],
                 pad: torch.Tensor, alive: list[int]) -> tuple[torch.Tensor, dict[int, int]]:
        """tok (B, 1) at cache slot `slot` (or slot[b] for each cache row b); only the rows `alive`
        (host ints) run. Rows not alive get zero logits."""
        with self.dec.compile_clock():  # the pieces compile inside ordinary steps
            return self._step(cache, tok, tok_ids, slot, pad, alive)

    def _step(self, cache, tok, tok_ids, slot, pad, alive):
        dec, net, heads, strat, fill = self.dec, self.dec.net, self.run.heads, self.run.strategy, self.fill
        L, B, dev = net.args.n_layers, tok.shape[0], tok.device
        strat.reset(B, dev)
        rows = torch.tensor(alive, device=dev)  # (b,) cache rows still running
        slots = [slot] * len(alive) if isinstance(slot, int) else [slot[r] for r in alive]
        # one slot for every row: one run of slots (the flash path can serve it); else per row (b, 1)
        q = torch.tensor(slots[:1] if len(set(slots)) == 1 else slots, device=dev)
        # compiled: attend over the whole (dynamic) cache, as the plain step does
        kv_len = None if dec.compiled else max(slots) + 1
        st = Running(net, cache, slots, net.embed(tok[rows]), rows, list(alive), pad[rows],
                     net.make_step(q if q.numel() == 1 else q[:, None], pad[rows], cache.n_slots, kv_len,
                                   None if len(alive) == B else rows),
                     kv_len, strat.plan([tok_ids[r] for r in alive]) if strat.planned else None,
                     extra=[0] * len(alive))
        if dec.compiled:
            rows_dynamic(st.h, st.step)
        stops = sorted(set(st.plan) | {L}) if st.plan is not None else strat.layers + [L]
        # compiled policy: the candidate layer's graph also computes p(exit) (one call, not two)
        fuse = dec.layer_policy is not None and strat.reads_policy and net.segments is None and \
            not isinstance(fill, RecomputeFill)  # recompute's query columns change layer by layer
        logits = torch.zeros(B, net.args.vocab_size, device=dev)
        depth: dict[int, int] = {}
        fill.begin(st)
        lo = 0
        for stop in stops:
            p = None
            if fuse and lo < stop < L:
                fill.layers(st, lo, stop - 1, self._traced(st, dec.layer))
                p = self._fused_layer(st, stop)
            else:
                fill.layers(st, lo, stop, self._traced(st, dec.layer))
            lo = stop
            ex, sig = self._decide(st, stop, p)
            if not any(ex):
                continue
            out = [i for i, e in enumerate(ex) if e]
            idx = torch.tensor(out, device=dev)
            if sig is not None and sig._logits is not None:  # the strategy already read them
                logits[st.rows[idx]] = sig.logits[idx]
            elif len(out) == len(st.host):
                logits[st.rows] = heads.logits(stop, st.h[:, 0], dec.exit_logits)
            else:
                logits[st.rows[idx]] = heads.logits(stop, st.h[idx, 0], dec.exit_logits)
            for i in out:
                depth[st.host[i]] = stop
            fill.exited(st, out, idx, stop)
            keep = [i for i, e in enumerate(ex) if not e]
            if not keep:
                break
            st.keep(keep, dec.compiled)
        return logits, depth

    def _fused_layer(self, st: Running, stop: int) -> torch.Tensor:
        """Layer stop-1 and the policy head at `stop` in one compiled call; returns p(exit) (b,)."""
        dec, net = self.dec, self.dec.net
        box = {}

        def fused(block, h, step, k, v, fill=None):
            h, box["p"] = dec.layer_policy(block, h, step, k, v, fill, net.norm,
                                           self.run.heads.policies[str(stop)])
            return h

        self.fill.layers(st, stop - 1, stop, self._traced(st, fused))
        return box["p"]

    def _traced(self, st: Running, run):
        """`run` (None: the plain layer), recording each layer's output in `trace` when tracing."""
        if self.trace is None:
            return run
        index = {id(b): i for i, b in enumerate(st.net.layers)}

        def traced(block, h, step, k, v, fill=None):
            h = (run or run_layer)(block, h, step, k, v, fill)
            self.trace.append((index[id(block)] + 1, list(st.host), h[:, 0]))
            return h

        return traced

    def _decide(self, st: Running, stop: int, p: torch.Tensor | None) -> tuple[list[bool], Signals | None]:
        """Which running rows exit at `stop`: all at L, the plan's, or the strategy's decision."""
        if stop == st.net.args.n_layers:
            return [True] * len(st.host), None
        if st.plan is not None:
            return [x == stop for x in st.plan], None
        dec = self.dec
        t0 = time.perf_counter()
        with dec.compile_clock() as clock:  # an exit head's graph may compile here
            sig = Signals(self.run.heads, stop, st.h[:, 0], dec.exit_logits, dec.exit_policy, p)
            ex = self.run.strategy.decide(sig, st.rows).tolist()  # the data-dependent sync
        self.tm.decision_s += time.perf_counter() - t0 - clock.seconds
        return ex, sig

