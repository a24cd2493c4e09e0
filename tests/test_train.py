"""cee-train end to end on a tiny model: three stages run, losses fall, the heads drive generation."""

import json

import pytest
import torch
from conftest import make_tiny_checkpoint, write_instruction_set

import cee_gen
from cee_gen.errors import CeeGenError
from cee_gen.train.config import TrainConfig
from cee_gen.train.stages import collate
from cee_gen.train.trainer import prepare, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_tiny_checkpoint(root / "m", n_layers=4, seed=2)
    write_instruction_set(root / "alpaca.jsonl.gz", 120)
    return root


def _cfg(setup, **kw):
    base = dict(model=str(setup / "m"), data_dir=str(setup), out=str(setup / "h.safetensors"),
                max_examples=60, max_seq_tokens=96, adapter_rank=8, batch_size=8, epochs=2,
                lr_heads=3e-2, lr_policy=3e-2, lr_stage3=1e-2, alpha=0.05, template="chat")
    return TrainConfig(**{**base, **kw})


def test_collate_aligns_targets_and_masks_response_positions_only():
    from cee_gen.train.stages import Sequence

    tokens, target, mask = collate([Sequence([5, 6, 7, 8], 2), Sequence([5, 9, 10], 1)], 0, "cpu")
    assert tokens.tolist() == [[5, 6, 7, 8], [5, 9, 10, 0]]
    assert target.tolist() == [[6, 7, 8, -100], [9, 10, -100, -100]]
    # position t predicts token t+1: row 0's response is tokens 2..3, predicted at positions 1..2
    assert mask.tolist() == [[False, True, True, False], [True, True, False, False]]


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(), dict(lora_rank=0), dict(weighting="cosee"),
                                dict(lora_rank=0, weighting="cosee"),
                                dict(mixed_precision="bf16", grad_accum=2, lr_heads=6e-2, lr_lora=2e-3)],
                         ids=["lora", "frozen", "lora-cosee", "frozen-cosee", "bf16-accumulated"])
def test_three_stages_run_losses_fall_and_the_heads_drive_the_policy_strategy(setup, kw):
    out = train(_cfg(setup, **kw), progress=lambda m: None, quiet=True)
    recs = [json.loads(x) for x in (setup / "h.safetensors.metrics.jsonl").read_text().splitlines()]
    s1 = [r["loss"] for r in recs if r["stage"] == 1]
    assert s1 and sum(s1[-3:]) / 3 < sum(s1[:3]) / 3  # stage 1 learns
    osc = [r["osc"] for r in recs if r["stage"] == 1 and "osc" in r]
    assert (len(osc) == len(s1)) if kw.get("weighting") == "cosee" else not osc  # COSEE's calibration term
    assert any(r["stage"] == 2 for r in recs) and any(r["stage"] == 3 for r in recs)
    model = cee_gen.load_model(str(setup / "m"), dtype="float32", device="cpu")
    [r] = cee_gen.generate(model, "the quick brown", max_new_tokens=8, chat=False,
                           exit=cee_gen.ExitConfig(strategy="policy", heads=str(out)))
    assert r.stats["exit"] == "policy" and len(r.token_ids) == 8
    from safetensors import safe_open

    meta = json.loads(safe_open(str(out), "pt").metadata()["cee_gen_heads"])
    assert meta["training"]["config"]["alpha"] == 0.05 and "mean_memorized_layer" in meta["training"]
    assert set(meta["training"]["exit_histograms"]) == {"memorized", "after stage 2", "after stage 3"}
    assert (meta["lora"] is None) == (kw.get("lora_rank") == 0)
    assert (setup / "h.safetensors.png").stat().st_size > 1000  # the losses and histograms plot
    assert not (setup / "h.safetensors.ckpt").exists()  # the checkpoint goes once the file is written


@pytest.mark.slow
def test_lora_fine_tuning_changes_the_model_and_the_file_carries_it(setup):
    from cee_gen.exits.heads import load_heads

    out = train(_cfg(setup, stages="1"), progress=lambda m: None, quiet=True)
    base = cee_gen.load_model(str(setup / "m"), dtype="float32", device="cpu")
    tuned = cee_gen.load_model(str(setup / "m"), dtype="float32", device="cpu")
    load_heads(out, tuned)
    w0, w1 = base.net.layers[0].attention.wqkv.weight, tuned.net.layers[0].attention.wqkv.weight
    assert (w1 - w0).abs().max() > 1e-4  # stage 1 trained the LoRA, the load merged it
    assert torch.equal(base.net.tok_embeddings.weight, tuned.net.tok_embeddings.weight)


def test_streamed_memorized_layers_equal_the_full_table(setup):
    """Top-down evaluation (stop at the first wrong classifier) gives objectives.memorized_layer of
    the complete correctness table."""
    from cee_gen.exits.heads import ExitHeads
    from cee_gen.train import objectives as ob
    from cee_gen.train.stages import collect_states, memorized_layers

    model = cee_gen.load_model(str(setup / "m"), dtype="float32", device="cpu")
    net, L = model.net, model.n_layers
    seqs = prepare(model, _cfg(setup))[:12]
    heads = ExitHeads(net, [1, 2, 3], adapter_rank=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in heads.adapters.parameters():
            p.normal_(0, 0.05)
    seen = set()
    for target in ("gold", "self"):
        X, gold, own = collect_states(net, seqs, model.pad_token_id, [1, 2, 3], 5)
        y = gold if target == "gold" else own
        with torch.no_grad():
            correct = torch.stack([heads.logits(x, X[x]).argmax(-1) == y for x in [1, 2, 3, L]])
        want = ob.memorized_layer(correct, [1, 2, 3, L])
        _, got = memorized_layers(net, heads, seqs, model.pad_token_id, [1, 2, 3], target, 5)
        assert torch.equal(got, want)
        seen |= set(want.tolist())
    assert len(seen) > 2, seen  # the tables are not trivial


@pytest.mark.slow
def test_resume_after_an_interruption_ends_with_the_same_heads(setup, monkeypatch):
    from safetensors.torch import load_file

    from cee_gen.train import trainer

    ref = train(_cfg(setup, out=str(setup / "ref.safetensors")), progress=lambda m: None, quiet=True)
    out = setup / "cut.safetensors"

    def crash(*a, **k):
        raise KeyboardInterrupt

    real_stage3 = trainer.stage3
    monkeypatch.setattr(trainer, "stage3", crash)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(setup, out=str(out)), progress=lambda m: None, quiet=True)
    assert (setup / "cut.safetensors.ckpt").is_file() and not out.exists()
    monkeypatch.setattr(trainer, "stage3", real_stage3)
    train(_cfg(setup, out=str(out), resume=True), progress=lambda m: None, quiet=True)
    a, b = load_file(str(ref)), load_file(str(out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"}  # noqa: E731
                       for x in p.read_text().splitlines()]
    assert strip(setup / "ref.safetensors.metrics.jsonl") == strip(setup / "cut.safetensors.metrics.jsonl")


def test_resume_refuses_other_settings_and_a_missing_checkpoint(setup, monkeypatch):
    from cee_gen.train import trainer

    with pytest.raises(CeeGenError, match="no checkpoint"):
        train(_cfg(setup, out=str(setup / "none.safetensors"), resume=True), progress=lambda m: None)
    monkeypatch.setattr(trainer, "stage2", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(setup, out=str(setup / "r.safetensors")), progress=lambda m: None, quiet=True)
    with pytest.raises(CeeGenError, match=r"other settings \(\['alpha'\]\)"):
        train(_cfg(setup, out=str(setup / "r.safetensors"), resume=True, alpha=0.5), progress=lambda m: None)


class _Planted:
    """A pickle that runs code when loaded without weights_only."""

    def __reduce__(self):
        import os

        return (os.system, ("touch PLANTED_CODE_RAN",))


@pytest.mark.parametrize("content", ["planted", "damaged", "foreign"])
def test_resume_runs_no_code_from_a_planted_checkpoint_and_names_a_bad_one(setup, tmp_path, monkeypatch,
                                                                          content):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "h.safetensors"
    ckpt = tmp_path / "h.safetensors.ckpt"
    if content == "planted":
        torch.save({"config": _Planted()}, ckpt)
    elif content == "damaged":
        ckpt.write_bytes(b"PK\x03\x04 not a whole zip")
    else:
        torch.save({"weights": torch.zeros(2)}, ckpt)
    with pytest.raises(CeeGenError, match="--resume: .* (is not a cee-train checkpoint|is damaged)") as e:
        train(_cfg(setup, out=str(out), resume=True), progress=lambda m: None)
    assert "\n" not in str(e.value) and not (tmp_path / "PLANTED_CODE_RAN").exists()


@pytest.mark.slow
@pytest.mark.parametrize("direction", [-1, 1])
def test_stage2_moves_the_policy_the_way_its_reward_points(setup, monkeypatch, direction):
    """Reward depth (or shallowness) alone: REINFORCE must move the mean exit layer that way."""
    from cee_gen.train import stages

    monkeypatch.setattr(stages.ob, "hardness_reward",
                        lambda ce, e, m, L, alpha: direction * e.float())
    cfg = _cfg(setup, stages="2", explore="bernoulli", replicas=4, policy_init_p=0.3)
    cfg.epochs, cfg.lr_policy = 4, 0.1
    train(cfg, progress=lambda m: None, quiet=True)
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



def test_regression_start_solves_the_least_squares_problem_and_beats_the_logit_lens(setup):
    """At full rank with no ridge the fitted adapter satisfies the normal equations (the residual is
    orthogonal to the inputs); at low rank it still brings the heads' CE below the logit lens'."""
    import torch.nn.functional as F

    from cee_gen.exits.heads import ExitHeads
    from cee_gen.train.stages import collect_states, fit_adapters

    model = cee_gen.load_model(str(setup / "m"), dtype="float32", device="cpu")
    net, L = model.net, model.n_layers
    seqs = prepare(model, _cfg(setup))
    X, gold, own = collect_states(net, seqs, model.pad_token_id, [1, 2, 3], 8)
    full = ExitHeads(net, [1, 2, 3], adapter_rank=net.args.dim)
    r2 = fit_adapters(full, X, ridge=1e-9)
    assert all(0 < v <= 1 for v in r2.values())
    with torch.no_grad():
        T = net.norm(X[L]).double()
        for x in (1, 2, 3):
            Z = net.norm(X[x]).double()
            resid = T - full.adapters[str(x)](net.norm(X[x])).double()
            assert (Z.T @ resid).abs().max() < 1e-3 * (Z.T @ (T - Z)).abs().max()
        low = ExitHeads(net, [1, 2, 3], adapter_rank=8)
        fit_adapters(low, X)
        lens = ExitHeads(net, [1, 2, 3])
        for x in (1, 2, 3):
            def ce(h, x=x):
                return F.cross_entropy(h.logits(x, X[x]), own).item()

            assert ce(low) < ce(lens), x


@pytest.mark.slow
def test_init_starts_from_a_heads_file_and_a_mismatched_one_is_refused(setup):
    from safetensors import safe_open
    from safetensors.torch import load_file

    first = train(_cfg(setup, stages="1", out=str(setup / "s1.safetensors")), progress=lambda m: None,
                  quiet=True)
    second = train(_cfg(setup, stages="2", init=str(first), out=str(setup / "s2.safetensors")),
                   progress=lambda m: None, quiet=True)
    a, b = load_file(str(first)), load_file(str(second))
    kept = [k for k in a if k.startswith(("lora.", "adapters."))]
    assert kept and all(torch.equal(a[k], b[k]) for k in kept)  # stage 2 trains the policy only
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("policies."))
    meta = json.loads(safe_open(str(second), "pt").metadata()["cee_gen_heads"])
    assert meta["training"]["init"]["path"] == str(first)  # where it started is on record
    with pytest.raises(CeeGenError, match="differ from this run's"):
        train(_cfg(setup, stages="2", init=str(first), adapter_rank=4, out=str(setup / "s3.safetensors")),
              progress=lambda m: None)
