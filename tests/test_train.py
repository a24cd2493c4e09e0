"""cee-train end to end on a tiny model: three stages run, losses fall, the heads drive generation."""

import gzip
import json

import pytest
from conftest import CORPUS, make_tiny_checkpoint

import cee_gen
from cee_gen.config import TrainConfig
from cee_gen.errors import CeeGenError
from cee_gen.train.trainer import collate, prepare, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_tiny_checkpoint(root / "m", n_layers=4, seed=2)
    with gzip.open(root / "alpaca.jsonl.gz", "wt") as f:
        for i in range(120):
            words = CORPUS[i % 4].split()
            f.write(json.dumps({"id": i, "instruction": " ".join(words[:3]), "input": "",
                                "output": " ".join(words[3:])}) + "\n")
    return root


def _cfg(setup, **kw):
    return TrainConfig(model=str(setup / "m"), data_dir=str(setup), out=str(setup / "h.safetensors"),
                       max_examples=60, max_seq_tokens=96, adapter_rank=8, batch_size=8, epochs=2,
                       lr_heads=3e-2, lr_policy=3e-2, lr_stage3=1e-2, alpha=0.05, template="chat", **kw)


def test_collate_aligns_targets_and_masks_response_positions_only():
    from cee_gen.train.trainer import Sequence

    tokens, target, mask = collate([Sequence([5, 6, 7, 8], 2), Sequence([5, 9, 10], 1)], 0, "cpu")
    assert tokens.tolist() == [[5, 6, 7, 8], [5, 9, 10, 0]]
    assert target.tolist() == [[6, 7, 8, -100], [9, 10, -100, -100]]
    # position t predicts token t+1: row 0's response is tokens 2..3, predicted at positions 1..2
    assert mask.tolist() == [[False, True, True, False], [True, True, False, False]]


def test_three_stages_run_losses_fall_and_the_heads_drive_the_policy_strategy(setup):
    out = train(_cfg(setup), progress=lambda m: None)
    recs = [json.loads(x) for x in (setup / "h.safetensors.metrics.jsonl").read_text().splitlines()]
    s1 = [r["loss"] for r in recs if r["stage"] == 1]
    assert s1 and sum(s1[-3:]) / 3 < sum(s1[:3]) / 3  # stage 1 learns
    assert any(r["stage"] == 2 for r in recs) and any(r["stage"] == 3 for r in recs)
    model = cee_gen.load_model(str(setup / "m"), dtype="float32", device="cpu")
    [r] = cee_gen.generate(model, "the quick brown", max_new_tokens=8, chat=False,
                           exit=cee_gen.ExitConfig(strategy="policy", heads=str(out)))
    assert r.stats["exit"] == "policy" and len(r.token_ids) == 8
    from safetensors import safe_open

    meta = json.loads(safe_open(str(out), "pt").metadata()["cee_gen_heads"])
    assert meta["training"]["config"]["alpha"] == 0.05 and "mean_memorized_layer" in meta["training"]


@pytest.mark.parametrize("direction", [-1, 1])
def test_stage2_moves_the_policy_the_way_its_reward_points(setup, monkeypatch, direction):
    """Reward depth (or shallowness) alone: REINFORCE must move the mean exit layer that way."""
    from cee_gen.train import trainer

    monkeypatch.setattr(trainer.ob, "hardness_reward",
                        lambda ce, e, m, L, alpha: direction * e.float())
    cfg = _cfg(setup, stages="2", explore="bernoulli", replicas=4, policy_init_p=0.3)
    cfg.epochs, cfg.lr_policy = 4, 0.1
    train(cfg, progress=lambda m: None)
    recs = [json.loads(x) for x in (setup / "h.safetensors.metrics.jsonl").read_text().splitlines()]
    depth = [r["mean_exit_layer"] for r in recs if r["stage"] == 2]
    first, last = sum(depth[:3]) / 3, sum(depth[-3:]) / 3
    assert (last - first) * direction > 0.3, depth


def test_prepare_keeps_rows_with_a_response(setup):
    model = cee_gen.load_model(str(setup / "m"), dtype="float32", device="cpu")
    seqs = prepare(model, _cfg(setup))
    assert seqs and all(1 <= s.n_prompt < len(s.ids) <= 96 for s in seqs)


@pytest.mark.parametrize("kw, words", [
    (dict(out=None), "needs --out"), (dict(stages="4"), "use a list of 1, 2, 3"),
    (dict(replicas=1), "replicas >= 2"), (dict(alpha=-1.0), "alpha must be"),
    (dict(dataset="squad"), "unknown dataset"),
])
def test_bad_training_settings_are_clear_errors(setup, kw, words):
    base = dict(model=str(setup / "m"), data_dir=str(setup), out=str(setup / "x.safetensors"))
    with pytest.raises(CeeGenError, match=words):
        train(TrainConfig(**{**base, **kw}), progress=lambda m: None)


def test_cee_train_cli_reports_errors_in_one_line(setup, capsys):
    from cee_gen.train.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--model", str(setup / "m"), "--stages", "9", "--out", str(setup / "y.safetensors")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "use a list of 1, 2, 3" in err and len(err.strip().splitlines()) == 1

