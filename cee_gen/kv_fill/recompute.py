"""The `recompute` fill (EE-LLM's KV recomputation, and the cascade's catch-up): nothing is written at
the exit; the exited position re-enters as an extra query at its exit layer with the next token of its
row that runs that layer, and goes on with it, so its deep K/V is the full model's own.

Per row, `Pending` keeps the positions whose deeper layers have no K/V yet: (slot, e, h) says the
token at cache slot `slot` ran e layers and h (D,) is its hidden state after them (the input of layer
index e). The exit step then runs layer by layer, appending each row's joining positions as query
columns; rows carry different numbers of them, so padding columns write the scratch slot (the cache's
last), which no query reads. Exact, at the cost of running every skipped (position, layer) later:
counted in the step's `recompute_rows`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cee_gen.engine.exit_step import Running


class RecomputeFill:
    needs_scratch = True  # padding query columns write the scratch slot

    def __init__(self, batch: int, n_slots: int, timings):
        self.rows: list[list[tuple[int, int, torch.Tensor]]] = [[] for _ in range(batch)]  # per row
        self.scratch, self.tm = n_slots - 1, timings

    def join(self, row: int, layer: int) -> list[tuple[int, int, torch.Tensor]]:
        """Row `row`'s positions waiting to run layer index `layer`, taken off the list."""
        out = [p for p in self.rows[row] if p[1] == layer]
        if out:
            self.rows[row] = [p for p in self.rows[row] if p[1] != layer]
        return out

    def begin(self, st: Running) -> None:
        pass

    def layers(self, st: Running, lo: int, hi: int, run) -> None:
        """Layer by layer: waiting positions join at their layer as extra query columns."""
        for j in range(lo, hi):
            joins = [self.join(r, j) for r in st.host]
            if any(joins):
                if st.slots is None:
                    st.slots = torch.tensor(st.slot, device=st.rows.device)[:, None]  # (b, 1)
                self._append(st, joins)
                st.extra = [e + len(x) for e, x in zip(st.extra, joins)]
                st.step = st.net.make_step(st.slots, st.pad, st.cache.n_slots, st.kv_len, st.sub_rows)
            st.h = st.net.forward_layers(st.h, j, j + 1, st.step, st.cache, run)
            self.tm.recompute_rows += sum(st.extra)

    def _append(self, st: Running, joins: list[list]) -> None:
        """Add each row's joining positions as query columns of st.h (b, Q, D) and st.slots (b, Q),
        padded across rows with a zero state at the scratch slot."""
        b, n = len(joins), max(len(x) for x in joins)
        new_h = st.h.new_zeros(b, n, st.h.shape[-1])  # (b, n, D)
        new_s = torch.full((b, n), self.scratch, device=st.h.device)
        for i, x in enumerate(joins):
            for c, (s, _, state) in enumerate(x):
                new_h[i, c], new_s[i, c] = state, s
        st.h, st.slots = torch.cat([st.h, new_h], 1), torch.cat([st.slots, new_s], 1)

    def exited(self, st: Running, out: list[int], idx: torch.Tensor, layer: int) -> None:
        """Every real query of the exiting rows waits for a deeper token of its row."""
        if layer >= st.net.args.n_layers:
            return
        s_host = st.slots.tolist() if st.slots is not None else None
        for i in out:
            for c in range(st.h.shape[1]):
                s = st.slot[i] if s_host is None else s_host[i][c]
                if s != self.scratch:
                    self.rows[st.host[i]].append((s, layer, st.h[i, c]))
