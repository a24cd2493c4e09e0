"""Prefill and the decode loop over a static KV cache, with per-token telemetry.

A batch of prompts is left-padded into one (B, T) tensor; each row keeps its own RoPE positions and
attention mask (model.make_step), so a row's output does not depend on its neighbours.

Two decode steps:
- `_decode_step`: every row runs the same `depth` layers in one `forward_layers` call (exits off, or
  `static`); this is the step `torch.compile` takes.
- `Decoder.exit_step`: the early-exit step. It runs the layers from one decision point to the
  next (the candidate layers, or the planned exit layers), asks the strategy which rows exit, emits
  their tokens from the exit head, fills their skipped layers' KV, and goes on with the other rows
  only (gathered: exited and finished rows cost nothing deeper). With kv_fill `recompute` a row's
  exited positions wait in `_Pending` and re-enter as extra queries at their exit layer, with the
  next token of the row that goes deeper (EE-LLM's KV recomputation), so their deep KV is exact.
  Under compile its control flow stays eager and its fixed-shape pieces (a layer, an exit head) run
  as compiled graphs, one per piece, shared by all layers.
- `Decoder.cascade_step`: CascadeBERT with a second, smaller checkpoint. The small model runs every
  token; the large one runs only for rows where the small one is unsure, first catching up on the
  tokens it has not seen (one forward over the row's backlog, per-row slots).

Host syncs: one per generated token (`tolist()` of the chosen ids: EOS, stop strings, streaming),
plus, for decided strategies, one per candidate layer (`tolist()` of the exit mask: whether to run
the next layer at all is data-dependent). Their cost is in the stats as `decision_s`.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from cee_gen.cache import StaticKVCache, cache_slots
from cee_gen.config import GenerationConfig
from cee_gen.errors import CeeGenError
from cee_gen.exits.heads import ExitHeads, exit_logits, exit_policy
from cee_gen.exits.strategies import Signals, Strategy
from cee_gen.kv_fill import KVFiller
from cee_gen.model import Transformer, layer_devices, run_layer
from cee_gen.sampling import select_next


@dataclass
class ExitRun:
    """A strategy ready to run: the strategy, the exit heads it reads, the KV-fill mode."""

    strategy: Strategy
    heads: ExitHeads
    kv_fill: str = "propagate"
    small: Transformer | None = None  # cascade with a second checkpoint: the small model
    defer: bool = False  # propagate's fill written by the next tokens that run each layer (_Deferred)

    @property
    def uniform_depth(self) -> int | None:
        """The depth of every token when the strategy exits every row at one layer (full, static)."""
        s = self.strategy
        if s.name in ("full", "static") and self.kv_fill != "recompute":
            return getattr(s, "k", s.L)
        return None


@dataclass
class RowOutput:
    token_ids: list[int] = field(default_factory=list)
    layers_per_token: list[int] = field(default_factory=list)
    finish_reason: str = "length"


@dataclass
class BatchTimings:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compile_s: float = 0.0
    decision_s: float = 0.0  # strategy decisions at candidate layers, their host syncs included
    fill_s: float = 0.0  # KV fill of skipped layers (propagate, propagate-raw, copy-kv)
    recompute_rows: int = 0  # recompute: extra (position, layer) pairs run to catch the deep KV up


class _Pending:
    """kv_fill `recompute`: per row, the positions whose deeper layers have no KV yet.

    Entry (slot, e, h): the token at cache slot `slot` ran e layers; h (D,) is its hidden state
    after them, i.e. the input of layer index e. It re-enters there as an extra query the next time
    a token of its row runs layer e, and goes on with that token.
    """

    def __init__(self, batch: int):
        self.rows: list[list[tuple[int, int, torch.Tensor]]] = [[] for _ in range(batch)]

    def join(self, row: int, layer: int) -> list[tuple[int, int, torch.Tensor]]:
        out = [p for p in self.rows[row] if p[1] == layer]
        if out:
            self.rows[row] = [p for p in self.rows[row] if p[1] != layer]
        return out


class _Deferred:
    """Deferred `propagate` fill: per row, the exited positions whose deeper K/V is not written yet.

    A token that exits after e layers leaves its state h_e (D,) here, with f = e: layers [f, L) of
    its slot still lack K/V. The next token of its row that runs layer j >= f carries it as a fill
    column (Step.fill_h): that layer writes RMSNorm_j -> K/V projection -> RoPE of h_e in the same
    projection as its own token's (model.Attention), which is the eager fill's value, and the weights
    are read once for both. When that token stops after d layers, every entry with f < d has its
    layers [f, d) written: f = d (all done, and dropped, when d = L). Nothing reads a layer before a
    token runs it, so no attention sees a missing entry; layers no later token runs are never filled.
    """

    def __init__(self, net: Transformer, batch: int, n_slots: int, pad: torch.Tensor):
        self.net, self.pad, self.scratch = net, pad, n_slots - 1  # padding columns write scratch
        w = net.tok_embeddings.weight
        self.states = torch.zeros(batch, n_slots, net.args.dim, dtype=w.dtype, device=w.device)
        self.entries: list[dict[int, int]] = [{} for _ in range(batch)]  # per row: {slot: f}
        self.fs: list[int] = []
        self._memo: dict = {}

    def begin(self, host_rows: list[int]) -> None:
        """A new decode step for these rows: the layers at which their fill columns change."""
        self.fs = sorted({f for r in host_rows for f in self.entries[r].values()})
        self._memo = {}

    def spans(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """[lo, hi) cut where a new entry joins, so each span runs with one set of fill columns."""
        cuts = [lo] + [f for f in self.fs if lo < f < hi] + [hi]
        return [(a, b) for a, b in zip(cuts, cuts[1:]) if a < b]

    def step_at(self, j: int, step, host_rows: list[int], rows: torch.Tensor):
        """`step` with the fill columns of layer j for the running rows (host ints; rows (b,))."""
        n = bisect.bisect_right(self.fs, j)  # how many entry layers are <= j: the set's identity
        key = (n, tuple(host_rows))
        if n == 0:
            return step
        if key not in self._memo:
            cols = [[s for s, f in self.entries[r].items() if f <= j] for r in host_rows]
            # at least 2 columns: under compile one graph (P dynamic) then serves every count, where
            # P = 1 would get its own (size-1 dimensions are specialized)
            P = max(len(c) for c in cols)
            if P == 0:
                self._memo[key] = step
            else:
                P = max(P, 2)
                dev = rows.device
                slots = torch.tensor([c + [self.scratch] * (P - len(c)) for c in cols], device=dev)  # (b, P)
                fill_h = self.states[rows[:, None], slots]  # (b, P, D); padding: the zero state
                cos, sin = self.net.rope_rows(slots, self.pad[rows])
                for t in (fill_h, slots, cos, sin):
                    torch._dynamo.maybe_mark_dynamic(t, 1)
                    torch._dynamo.maybe_mark_dynamic(t, 0)
                self._memo[key] = replace(step, fill_h=fill_h, fill_pos=slots, fill_cos=cos, fill_sin=sin)
        return self._memo[key]

    def exited(self, row: int, slot: int, depth: int, h: torch.Tensor | None) -> None:
        """Row `row`'s token at `slot` stopped after `depth` layers, with state h (D,) (depth < L)."""
        ents = self.entries[row]
        if depth >= self.net.args.n_layers:
            ents.clear()
            return
        for s, f in ents.items():
            if f < depth:
                ents[s] = depth
        ents[slot] = depth
        self.states[row, slot] = h


def _batch_dynamic(*ts) -> None:
    """Compiled exit step: the row count of these tensors (dim 0) is dynamic from their first graph
    on, so one graph serves every count >= 2 (1 is specialized) instead of one per count seen."""
    for t in ts:
        if torch.is_tensor(t) and t.dim() > 0:
            torch._dynamo.maybe_mark_dynamic(t, 0)


def _rows_dynamic(h: torch.Tensor, step) -> None:
    """_batch_dynamic for the exit step's hidden states and every per-row tensor of its step."""
    _batch_dynamic(h, step.cos, step.sin, step.mask, step.rows, step.seqlens, step.leftpad, step.batch_idx,
                   step.fill_h, step.fill_pos, step.fill_cos, step.fill_sin,
                   step.input_pos if step.input_pos.dim() == 2 else None)


def _decode_step(net: Transformer, cache: StaticKVCache, tok: torch.Tensor, input_pos: torch.Tensor,
                 pad: torch.Tensor, kv_len: int | None, gemv: bool = False, depth: int | None = None,
                 filler: KVFiller | None = None, kv_fill: str = "propagate") -> torch.Tensor:
    """One token per row at cache slot input_pos (1,): tok (B, 1) -> logits (B, V) fp32.

    With depth < L the token exits after `depth` layers: the LM head reads that layer's hidden
    state, and the skipped layers' KV is filled from it.
    """
    step = net.make_step(input_pos, pad, cache.k[0].shape[2], kv_len, gemv)  # symbolic S when compiled
    L = net.args.n_layers
    depth = L if depth is None else depth
    h = net.forward_layers(net.embed(tok), 0, depth, step, cache)  # (B, 1, D)
    if depth < L and filler is not None:  # deferred: no token runs the layers past depth, none filled
        filler.fill(cache, h, depth, step, kv_fill)
    return net.head(h, gemv)[:, -1].float()


def _dynamo_compile_s() -> float | None:
    """Seconds torch.compile has spent compiling in this process so far; None where torch does not
    record it. The compiled exit step compiles inside ordinary steps (each new batch shape)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return None
    return sum(compilation_time_metrics.get("_compile.compile_inner", []))


def _layer_then_policy(block, h: torch.Tensor, step, k_cache, v_cache, norm, policy):
    """A layer, then the policy head on the new token's column of its output: (h, p (b,)). For the
    compiled exit step, one graph call per candidate layer instead of two."""
    h = run_layer(block, h, step, k_cache, v_cache)
    return h, exit_policy(norm, policy, h[:, 0])


def _append_queries(h: torch.Tensor, slots: torch.Tensor, joins: list[list], scratch: int):
    """recompute: add each row's joining pending positions as query columns, padded across rows.

    h (b, Q, D), slots (b, Q); joins[i] = row i's entries (slot, e, state (D,)). Padding columns
    get a zero state and the scratch slot. Returns h (b, Q + n, D), slots (b, Q + n).
    """
    b, n = len(joins), max(len(x) for x in joins)
    new_h = h.new_zeros(b, n, h.shape[-1])  # (b, n, D)
    new_s = torch.full((b, n), scratch, device=h.device)
    for i, x in enumerate(joins):
        for c, (s, _, state) in enumerate(x):
            new_h[i, c], new_s[i, c] = state, s
    return torch.cat([h, new_h], 1), torch.cat([slots, new_s], 1)


class Decoder:
    """Owns the (optionally compiled) decode step for one model."""

    def __init__(self, net: Transformer, compile: bool = False, mode: str = "default"):
        self.net = net
        self.compiled = compile
        # reduce-overhead: CUDA graphs (on a GPU). They replay into fixed buffers, so the KV cache
        # tensors, which the step writes, are marked static (new_cache) and the logits are copied out.
        self.graphs = compile and mode == "reduce-overhead"
        self.compile_s = 0.0
        self._warm_shapes: set = set()
        self._step = _decode_step
        # eager exit step: the blocks and heads themselves
        self._layer = self._exit_logits = self._exit_policy = self._layer_policy = None
        self._filler: KVFiller | None = None
        if compile:
            import torch._inductor.config as ic

            ic.fx_graph_cache = True  # on-disk cache: later processes skip most of the compile
            # One graph for every cache length (new_cache marks the slot dimension dynamic):
            # compile is paid once per process and batch size, not once per prompt length.
            self._step = torch.compile(_decode_step, fullgraph=True, dynamic=None, mode=mode)
            # The early-exit step stays eager (its decisions are host syncs), but its fixed-shape
            # pieces are compiled: one graph for a layer, reused by every layer, one for an exit
            # head and one for a policy head. Without CUDA graphs: a graph per layer call would need
            # its own step marking.
            piece = "default" if mode == "reduce-overhead" else mode
            self._layer = torch.compile(run_layer, fullgraph=True, dynamic=None, mode=piece)
            self._exit_logits = torch.compile(exit_logits, fullgraph=True, dynamic=None, mode=piece)
            self._exit_policy = torch.compile(exit_policy, fullgraph=True, dynamic=None, mode=piece)
            self._layer_policy = torch.compile(_layer_then_policy, fullgraph=True, dynamic=None, mode=piece)

    def step(self, cache: StaticKVCache, tok: torch.Tensor, slot: int, pad: torch.Tensor,
             depth: int | None = None, kv_fill: str | None = "propagate"):
        """tok (B, 1) written at cache slot `slot`, run `depth` layers (None = all) -> logits (B, V)."""
        filler = None  # kv_fill None: the layers past depth need no fill (deferred, and no token runs them)
        if depth is not None and depth < self.net.args.n_layers and kv_fill is not None:
            if self._filler is None:
                self._filler = KVFiller(self.net)
            filler = self._filler
        input_pos = torch.tensor([slot], device=tok.device)
        # Compiled: attend over the whole cache (its slot dimension is dynamic, see new_cache).
        # Eager: attend only over the filled slots, which saves reading the empty tail.
        kv_len = None if self.compiled else slot + 1
        key = (tuple(tok.shape), depth, kv_fill)
        first = self.compiled and key not in self._warm_shapes
        t0 = time.perf_counter()
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be reused
        out = self._step(self.net, cache, tok, input_pos, pad, kv_len, self.compiled, depth, filler, kv_fill)
        if self.graphs:
            out = out.clone()  # the graph's output buffer is overwritten by the next replay
        if first:  # this call traced and compiled a graph
            self.compile_s += time.perf_counter() - t0
            self._warm_shapes.add(key)
        return out

    def exit_step(self, cache: StaticKVCache, tok: torch.Tensor, tok_ids: list[int], slot: int,
                  pad: torch.Tensor, alive: list[int], run: ExitRun, tm: BatchTimings,
                  pending: _Pending | None, deferred: _Deferred | None = None
                  ) -> tuple[torch.Tensor, dict[int, int]]:
        """One early-exit decode step for the rows `alive` (host ints) of tok (B, 1) at `slot`.

        Returns logits (B, V) (rows not alive are zero) and {row: layers it ran}.
        """
        if self.compiled:
            c0 = _dynamo_compile_s()
            out = self._exit_step(cache, tok, tok_ids, slot, pad, alive, run, tm, pending, deferred)
            c1 = _dynamo_compile_s()
            if c0 is not None and c1 is not None:
                self.compile_s += c1 - c0
            return out
        return self._exit_step(cache, tok, tok_ids, slot, pad, alive, run, tm, pending, deferred)

    def _layers(self, h, lo: int, hi: int, step, cache, deferred, host_rows, rows):
        """Layers [lo, hi) of the exit step; with a deferred fill, each span with its fill columns."""
        if deferred is None:
            return self.net.forward_layers(h, lo, hi, step, cache, self._layer)
        for a, b in deferred.spans(lo, hi):
            h = self.net.forward_layers(h, a, b, deferred.step_at(a, step, host_rows, rows), cache,
                                        self._layer)
        return h

    def _exit_step(self, cache, tok, tok_ids, slot, pad, alive, run, tm, pending, deferred):
        net, heads, strat = self.net, run.heads, run.strategy
        L, B, dev = net.args.n_layers, tok.shape[0], tok.device
        n_slots = cache.k[0].shape[2]
        scratch = n_slots - 1  # recompute: padding queries write here; no real query reads it
        strat.reset(B, dev)
        rows = torch.tensor(alive, device=dev)  # (b,) global rows still running
        host_rows = list(alive)
        h = net.embed(tok[rows])  # (b, 1, D); column 0 is the new token, recompute adds columns
        padr = pad[rows]
        # compiled: attend over the whole (dynamic) cache and use the fused gemv, as the plain step
        kv_len = None if self.compiled else slot + 1
        step = net.make_step(torch.tensor([slot], device=dev), padr, n_slots, kv_len, self.compiled,
                             rows=None if len(alive) == B else rows)
        if self.compiled:
            _rows_dynamic(h, step)
        slots = None  # recompute: per-row slots (b, Q) of the queries (scratch = padding)
        extra = [0] * len(host_rows)  # recompute: real pending columns each running row carries
        plan = strat.plan([tok_ids[r] for r in host_rows]) if strat.planned else None
        stops = sorted(set(plan) | {L}) if plan is not None else strat.layers + [L]
        logits = torch.zeros(B, net.args.vocab_size, device=dev)
        depth: dict[int, int] = {}
        lo = 0
        # compiled policy: the candidate layer's graph also computes p(exit) (one call, not two)
        fuse = self._layer_policy is not None and strat.reads_policy and net.segments is None
        if deferred is not None:
            deferred.begin(host_rows)
        for stop in stops:
            p = None
            if pending is None and fuse and lo < stop < L:
                h = self._layers(h, lo, stop - 1, step, cache, deferred, host_rows, rows)
                st = step if deferred is None else deferred.step_at(stop - 1, step, host_rows, rows)
                h, p = self._layer_policy(net.layers[stop - 1], h, st, cache.k[stop - 1],
                                          cache.v[stop - 1], net.norm, heads.policies[str(stop)])
            elif pending is None:
                h = self._layers(h, lo, stop, step, cache, deferred, host_rows, rows)
            else:
                for j in range(lo, stop):  # layer by layer: pending positions join at their layer
                    joins = [pending.join(r, j) for r in host_rows]
                    if any(joins):
                        if slots is None:
                            slots = torch.full((len(host_rows), 1), slot, device=dev)
                        h, slots = _append_queries(h, slots, joins, scratch)
                        extra = [e + len(x) for e, x in zip(extra, joins)]
                        step = net.make_step(slots, padr, n_slots, kv_len, self.compiled,
                                             rows=None if len(host_rows) == B else rows)
                    h = net.forward_layers(h, j, j + 1, step, cache, self._layer)
                    tm.recompute_rows += sum(extra)
            lo = stop
            sig = None
            if stop == L:
                ex = [True] * len(host_rows)
            elif plan is not None:
                ex = [p == stop for p in plan]
            else:
                t0, c0 = time.perf_counter(), _dynamo_compile_s() if self.compiled else None
                sig = Signals(heads, stop, h[:, 0], self._exit_logits, self._exit_policy, p)
                ex = strat.decide(sig, rows).tolist()  # the data-dependent sync
                compiling = (_dynamo_compile_s() - c0) if c0 is not None else 0.0  # an exit head's graph
                tm.decision_s += time.perf_counter() - t0 - compiling
            if not any(ex):
                continue
            idx = torch.tensor([i for i, e in enumerate(ex) if e], device=dev)
            if sig is not None and sig._logits is not None:
                logits[rows[idx]] = sig.logits[idx]
            elif len(idx) == len(host_rows):
                logits[rows] = heads.logits(stop, h[:, 0], self._exit_logits)
            else:
                logits[rows[idx]] = heads.logits(stop, h[idx, 0], self._exit_logits)
            for i in idx.tolist():
                depth[host_rows[i]] = stop
                if deferred is not None:
                    deferred.exited(host_rows[i], slot, stop, h[i, 0] if stop < L else None)
            if stop < L and deferred is None:
                if pending is None:
                    t0 = time.perf_counter()
                    if self._filler is None:
                        self._filler = KVFiller(net)
                    every = len(idx) == len(host_rows)  # all running rows exit: no gather needed
                    self._filler.fill(cache, h if every else h[idx], stop,
                                      step if every else step.select(idx), run.kv_fill)
                    tm.fill_s += time.perf_counter() - t0
                else:  # every real query of the row waits for a deeper token of its row
                    s_host = slots.tolist() if slots is not None else None
                    for i in idx.tolist():
                        for c in range(h.shape[1]):
                            s_ = slot if s_host is None else s_host[i][c]
                            if s_ != scratch:
                                pending.rows[host_rows[i]].append((s_, stop, h[i, c]))
            keep = [i for i, e in enumerate(ex) if not e]
            if not keep:
                break
            kt = torch.tensor(keep, device=dev)
            h, rows, padr, step = h[kt], rows[kt], padr[kt], step.select(kt)
            if self.compiled:
                _rows_dynamic(h, step)
            host_rows = [host_rows[i] for i in keep]
            extra = [extra[i] for i in keep]
            if plan is not None:
                plan = [plan[i] for i in keep]
            if slots is not None:
                slots = slots[kt]
        return logits, depth

    def cascade_step(self, cache: StaticKVCache, small_cache: StaticKVCache, seq: torch.Tensor,
                     slot: int, pad: torch.Tensor, alive: list[int], run: ExitRun, tm: BatchTimings,
                     seen: list[int]) -> tuple[torch.Tensor, dict[int, int]]:
        """CascadeBERT with two checkpoints: the small model runs every token; rows where its max
        probability is below the threshold run the large model, which first catches up on the
        tokens it has not seen (slots seen[b]..slot, in one forward with per-row slots).

        seq (B, S) holds every row's token ids by slot. Returns logits (B, V) and {row: layers run}
        (small model's layers, plus the large model's when it took over: CascadeBERT's accounting).
        """
        net, small, strat = self.net, run.small, run.strategy
        B, dev = seq.shape[0], seq.device
        n_slots = cache.k[0].shape[2]
        rows = torch.tensor(alive, device=dev)
        sub = None if len(alive) == B else rows
        tok = seq[rows, slot][:, None]  # (b, 1)
        step = small.make_step(torch.tensor([slot], device=dev), pad[rows], small_cache.k[0].shape[2],
                               slot + 1, rows=sub)
        hs = small.forward_layers(small.embed(tok), 0, small.args.n_layers, step, small_cache)
        logits = torch.zeros(B, net.args.vocab_size, device=dev)
        ls = small.head(hs)[:, -1].float()  # (b, V)
        logits[rows] = ls
        t0 = time.perf_counter()
        ok = (ls.softmax(-1).amax(-1) >= strat.t).tolist()  # the data-dependent sync
        tm.decision_s += time.perf_counter() - t0
        Ls, L = small.args.n_layers, net.args.n_layers
        depth = {r: Ls for r, c in zip(alive, ok) if c}
        big = [r for r, c in zip(alive, ok) if not c]
        if big:
            back = [slot + 1 - seen[r] for r in big]  # tokens the large model has not seen, current included
            Q, br = max(back), torch.tensor(big, device=dev)
            if Q == 1:
                ip = torch.tensor([slot], device=dev)
                toks = seq[br, slot][:, None]
            else:  # left-padded to Q columns with the scratch slot, so the current token is last
                ip = torch.full((len(big), Q), n_slots - 1, device=dev)
                for i, (r, n) in enumerate(zip(big, back)):
                    ip[i, Q - n:] = torch.arange(seen[r], slot + 1, device=dev)
                toks = seq[br[:, None], ip]  # (u, Q)
            step = net.make_step(ip, pad[br], n_slots, slot + 1, rows=None if len(big) == B else br)
            h = net.forward_layers(net.embed(toks), 0, L, step, cache)  # (u, Q, D)
            logits[br] = net.head(h[:, -1:])[:, -1].float()
            tm.recompute_rows += (sum(back) - len(big)) * L
            for r in big:
                seen[r], depth[r] = slot + 1, Ls + L
        return logits, depth

    def new_cache(self, batch: int, n_slots: int) -> StaticKVCache:
        w = self.net.tok_embeddings.weight
        cache = StaticKVCache(self.net.args, batch, n_slots, w.dtype, layer_devices(self.net))
        if self.compiled:  # one graph for every cache length: mark the slot dimension dynamic
            for t in cache.k + cache.v:
                # maybe: the exit step's layer graph takes its mask from outside, with a concrete
                # length, and may specialize on it (a new cache length then recompiles it once)
                torch._dynamo.maybe_mark_dynamic(t, 2)
                if self.graphs:
                    torch._dynamo.mark_static_address(t)
        return cache


@torch.inference_mode()
def generate_batch(
    decoder: Decoder,
    prompts: list[list[int]],
    cfg: GenerationConfig,
    *,
    pad_id: int,
    eos_ids: list[int],
    generator: torch.Generator | None = None,
    on_token: Callable[[int, int], bool] | None = None,
    exit: ExitRun | None = None,
) -> tuple[list[RowOutput], BatchTimings]:
    """Decode a batch of token-id prompts.

    on_token(row, token_id) is called for each new token of an unfinished row and returns True when
    the row must stop (a stop string completed); EOS is handled here. `exit` (None = full depth)
    says where generated tokens leave; the prompt and the first generated token run at full depth.
    """
    net = decoder.net
    dev = net.tok_embeddings.weight.device
    L = net.args.n_layers
    B, T = len(prompts), max(len(p) for p in prompts)
    n_new = min(cfg.max_new_tokens, net.args.max_position_embeddings - T)
    small = exit.small if exit is not None else None
    recompute = exit is not None and exit.kv_fill == "recompute" and small is None
    defer = exit is not None and exit.defer and small is None and not recompute
    # One depth for every token (full; static when compiled): the plain step. Else the exit step.
    uniform = L if exit is None or exit.strategy.name == "full" else (
        exit.uniform_depth if decoder.compiled else None)
    # recompute and the cascade's catch-up pad their extra queries, and the exit step's deferred fill
    # its columns, to a scratch slot past every real one (the plain step has no fill to defer)
    scratch = int(recompute or small is not None or (defer and uniform is None))
    n_slots = min(cache_slots(T + n_new + scratch), net.args.max_position_embeddings + scratch)
    if decoder.compiled and small is not None:
        raise CeeGenError("compile does not work with a cascade over a second checkpoint (two models, "
                          "each with its own catch-up shapes): drop --compile")
    pending = _Pending(B) if recompute else None

    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, T - len(p):] = torch.tensor(p)
    pad = torch.tensor([T - len(p) for p in prompts], device=dev)  # (B,)
    tokens = tokens.to(dev)
    seen = torch.zeros(B, net.args.vocab_size, dtype=torch.bool, device=dev)  # repetition penalty
    for b, p in enumerate(prompts):
        seen[b, p] = True
    eos = torch.tensor(eos_ids or [-1], device=dev)

    cache = decoder.new_cache(B, n_slots)
    out = [RowOutput() for _ in range(B)]
    done = [False] * B
    timings = BatchTimings()

    t0 = time.perf_counter()
    step = net.make_step(torch.arange(T, device=dev), pad, n_slots, kv_len=T)
    h = net.forward_layers(net.embed(tokens), 0, L, step, cache)  # (B, T, D)
    cache.advance(0, L, T)
    if small is not None:  # the cascade's small model reads the prompt too; the large one emits first
        small_cache = StaticKVCache(small.args, B, n_slots, cache.k[0].dtype, dev)
        s_step = small.make_step(torch.arange(T, device=dev), pad, n_slots, kv_len=T)  # its own RoPE
        small.forward_layers(small.embed(tokens), 0, small.args.n_layers, s_step, small_cache)
        seq = torch.full((B, n_slots), pad_id, dtype=torch.long, device=dev)  # token ids by slot
        seq[:, :T] = tokens
        large_seen = [T] * B  # the large model has run every row's slots below this
    logits = net.head(h[:, -1:])[:, -1].float()  # (B, V): only the last position needs the LM head
    deferred = _Deferred(net, B, n_slots, pad) if defer and uniform is None else None
    compile_before = decoder.compile_s
    t1 = None
    last_depth: dict[int, int] = {}  # row -> layers run by the step that made its next token
    for i in range(n_new):
        nxt = select_next(logits, cfg, seen, generator)  # (B,)
        seen[torch.arange(B, device=dev), nxt] = True
        is_eos = torch.isin(nxt, eos)
        ids, eos_flags = nxt.tolist(), is_eos.tolist()  # the one host sync per token
        for b in range(B):
            if done[b]:
                continue
            out[b].token_ids.append(ids[b])
            # the first generated token comes from the full-depth prefill
            out[b].layers_per_token.append(L if i == 0 else last_depth.get(b, uniform))
            if eos_flags[b]:
                done[b], out[b].finish_reason = True, "stop"
            elif on_token is not None and on_token(b, ids[b]):
                done[b], out[b].finish_reason = True, "stop"
        if t1 is None:
            t1 = time.perf_counter()
            timings.prefill_s = t1 - t0
        if all(done) or i == n_new - 1:
            break
        alive = [b for b in range(B) if not done[b]]  # finished rows cost nothing in the exit steps
        if uniform is not None:
            logits = decoder.step(cache, nxt[:, None], T + i, pad, uniform,
                                  None if defer or exit is None else exit.kv_fill)
        elif small is not None:
            seq[:, T + i] = nxt
            logits, last_depth = decoder.cascade_step(cache, small_cache, seq, T + i, pad, alive, exit,
                                                      timings, large_seen)
        else:
            logits, last_depth = decoder.exit_step(cache, nxt[:, None], ids, T + i, pad, alive, exit,
                                                   timings, pending, deferred)
        cache.advance(0, L, 1)
    timings.decode_s = time.perf_counter() - (t1 or t0)
    timings.compile_s = decoder.compile_s - compile_before
    timings.decode_s -= timings.compile_s
    return out, timings
