"""What one forward step of the model shares across its layers: where its queries sit in the KV cache
(`Step`: cache rows and slots, RoPE rows, and how attention reads the cache, `Sdpa` or `Flash`), the
extra K/V a layer writes without queries (`FillColumns`), and the cache reads and writes by slot."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass

import torch


@dataclass
class Sdpa:
    """Attention through SDPA: which cache slots each query may attend to."""

    mask: torch.Tensor  # (b, 1, T, S) bool
    kv_len: int | None  # read cache slots [0, kv_len) only; None = the whole cache (compiled steps)

    def select(self, idx: torch.Tensor, rows: torch.Tensor) -> Sdpa:
        return Sdpa(self.mask[idx], self.kv_len)


@dataclass
class Flash:
    """Attention through flash-attn (ops/flash.py): row r's queries are the slots up to seqlens[r] - 1
    and attend from slot leftpad[r] on; batch_idx: the cache rows they belong to (None = all)."""

    seqlens: torch.Tensor  # (b,) int32
    leftpad: torch.Tensor  # (b,) int32
    batch_idx: torch.Tensor | None = None  # (b,) int32

    def select(self, idx: torch.Tensor, rows: torch.Tensor) -> Flash:
        return Flash(self.seqlens[idx], self.leftpad[idx], rows.to(torch.int32))


@dataclass
class Step:
    """Where one forward step's queries sit, computed once per step and shared by every layer.

    Two layouts. The common one: every row writes the same slots (`slots` (T,)) and the batch is the
    whole cache batch (`rows` None), so K/V are written with one `index_copy_`. The early-exit one: a
    subset of the cache's rows runs (`rows` (b,), the rows still going deeper) and each row may write
    its own slots (`slots` (b, T): recompute's waiting positions, the cascade's catch-up).
    """

    slots: torch.Tensor  # (T,) cache slots written by this step, or (b, T) per row
    cos: torch.Tensor  # (b, T, 1, hd): the queries' RoPE rows
    sin: torch.Tensor  # (b, T, 1, hd)
    attn: Sdpa | Flash
    rows: torch.Tensor | None = None  # (b,) cache rows these queries belong to; None = all, in order
    _on: dict = field(default_factory=dict, repr=False, compare=False)  # copies on other devices

    def on(self, device: torch.device) -> Step:
        """This step with its tensors on `device` (a layer segment's, placement.py); made once per device."""
        if device == self.cos.device:
            return self
        if device not in self._on:
            self._on[device] = _to(self, device)
        return self._on[device]

    def select(self, idx: torch.Tensor) -> Step:
        """The same step for a subset `idx` (b',) of its rows (e.g. the rows that did not exit)."""
        rows = idx if self.rows is None else self.rows[idx]
        slots = self.slots[idx] if self.slots.dim() == 2 else self.slots
        return Step(slots, self.cos[idx], self.sin[idx], self.attn.select(idx, rows), rows)

    def index(self, b: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, 1) cache rows and (b, T) slots of the step's queries, for advanced indexing."""
        rows = torch.arange(b, device=self.slots.device) if self.rows is None else self.rows
        slots = self.slots if self.slots.dim() == 2 else self.slots.expand(b, T)
        return rows[:, None], slots


@dataclass
class FillColumns:
    """Earlier tokens' hidden states whose K/V a layer writes beside its own queries' K/V, attending
    from none of them: the layer norms and projects them with its own weights (the deferred KV fill,
    kv_fill/deferred.py). Padding columns write a scratch slot that no query reads."""

    h: torch.Tensor  # (b, P, D)
    slots: torch.Tensor  # (b, P) their cache slots
    cos: torch.Tensor  # (b, P, 1, hd) their RoPE rows
    sin: torch.Tensor

    def to(self, device: torch.device) -> FillColumns:
        return self if device == self.h.device else _to(self, device)


def _to(obj, device: torch.device):
    """A copy of a step dataclass with every tensor (nested ones too) on `device`."""
    vals = {}
    for f in fields(obj):
        if f.name == "_on":
            continue
        v = getattr(obj, f.name)
        vals[f.name] = v.to(device) if torch.is_tensor(v) else _to(v, device) if is_dataclass(v) else v
    return type(obj)(**vals)


def cache_write(cache_t: torch.Tensor, x: torch.Tensor, slots: torch.Tensor,
                rows: torch.Tensor | None) -> None:
    """Write x (b, T, H_kv, hd) into one layer's cache (B, H_kv, S, hd) at cache rows `rows` (b,)
    (None = all, in order) and slots (T,) shared by every row or (b, T) per row."""
    x = x.to(cache_t.dtype)  # no-op, except under autocast (mixed-precision training)
    if rows is None and slots.dim() == 1:
        cache_t.index_copy_(2, slots, x.transpose(1, 2))  # all rows, same slots
        return
    b, T = x.shape[:2]
    r = torch.arange(b, device=slots.device) if rows is None else rows
    cache_t[r[:, None], :, slots if slots.dim() == 2 else slots.expand(b, T)] = x  # (b, T) index pairs


def cache_read(cache_t: torch.Tensor, step: Step) -> torch.Tensor:
    """The slots [0, kv_len) of the step's rows: (b, H_kv, S', hd); a view when all rows run."""
    S = step.attn.kv_len if step.attn.kv_len is not None else cache_t.shape[2]
    t = cache_t[:, :, :S]
    return t if step.rows is None else t.index_select(0, step.rows)
