"""Training on `accelerate`: device placement, mixed precision, gradient accumulation, data parallel.

`Accel` wraps one `accelerate.Accelerator` for a `cee-train` run:
- `device`: where the model and the batches live (`--device`; under `accelerate launch`, each
  process's own GPU);
- `autocast()`: the forward passes that train run under `--mixed-precision` bf16 or fp16 (the
  weights stay fp32; fp16 also gets a loss scaler);
- `step(opt, loss)`: backward (scaled by 1 / `--grad-accum`), and an optimizer step every
  `--grad-accum` batches (the last, incomplete group of an epoch is stepped too);
- with several processes (`accelerate launch --num_processes N -m cee_gen.train.cli ...`),
  `shard` gives each process every N-th batch of the same random order, and the trainable
  gradients are averaged across processes before each step. The backbone is frozen and identical
  in every process, so no DDP wrapper is needed; only heads, policies and LoRA factors train.
With the defaults (one process, fp32, no accumulation) a step is exactly AdamW's: runs are
reproducible and resume identically.
"""

from __future__ import annotations

import contextlib

import torch


class Accel:
    def __init__(self, device: str = "auto", mixed_precision: str = "no", grad_accum: int = 1):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState

        # The settings are process-wide singletons in accelerate; a process may train several
        # times with other settings (tests, notebooks), so they are set afresh for each run. The
        # distributed state (PartialState) is kept.
        AcceleratorState._reset_state()
        GradientState._reset_state()
        self.acc = Accelerator(cpu=device == "cpu", mixed_precision=mixed_precision,
                               gradient_accumulation_steps=1)
        self.grad_accum = grad_accum
        self._pending: dict[int, int] = {}  # id(optimizer) -> batches accumulated since its last step

    @property
    def device(self) -> torch.device:
        return self.acc.device

    @property
    def processes(self) -> int:
        return self.acc.num_processes

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    def autocast(self):
        return self.acc.autocast() if self.acc.mixed_precision != "no" else contextlib.nullcontext()

    def shard(self, batches: list) -> list:
        """This process's share of the batches: every N-th, the uneven tail dropped."""
        n = self.processes
        if n == 1:
            return batches
        usable = len(batches) - len(batches) % n
        return batches[self.acc.process_index:usable:n]

    def steps(self, n_batches: int) -> int:
        """How many of n_batches this process runs (see shard)."""
        return n_batches // self.processes if self.processes > 1 else n_batches

    def _params(self, opt):
        return [p for g in opt.param_groups for p in g["params"] if p.grad is not None]

    def step(self, opt: torch.optim.Optimizer, loss: torch.Tensor, last: bool = False) -> bool:
        """Backward of loss / grad_accum; an optimizer step when grad_accum batches have
        accumulated or `last` (the end of an epoch). Returns whether it stepped."""
        self.acc.backward(loss / self.grad_accum)
        k = self._pending[id(opt)] = self._pending.get(id(opt), 0) + 1
        if k < self.grad_accum and not last:
            return False
        params = self._params(opt)
        if self.processes > 1:
            for p in params:
                p.grad = self.acc.reduce(p.grad, reduction="mean")
        scaler = getattr(self.acc, "scaler", None)
        if scaler is not None:  # fp16: unscale, skip the step on inf/nan, update the scale
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        self._pending[id(opt)] = 0
        return True
