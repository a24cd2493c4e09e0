"""Training steps through accelerate: accumulation equals one big batch, the epoch's incomplete
group is stepped, data-parallel sharding, bf16 autocast end to end, and fp16's CPU refusal."""

import pytest
import torch

from cee_gen.errors import CeeGenError
from cee_gen.train.accel import Accel
from cee_gen.train.config import TrainConfig


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 5, generator=g), torch.randn(8, 1, generator=g)
    lin = torch.nn.Linear(5, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1, 5, generator=g))
        lin.bias.zero_()
    return lin, x, y


def test_two_accumulated_half_batches_take_the_step_of_the_whole_batch():
    a, x, y = _problem()
    b, _, _ = _problem()
    acc1 = Accel("cpu", grad_accum=1)
    opt = torch.optim.AdamW(a.parameters(), lr=0.1)
    assert acc1.step(opt, torch.nn.functional.mse_loss(a(x), y))
    acc2 = Accel("cpu", grad_accum=2)
    opt2 = torch.optim.AdamW(b.parameters(), lr=0.1)
    assert not acc2.step(opt2, torch.nn.functional.mse_loss(b(x[:4]), y[:4]))  # accumulated, no step
    assert torch.equal(b.weight, _problem()[0].weight)
    assert acc2.step(opt2, torch.nn.functional.mse_loss(b(x[4:]), y[4:]))
    assert torch.allclose(a.weight, b.weight, atol=1e-6) and torch.allclose(a.bias, b.bias, atol=1e-6)


def test_the_last_incomplete_group_of_an_epoch_is_stepped():
    a, x, y = _problem()
    w0 = a.weight.clone()
    acc = Accel("cpu", grad_accum=4)
    opt = torch.optim.AdamW(a.parameters(), lr=0.1)
    assert acc.step(opt, torch.nn.functional.mse_loss(a(x), y), last=True)
    assert not torch.equal(a.weight, w0) and a.weight.grad is None


def test_each_process_gets_every_nth_batch_and_the_same_count(monkeypatch):
    acc = Accel("cpu")
    monkeypatch.setattr(Accel, "processes", property(lambda self: 3))
    got = []
    for rank in range(3):
        monkeypatch.setattr(acc.acc.state, "process_index", rank, raising=False)
        monkeypatch.setattr(type(acc.acc), "process_index", property(lambda self, r=rank: r))
        got.append(acc.shard(list(range(11))))
    assert got == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]  # 9 and 10 dropped: every process steps 3 times


def test_bf16_autocast_runs_the_forward_in_bf16_and_keeps_fp32_weights():
    a, x, _ = _problem()
    acc = Accel("cpu", mixed_precision="bf16")
    with acc.autocast():
        out = a(x)
    assert out.dtype == torch.bfloat16 and a.weight.dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_fp16_without_a_gpu_is_a_clear_error():
    with pytest.raises(CeeGenError, match="fp16 needs a CUDA GPU"):
        TrainConfig(out="h.safetensors", mixed_precision="fp16").validate()


@pytest.mark.slow
def test_two_data_parallel_processes_split_the_batches_and_write_one_file(tmp_path):
    """torchrun, 2 CPU processes (gloo): each runs half the steps, gradients are averaged, and the
    main process alone writes the heads file, which loads and drives generation."""
    import json
    import os
    import subprocess
    import sys

    from conftest import make_tiny_checkpoint, write_instruction_set

    import cee_gen

    make_tiny_checkpoint(tmp_path / "m", n_layers=4, seed=2)
    write_instruction_set(tmp_path / "alpaca.jsonl.gz", 80)
    out = tmp_path / "h.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "cee_gen.train.cli", "--model", str(tmp_path / "m"), "--data-dir", str(tmp_path),
           "--out", str(out), "--max-examples", "64", "--max-seq-tokens", "96", "--adapter-rank", "4",
           "--batch-size", "8", "--template", "chat", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(x) for x in (tmp_path / "h.safetensors.metrics.jsonl").read_text().splitlines()]
    import math
    import re

    n_seqs = int(re.search(r"cee-train: (\d+) sequences", r.stderr).group(1))
    steps = [len([x for x in recs if x["stage"] == k]) for k in (1, 2, 3)]
    assert steps == [math.ceil(n_seqs / 8) // 2] * 3  # each process ran half the batches; one wrote
    assert r.stderr.count("cee-train: wrote") == 1
    model = cee_gen.load_model(str(tmp_path / "m"), dtype="float32", device="cpu")
    [g] = cee_gen.generate(model, "the quick brown", max_new_tokens=4, chat=False,
                           exit=cee_gen.ExitConfig(strategy="policy", heads=str(out)))
    assert len(g.token_ids) == 4
