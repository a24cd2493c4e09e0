"""Verified early exit: cheap drafts propose tokens, one batched pass of the full model checks them,
and the output is exactly the full model's (greedy: token for token; sampling: its distribution).

Draft sources (`ExitConfig.draft`):
- `ngram`, prompt lookup (Saxena 2023; HF `prompt_lookup_num_tokens`): the longest n-gram (n <= `ngram`)
  that ends the row's context and occurred earlier in prompt + output proposes the tokens that
  followed its most recent earlier occurrence. Verified by one full-depth pass over the newest token
  and the drafts (k + 1 positions; the last one gives a bonus token when every draft is accepted).
- `exit`, self-speculation (LayerSkip, Elhoushi et al. 2024, with dynamic exits): the exit strategy
  runs the newest token and each draft through the exit step (engine/exit_step.py) and its exit head
  proposes the next token. The drafts' shallow K/V and hidden states are reused: the verify pass runs
  only the layers the drafts skipped, for every draft in one batched call.
- `auto`: n-gram drafts where the row's context has a match, exit drafts otherwise.

What is exact when drafts exit at different layers. Let the accepted context have exact K/V at every
layer, and draft positions t_0 (the newest token) .. t_{k-1} exit after e_0 .. e_{k-1} layers. t_0
at layers < e_0 attends only to exact K/V, so its states and K/V there are exact. t_i at layer j
attends to t_0..t_{i-1} at layer j, exact only if j < e_h for every earlier h (above e_h the fill
wrote an approximation). So with m = min(e_0 .. e_{k-1}), every draft position's hidden state after
m layers, and its K/V at layers < m, are exact. The verify pass starts each position from its state
after m layers (recorded while drafting: every position passes through layer m since e_i >= m) and
runs layers [m, L) for all of them at once, overwriting whatever the drafts' fill wrote there. In a
batch, m is the minimum over every row's draft positions; rows with n-gram drafts run layers [0, m)
first, from their tokens, and join there.

After the pass a prefix of a drafts is accepted (sampling.accept). Positions past it were never part
of the output: nothing reads their slots again (a query attends only to slots up to its own, and the
next pass writes the next tokens over them before attending), and the deferred fill's waiting
entries are dropped, since every kept position is now exact at every layer. Rows accept different
numbers of tokens, so each row has its own next slot; rows with fewer columns in a pass are padded
with columns that write the scratch slot (the cache's last), which no query reads.

Draft length (`max_draft` at most): per source, the acceptance rate of drafted tokens is measured as
the run goes, with the time of a plain step, of a verify pass per extra column and of a draft step;
each pass drafts the k that maximizes the expected tokens per unit of time, and none (a plain step)
when no k pays. Telemetry: `VerifyStats`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cee_gen.cache import cache_slots
from cee_gen.config import GenerationConfig
from cee_gen.engine.batch import Batch, make_fill
from cee_gen.engine.decoder import Decoder
from cee_gen.engine.exit_step import ExitRun, ExitStep
from cee_gen.engine.telemetry import BatchTimings, RowOutput
from cee_gen.engine.verify_pass import COLUMN_BUCKETS, pass_layers, pass_logits
from cee_gen.kv_fill import DeferredFill, fill_kind
from cee_gen.sampling import accept, processed, select_next


@dataclass
class VerifyStats:
    """Verify mode's telemetry for one batch."""

    passes: int = 0  # verify passes (a pass with no drafts is a plain step)
    row_passes: int = 0  # rows in those passes, summed
    plain_steps: int = 0
    tokens: int = 0  # tokens the passes emitted (accepted drafts, corrections and bonus tokens)
    proposed: dict = field(default_factory=lambda: {"ngram": 0, "exit": 0})
    accepted: dict = field(default_factory=lambda: {"ngram": 0, "exit": 0})
    draft_s: float = 0.0  # exit drafting (n-gram lookup is counted too, it is tiny)
    verify_s: float = 0.0

    def summary(self) -> dict:
        return {"passes": self.passes, "plain_steps": self.plain_steps,
                "tokens_per_pass": self.tokens / self.row_passes if self.row_passes else 0.0,
                "proposed": dict(self.proposed), "accepted": dict(self.accepted),
                "acceptance": {s: self.accepted[s] / self.proposed[s] if self.proposed[s] else None
                               for s in self.proposed},
                "draft_s": self.draft_s, "verify_s": self.verify_s}


class NgramIndex:
    """Prompt lookup over one row's growing context: for every n-gram (n <= n_max) seen with a token
    after it, where the most recent such continuation starts."""

    def __init__(self, ids: list[int], n_max: int):
        self.ids, self.n_max, self.next = [], n_max, {}
        for t in ids:
            self.append(t)

    def append(self, token: int) -> None:
        ids, p = self.ids, len(self.ids)
        for n in range(1, min(self.n_max, p) + 1):  # the n-grams ending just before the new token
            self.next[tuple(ids[p - n:])] = p
        ids.append(token)

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the longest recent match of the context's last n-gram."""
        ids = self.ids
        for n in range(min(self.n_max, len(ids)), 0, -1):
            start = self.next.get(tuple(ids[len(ids) - n:]))
            if start is not None:
                return ids[start:start + k]
        return []


class Pacer:
    """How many tokens to draft from one source: the k that maximizes expected tokens per unit of time.

    With per-token acceptance a (measured per row: rows differ, a summary copies more than a chat
    answer), k drafts give 1 + a + ... + a^k tokens (the bonus included; exit drafts have no bonus
    position: 1 + ... + a^(k-1) plus a^k for the last draft accepted). The time, in plain steps: a
    verify pass over its columns, measured per column count (compiled passes pad to a few buckets, and
    the cost steps up at each: `bucket`), plus k draft steps of d plain steps each. Costs start at
    guesses and follow measured times (moving averages)."""

    PROBE = 32  # a source that does not pay is tried again after this many passes without it

    def __init__(self, limit: int, draft_cost: float, bonus: bool, always: bool, rows: int = 1,
                 bucket=lambda cols: cols):
        self.limit, self.bonus, self.always = limit, bonus, always  # always: never fall back to 0
        self.a = [0.6] * rows  # per row: acceptance of a drafted token
        self.d, self.bucket = draft_cost, bucket  # a draft step's cost, in plain steps
        self.cost: dict[int, float] = {}  # a pass over this many (bucketed) columns, in plain steps
        self.t_plain: float | None = None
        self.idle = [0] * rows

    def pass_cost(self, cols: int) -> float:
        q = self.bucket(cols)
        return self.cost.get(q, 1.0 + 0.1 * (q - 1))

    def choose(self, row: int = 0) -> int:
        best_k, best = 0, 1.0  # a plain step: one token per unit of time
        a = min(self.a[row], 0.999)
        for k in range(1, self.limit + 1):
            tokens = (1 - a ** (k + 1)) / (1 - a) if self.bonus else (1 - a ** k) / (1 - a) + a ** k
            rate = tokens / (self.pass_cost(k + self.bonus) + self.d * k)
            if rate > best * 1.02:  # a little margin: noise should not make it draft for nothing
                best_k, best = k, rate
        if best_k == 0 and (self.always or self.idle[row] >= self.PROBE):
            best_k = min(2, self.limit)  # draft anyway (asked for), or probe whether it pays by now
        self.idle[row] = 0 if best_k else self.idle[row] + 1
        return best_k

    def accepted(self, proposed: int, accepted: int, row: int = 0) -> None:
        trials = accepted + (1 if accepted < proposed else 0)
        if trials:
            self.a[row] += 0.2 * (accepted / trials - self.a[row])

    def timed(self, columns: int, seconds: float, drafts: int = 0, draft_seconds: float = 0.0) -> None:
        """A pass over `columns` columns per row took `seconds`, after drafts taking draft_seconds."""
        if columns == 1 and not drafts:
            self.t_plain = seconds if self.t_plain is None else self.t_plain + 0.2 * (seconds - self.t_plain)
            return
        if self.t_plain:
            if columns > 1:
                q, c = self.bucket(columns), seconds / self.t_plain
                self.cost[q] = c if q not in self.cost else self.cost[q] + 0.2 * (c - self.cost[q])
            if drafts:
                self.d += 0.2 * (draft_seconds / self.t_plain / drafts - self.d)


@dataclass
class _Row:
    """One row's plan for a pass: its columns (tokens, or states after m layers) and where they came from."""

    source: str  # "ngram", "exit" or "none"
    drafts: list[int]
    k: int = 0  # exit drafts: how many to make
    q: torch.Tensor | None = None  # (k, V): the exit drafts' probabilities when they were sampled
    states: list[torch.Tensor] | None = None  # exit drafts: per position, {layer: h (D,)}
    exits: list[int] | None = None  # exit drafts: each position's exit layer


class Verifier:
    """Verify mode's decode loop for one batch (`run`), built on the plain model passes and the exit step."""

    def __init__(self, decoder: Decoder, cfg: GenerationConfig, exit: ExitRun,
                 generator: torch.Generator | None):
        self.dec, self.net, self.cfg, self.exit = decoder, decoder.net, cfg, exit
        self.gen, self.ngram = generator, exit.ngram
        source, max_draft = exit.draft, exit.max_draft
        can_exit = exit.strategy.name != "full"
        self.use_ngram = source in ("ngram", "auto")
        self.use_exit = source in ("exit", "auto") and can_exit
        self.source, self.max_draft = source, max_draft
        self.stats = VerifyStats()

    # ---- the loop ------------------------------------------------------------------------------

    def run(self, prompts: list[list[int]], *, pad_id: int, eos_ids: list[int],
            on_token: Callable[[int, int], bool] | None) -> tuple[list[RowOutput], BatchTimings]:
        net, cfg = self.net, self.cfg
        L, ctx = net.args.n_layers, net.args.max_position_embeddings
        B, T = len(prompts), max(len(p) for p in prompts)
        n_new = min(cfg.max_new_tokens, ctx - T)
        # drafts may run max_draft slots past the last token; the scratch slot comes after them
        n_slots = min(cache_slots(T + n_new + self.max_draft + 1), ctx + 1)
        self.scratch = n_slots - 1
        batch = self.batch = Batch(self.dec, prompts, n_new, n_slots, pad_id=pad_id, eos_ids=eos_ids,
                                   on_token=on_token)
        tm = batch.timings
        self.pad_id = pad_id
        # a source asked for by name always drafts (n-gram drafts only where the context has a match:
        # copying comes in bursts that a pacer backing off to plain steps misses); auto adapts
        bucket = self._bucket
        self.pacers = {"ngram": Pacer(self.max_draft, 0.0, True, self.source == "ngram", B, bucket),
                       "exit": Pacer(self.max_draft, 0.7, False, self.source == "exit", B, bucket)}
        if self.use_exit:
            kind = fill_kind(self.exit.kv_fill, self.exit.deferred)
            self.fill = make_fill(kind, self.dec, self.exit, B, n_slots, batch.pad, tm)
            self.drafter = ExitStep(self.dec, self.exit, self.fill, tm)
            self.drafter.trace = []
        t0 = time.perf_counter()
        logits = batch.prefill()
        first = select_next(logits, cfg, batch.seen, self.gen).tolist()
        tm.prefill_s = time.perf_counter() - t0
        compile_before = self.dec.compile_s
        self.pos = [T] * B  # each row's newest token's slot; that token is not in the cache yet
        self.cur = list(first)
        self.index = [NgramIndex(p + [t], self.ngram) for p, t in zip(prompts, first)]
        for b in range(B):
            batch.emit(b, first[b], L, "prefill")
        t1 = time.perf_counter()
        while batch.alive:
            self._round(batch.alive)
        tm.decode_s = time.perf_counter() - t1
        tm.compile_s = self.dec.compile_s - compile_before
        tm.decode_s -= tm.compile_s
        tm.verify = self.stats.summary()
        return batch.out, tm

    def _round(self, alive: list[int]) -> None:
        """Draft for each alive row, verify every row's columns in one pass, accept, emit."""
        batch, st = self.batch, self.stats
        t0 = time.perf_counter()
        plans = {}
        for b in alive:
            room = min(batch.n_new - len(batch.out[b].token_ids) - 1,
                       self.scratch - 1 - self.pos[b])  # drafts sit at pos+1.. below the scratch slot
            k_ngram = self.pacers["ngram"].choose(b) if self.use_ngram and room > 0 else 0
            drafts = self.index[b].draft(min(room, k_ngram)) if k_ngram else []
            k = min(room, self.pacers["exit"].choose(b)) if self.use_exit and not drafts and room > 0 else 0
            plans[b] = _Row("ngram", drafts) if drafts else _Row("exit", [], k=k) if k > 0 \
                else _Row("none", [])
        exit_rows = [b for b in alive if plans[b].source == "exit"]
        if exit_rows:
            self._draft_exits(exit_rows, plans)
        t1 = time.perf_counter()
        with self.dec.compile_clock() as clock:  # a new shape compiles inside a pass: not verify time
            logits = self._verify(alive, plans)  # {row: (n, V)}
        t2 = time.perf_counter() - clock.seconds
        st.draft_s += t1 - t0
        st.verify_s += t2 - t1
        st.passes += 1
        st.row_passes += len(alive)
        cols = max(_columns(plans[b]) for b in alive)
        st.plain_steps += cols == 1
        for src, pacer in self.pacers.items():  # what this pass cost, for the sources' cost models
            n_src = [len(plans[b].drafts) for b in alive if plans[b].source == src]
            if cols == 1 or n_src:
                pacer.timed(cols, t2 - t1, sum(n_src) if src == "exit" else 0, t1 - t0)
        for b in alive:
            self._accept(b, plans[b], logits[b])
        if self.use_exit and isinstance(self.fill, DeferredFill):
            for b in alive:  # every position kept is exact at every layer now; the rest is dropped
                self.fill.entries[b].clear()

    # ---- drafting ------------------------------------------------------------------------------

    def _draft_exits(self, rows: list[int], plans: dict) -> None:
        """Each row in `rows` drafts its k tokens, one exit step at a time; records every position's
        hidden state after each layer it ran, and its exit layer."""
        batch, dec = self.batch, self.drafter
        B = len(batch.out)
        tok = torch.full((B, 1), self.pad_id, dtype=torch.long, device=batch.pad.device)
        for b in rows:
            plans[b].states, plans[b].exits = [], []
            if self.cfg.do_sample:
                plans[b].q = []
        active = list(rows)
        last = {b: self.cur[b] for b in rows}
        i = 0
        while active:
            for b in active:
                tok[b, 0] = last[b]
            ids = tok[:, 0].tolist()
            dec.trace.clear()
            logits, depth = dec(batch.cache, tok, ids, [self.pos[b] + i for b in range(B)], batch.pad, active)
            z = processed(logits[active], self.cfg, batch.seen[active])  # (b, V)
            if self.cfg.do_sample:
                q = z.softmax(-1)
                nxt = torch.multinomial(q, 1, generator=self.gen)[:, 0].tolist()
            else:
                nxt = z.argmax(-1).tolist()
            for j, b in enumerate(active):
                p = plans[b]
                p.drafts.append(nxt[j])
                p.exits.append(depth[b])
                p.states.append({layer: h[hosts.index(b)] for layer, hosts, h in dec.trace if b in hosts})
                if self.cfg.do_sample:
                    p.q.append(q[j])
                last[b] = nxt[j]
            i += 1
            active = [b for b in active if len(plans[b].drafts) < plans[b].k]
        for b in rows:
            if self.cfg.do_sample:
                plans[b].q = torch.stack(plans[b].q)

    # ---- verifying -----------------------------------------------------------------------------

    def _verify(self, alive: list[int], plans: dict) -> dict[int, torch.Tensor]:
        """One pass of the full model over every alive row's columns -> {row: logits (n, V) fp32}.

        n-gram and plain rows: columns are the newest token and the drafts, from layer 0. Exit rows:
        the newest token and all drafts but the last, from their states after m layers."""
        net, batch, dec = self.net, self.batch, self.dec
        L, D, dev = net.args.n_layers, net.args.dim, batch.pad.device
        if len(alive) == len(batch.out) and all(plans[b].source == "none" for b in alive) \
                and len({self.pos[b] for b in alive}) == 1:  # no drafts: the plain step, whole
            tok = torch.tensor([[self.cur[b]] for b in alive], device=dev)
            logits = dec.step(batch.cache, tok, self.pos[alive[0]], batch.pad)  # (B, V)
            return {b: logits[i:i + 1] for i, b in enumerate(alive)}
        exit_rows = [b for b in alive if plans[b].source == "exit"]
        m = min(e for b in exit_rows for e in plans[b].exits) if exit_rows else L
        n_cols = {b: _columns(plans[b]) for b in alive}
        Q = self._bucket(max(n_cols.values()))
        slots = torch.full((len(alive), Q), self.scratch, dtype=torch.long)
        for i, b in enumerate(alive):
            slots[i, :n_cols[b]] = torch.arange(self.pos[b], self.pos[b] + n_cols[b])
        slots = slots.to(dev)
        h = torch.zeros(len(alive), Q, D, dtype=net.dtype, device=dev)
        tok_rows = [i for i, b in enumerate(alive) if plans[b].source != "exit"]
        if tok_rows:
            toks = torch.full((len(tok_rows), Q), self.pad_id, dtype=torch.long)
            for j, i in enumerate(tok_rows):
                toks[j, :n_cols[alive[i]]] = torch.tensor([self.cur[alive[i]]] + plans[alive[i]].drafts)
            sel = torch.tensor(tok_rows, device=dev)
            h0 = net.embed(toks.to(dev))
            if m > 0:
                h0 = self._layers(h0, [alive[i] for i in tok_rows], slots[sel], 0, m)
            h[sel] = h0
        for i, b in enumerate(alive):
            if plans[b].source == "exit":
                p = plans[b]
                # column 0: the newest token; column i: draft i; each from its state after m layers
                h[i, :n_cols[b]] = torch.stack([p.states[c][m] for c in range(n_cols[b])])
        h = self._layers(h, alive, slots, m, L)
        logits = pass_logits(dec, h)  # (b, Q, V) fp32
        return {b: logits[i, :n_cols[b]] for i, b in enumerate(alive)}

    def _bucket(self, cols: int) -> int:
        """The columns a pass of `cols` runs: compiled, one of a few counts, each its own static graph."""
        return next(c for c in COLUMN_BUCKETS if c >= cols) if self.dec.compiled else cols

    def _layers(self, h: torch.Tensor, rows: list[int], slots: torch.Tensor, lo: int,
                hi: int) -> torch.Tensor:
        return pass_layers(self.dec, self.batch.cache, self.batch.pad, h, rows, slots, lo, hi)

    # ---- accepting -----------------------------------------------------------------------------

    def _accept(self, b: int, plan: _Row, logits: torch.Tensor) -> None:
        batch, st, L = self.batch, self.stats, self.net.args.n_layers
        seen = batch.seen[b].clone()  # accept marks the accepted drafts; emit marks them again
        a, nxt = accept(logits, plan.drafts, self.cfg, seen, self.gen, plan.q)
        if plan.source != "none":
            st.proposed[plan.source] += len(plan.drafts)
            st.accepted[plan.source] += a
            self.pacers[plan.source].accepted(len(plan.drafts), a, b)
        emitted = plan.drafts[:a] + ([] if nxt is None else [nxt])
        for i, t in enumerate(emitted):
            st.tokens += 1
            self.index[b].append(t)
            if batch.emit(b, t, L, plan.source if i < a else "verify"):
                break
        # the verified positions are the newest token and the accepted drafts; the next token's slot
        self.pos[b] += a + (nxt is not None)
        self.cur[b] = emitted[-1]


def _columns(plan: _Row) -> int:
    """A row's columns in the verify pass: the newest token and its drafts; for exit drafts, the newest
    token and all drafts but the last (the last one was never run: nothing to verify it with)."""
    return len(plan.drafts) + (plan.source != "exit")
