"""The deferred `propagate` fill (the default): the next token that runs a layer writes the K/V that
earlier exited tokens of its row skipped there, inside that layer's own K/V projection.

A token that exits after e layers leaves its state h_e (D,) here, with f = e: layers [f, L) of its
slot still lack K/V. The next token of its row that runs layer j >= f carries it as a fill column
(model.FillColumns): that layer writes RMSNorm_j -> K/V projection -> RoPE of h_e in the same
projection as its own token's, which is the eager fill's value, and the weights are read once for
both. When that token stops after d layers, every entry with f < d has its layers [f, d) written:
f = d (all done, and dropped, when d = L). Nothing reads a layer before a token runs it, so no
attention sees a missing entry; layers no later token runs are never filled.

Rows carry different numbers of entries; shorter rows are padded with columns that write the scratch
slot (the cache's last), which no query reads.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import torch

from cee_gen.model import Transformer
from cee_gen.step import FillColumns

if TYPE_CHECKING:
    from cee_gen.engine.exit_step import Running


class DeferredFill:
    needs_scratch = True  # padding columns write the scratch slot

    def __init__(self, net: Transformer, batch: int, n_slots: int, pad: torch.Tensor):
        self.net, self.pad, self.scratch = net, pad, n_slots - 1
        self.states = torch.zeros(batch, n_slots, net.args.dim, dtype=net.dtype, device=net.device)
        self.entries: list[dict[int, int]] = [{} for _ in range(batch)]  # per row: {slot: f}
        self.fs: list[int] = []
        self._memo: dict = {}

    def begin(self, st: Running) -> None:
        """A new decode step for st's rows: the layers at which their fill columns change."""
        self.fs = sorted({f for r in st.host for f in self.entries[r].values()})
        self._memo = {}

    def layers(self, st: Running, lo: int, hi: int, run) -> None:
        """Layers [lo, hi), cut where a new entry joins, so each span runs with one set of columns."""
        cuts = [lo] + [f for f in self.fs if lo < f < hi] + [hi]
        for a, b in zip(cuts, cuts[1:]):
            if a < b:
                st.h = st.net.forward_layers(st.h, a, b, st.step, st.cache, run, self.columns(st, a))

    def columns(self, st: Running, j: int) -> FillColumns | None:
        """The fill columns of layer j for st's rows (None: no row has an entry waiting there)."""
        n = bisect.bisect_right(self.fs, j)  # how many entry layers are <= j: the set's identity
        if n == 0:
            return None
        key = (n, tuple(st.host))
        if key not in self._memo:
            cols = [[s for s, f in self.entries[r].items() if f <= j] for r in st.host]
            P = max(len(c) for c in cols)
            if P == 0:
                self._memo[key] = None
            else:
                # at least 2 columns: under compile one graph (P dynamic) then serves every count, where
                # P = 1 would get its own (size-1 dimensions are specialized)
                P = max(P, 2)
                slots = torch.tensor([c + [self.scratch] * (P - len(c)) for c in cols],
                                     device=st.rows.device)  # (b, P)
                h = self.states[st.rows[:, None], slots]  # (b, P, D); padding: the zero state
                cos, sin = self.net.rope_rows(slots, self.pad[st.rows])
                for t in (h, slots, cos, sin):
                    torch._dynamo.maybe_mark_dynamic(t, 1)
                    torch._dynamo.maybe_mark_dynamic(t, 0)
                self._memo[key] = FillColumns(h, slots, cos, sin)
        return self._memo[key]

    def exited(self, st: Running, out: list[int], idx: torch.Tensor, layer: int) -> None:
        """st's rows `out` (positions in st) stopped after `layer` layers at st.slot."""
        for i in out:
            self.stopped(st.host[i], st.slot[i], layer, st.h[i, 0])

    def stopped(self, row: int, slot: int, depth: int, h: torch.Tensor) -> None:
        """Row `row`'s token at `slot` stopped after `depth` layers with state h (D,)."""
        ents = self.entries[row]
        if depth >= self.net.args.n_layers:
            ents.clear()
            return
        for s, f in ents.items():
            if f < depth:
                ents[s] = depth
        ents[slot] = depth
        self.states[row, slot] = h
