"""cee-bench: the quick preset end to end on a tiny model (schema, finite numbers, baselines on the
same weights, resume), the metrics, the calibration rule, and the weight export HF runs."""

import gzip
import json
import math

import pytest
import torch
from conftest import CORPUS, make_tiny_checkpoint, write_instruction_set

import cee_gen
from cee_gen.bench import metrics
from cee_gen.bench.config import BenchConfig
from cee_gen.bench.settings import BASELINES, grid
from cee_gen.bench.suite import Journal, run
from cee_gen.bench.summary import calibrate
from cee_gen.errors import CeeGenError
from cee_gen.exits.heads import ExitHeads
from cee_gen.weights.loading import convert_hf_state_dict, to_hf_state_dict
from cee_gen.weights.lora import LoRA


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny 4-layer model, heads with policies, adapters and a non-zero LoRA, and the three sets."""
    root = tmp_path_factory.mktemp("bench")
    make_tiny_checkpoint(root / "m", n_layers=4, seed=3)
    model = cee_gen.load_model(str(root / "m"), dtype="float32", device="cpu")
    lora = LoRA(model.args, 2, ["q", "v"])
    with torch.no_grad():
        for p in lora.B.values():
            p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    ExitHeads(model.net, [1, 2, 3], adapter_rank=2, policy="linear", policy_init_p=0.5, lora=lora).save(
        root / "h.safetensors", model.name
    )
    data = root / "data"
    data.mkdir()
    write_instruction_set(data / "alpaca.jsonl.gz", 60)
    write_instruction_set(data / "dolly.jsonl.gz", 60)
    with gzip.open(data / "cnndm_test.jsonl.gz", "wt") as f:
        for i in range(60):
            w = CORPUS[i % 4].split()
            row = {"id": f"a{i}", "article": " ".join(w), "highlights": " ".join(w[:6]).lower()}
            f.write(json.dumps(row) + "\n")
    return root


def _cfg(setup, **kw):
    return BenchConfig(
        **{
            **dict(
                model=str(setup / "m"),
                heads=str(setup / "h.safetensors"),
                preset="quick",
                data_dir=str(setup / "data"),
                out=str(setup / "out" / "b.jsonl"),
            ),
            **kw,
        }
    )


def test_quick_preset_writes_finite_records_for_every_set_and_setting_then_resumes(setup):
    recs = run(_cfg(setup, fresh=True), progress=False)
    settings = [r for r in recs if r["kind"] == "setting"]
    n_swept = sum(not s.baseline for s in grid(4, quick=True))
    for ds in ("alpaca", "dolly", "cnndm"):
        test = {r["setting"] for r in settings if r["dataset"] == ds and r["split"] == "test"}
        assert test == {s.label for s in BASELINES + grid(4, quick=True)}
        dev = {r["setting"] for r in settings if r["dataset"] == ds and r["split"] == "dev"}
        assert len(dev) == n_swept + 1  # full depth and the swept settings; no baselines, no verify on dev
    for r in settings:
        assert r["rows"] == 2 and len(r["row_ids"]) == 2
        nums = [
            r["mean_layers"],
            r["ideal_speedup"],
            r["ms_per_token"],
            r["measured_speedup"],
            r["token_agreement"],
            r["rougeL_vs_full"],
            r["rougeL_delta"],
            r["rougeL_delta_se"],
            *r["rouge"].values(),
            *r["authors_rouge"].values(),
        ]
        assert all(isinstance(x, (int, float)) and math.isfinite(x) for x in nums), r["setting"]
        assert 1 <= r["mean_layers"] <= 4 and sum(r["exit_histogram"].values()) > 0
        assert r["machine"]["cpu"] is not None and r["versions"]["torch"] and r["commit"]
    by = {(r["dataset"], r["split"], r["setting"]): r for r in settings}
    full, hf = by[("alpaca", "test", "full")], by[("alpaca", "test", "hf generate")]
    assert full["token_agreement"] == 1.0 and full["measured_speedup"] == 1.0
    # HF runs the same (LoRA-merged) weights: its greedy tokens are ours; the original model's are not
    assert hf["token_agreement"] == 1.0 and hf["weights"] == full["weights"] != "base"
    assert by[("alpaca", "test", "base full")]["weights"] == "base"
    for ds in ("alpaca", "dolly", "cnndm"):  # verify mode gives full depth's tokens, several a pass or not
        v = by[(ds, "test", "verify ngram")]
        assert v["token_agreement"] == 1.0 and v["tokens_per_pass"] >= 1.0
    cal = [r for r in recs if r["kind"] == "calibration"]
    assert {c["target"] for c in cal} == {"rougeL_drop:1", "agreement:0.9"}
    out = setup / "out"
    assert (out / "b.md").read_text().count("### ") == 3
    assert all((out / f"b_{ds}.png").stat().st_size > 0 for ds in ("alpaca", "dolly", "cnndm"))

    journal = (out / "b.rows.jsonl").read_text().splitlines()
    (out / "b.rows.jsonl").write_text("\n".join(journal[:-3]) + "\n" + journal[-3][:20])  # cut mid-line
    again = run(_cfg(setup), progress=False)  # resumes: re-runs only the three lost pairs
    # the kept lines and the three pairs run again (the cut line is dropped): nothing else ran
    lines = (out / "b.rows.jsonl").read_text().splitlines()
    assert len(lines) == len(journal) and all(json.loads(x) for x in lines)

    def strip(rs):
        return {
            (r["dataset"], r.get("split"), r.get("setting", r.get("family")), r.get("target")): (
                r.get("rouge"),
                r.get("mean_layers"),
                r.get("chosen"),
            )
            for r in rs
        }

    assert strip(again) == strip(recs)


def test_a_journal_from_other_generation_settings_is_refused(setup):
    run(_cfg(setup, fresh=True, datasets="alpaca", dev_limit=0, strategies="static"), progress=False)
    with pytest.raises(CeeGenError, match="new_tokens=6.*--fresh"):
        run(_cfg(setup, datasets="alpaca", new_tokens=5), progress=False)


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(preset="fast"), "unknown preset"),
        (dict(limit=0), "limit must be a positive integer"),
        (dict(targets="rouge:1"), "calibration target 'rouge:1'"),
        (dict(targets="agreement:2"), "agreement is a share"),
        (dict(datasets="squad"), "unknown dataset 'squad'"),
        (dict(strategies="policy,magic"), "unknown strategy family \\['magic'\\]"),
    ],
)
def test_bad_benchmark_settings_are_clear_errors(setup, kw, words):
    with pytest.raises(CeeGenError, match=words):
        run(_cfg(setup, **kw), progress=False)


def test_cee_bench_cli_reports_errors_in_one_line(setup, capsys):
    from cee_gen.bench.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--model", str(setup / "nowhere"), "--preset", "quick"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and err.startswith("cee-bench: error:")


def test_hf_export_inverts_the_import_for_fused_weights(setup):
    model = cee_gen.load_model(str(setup / "m"), dtype="float32", device="cpu")
    back = convert_hf_state_dict(to_hf_state_dict(model.net), model.args)
    sd = model.net.state_dict()
    assert set(back) == {k for k in sd if not k.startswith("rope") and k != "output.weight"}
    assert all(torch.equal(back[k], sd[k]) for k in back)


def test_rouge_both_ways_on_known_answers():
    assert metrics.rouge_f("the cats sat", "the cat sat")["rouge1"] == pytest.approx(1.0)  # stemming
    assert metrics.authors_rouge_f("the cats sat", "the cat sat")["rouge1"] == pytest.approx(2 / 3, abs=1e-6)
    assert metrics.rouge_f("a b c d", "a b x d")["rouge2"] == pytest.approx(1 / 3)
    assert metrics.authors_rouge_f("", "a b") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert metrics.token_agreement([1, 2, 3], [1, 5, 3, 4]) == 0.5


def _rec(split, setting, family, knob, layers, rougeL, agree):
    return {
        "kind": "setting",
        "dataset": "alpaca",
        "split": split,
        "setting": setting,
        "family": family,
        "knob": knob,
        "mean_layers": layers,
        "ideal_speedup": 30 / layers,
        "measured_speedup": 30 / layers,
        "rouge": {"rouge1": 0, "rouge2": 0, "rougeL": rougeL},
        "token_agreement": agree,
        "rows": 4,
    }


def test_calibration_picks_the_fewest_layers_meeting_the_target_on_dev_and_reports_test():
    recs = [
        _rec("dev", "full", "full", None, 30, 30.0, 1.0),
        _rec("test", "full", "full", None, 30, 28.0, 1.0),
    ]
    for t, layers, dev_r, test_r in ((0.3, 29, 29.5, 28.0), (0.15, 26, 29.2, 26.0), (0.08, 20, 25.0, 27.0)):
        recs += [
            _rec("dev", f"policy t={t}", "policy", t, layers, dev_r, 0.9),
            _rec("test", f"policy t={t}", "policy", t, layers + 0.5, test_r, 0.8),
        ]
    recs.append(_rec("dev", "static k=20", "static", 20, 20, 10.0, 0.1))
    [pol, stat] = calibrate(recs, [("rougeL_drop", 1.0)], {})
    # t=0.08 has the fewest layers but loses 5 points on dev; t=0.15 is the deepest cut within 1 point
    assert pol["chosen"] == "policy t=0.15" and pol["test"]["mean_layers"] == 26.5
    assert pol["test_meets_target"] is False  # 2 points below full on test: reported, not hidden
    assert stat["chosen"] is None and stat["test"] is None


def test_journal_drops_a_line_cut_by_an_interruption_and_appends_cleanly(tmp_path):
    p = tmp_path / "j.rows.jsonl"
    j = Journal(p, {"model": "m"}, fresh=False)
    j.add({"dataset": "alpaca", "split": "test", "setting": "full", "row": "1"})
    p.write_text(p.read_text() + '{"dataset": "alp')
    j = Journal(p, {"model": "m"}, fresh=False)
    assert j.done == {("alpaca", "test", "full", "1")}
    j.add({"dataset": "alpaca", "split": "test", "setting": "full", "row": "2"})
    assert len(Journal(p, {"model": "m"}, fresh=False).done) == 2


@pytest.mark.default_model
def test_quick_preset_on_the_default_model_with_its_shipped_heads(default_model, tmp_path):
    """The documented smoke run: shipped heads (their LoRA merged), HF generate on the same weights
    gives our full-depth tokens exactly, every number finite."""
    del default_model  # only ensures the model is in the cache (or skips with the reason)
    with gzip.open(tmp_path / "alpaca.jsonl.gz", "wt") as f:
        for i, (q, a) in enumerate([("Give three tips for staying healthy.", "Eat well, sleep, move."),
                                    ("Name a primary color.", "Red."), ("What is 2 + 2?", "4")] * 20):
            f.write(json.dumps({"id": i, "instruction": q, "input": "", "output": a}) + "\n")
    recs = run(BenchConfig(preset="quick", datasets="alpaca", data_dir=str(tmp_path), limit=1, dev_limit=1,
                           strategies="policy,confidence", out=str(tmp_path / "q.jsonl")), progress=False)
    by = {(r["split"], r["setting"]): r for r in recs if r["kind"] == "setting"}
    assert by[("test", "hf generate")]["token_agreement"] == 1.0
    assert by[("test", "full")]["weights"] != "base" and by[("test", "base full")]["weights"] == "base"
    assert all(math.isfinite(r["rouge"]["rougeL"]) and math.isfinite(r["ms_per_token"]) for r in by.values())


def test_gpu_suite_runs_in_a_tiny_shape_on_the_cpu_and_labels_its_records(tmp_path):
    """The GPU benchmark cannot run in CI; this keeps its code paths alive: every kind of record
    comes out, finite, labelled random weights, with the kernel marked absent on the CPU."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    out = tmp_path / "gpu.jsonl"
    subprocess.run([sys.executable, str(script), "--shape", "tiny", "--device", "cpu", "--dtype", "float32",
                    "--repeats", "1", "--new-tokens", "6", "--prompt-tokens", "4", "--bandwidth-mb", "16",
                    "--out", str(out)], check=True, capture_output=True, text=True)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["kind"] for r in recs} == {"bandwidth", "decode", "kv_fill", "early_exit"}
    assert all(r["weights"] == "random (real shapes)" and r["device"] == "cpu" for r in recs)
    assert all(r["kernel"] is False for r in recs if r["kind"] == "kv_fill")
    plans = {(r["plan"], r["fill_timing"]): r for r in recs if r["kind"] == "early_exit"}
    assert plans["full", None]["mean_layers"] == 4 and plans["static k=2", "deferred"]["ideal_speedup"] == 2.0
    assert ("static k=2", "eager") in plans
    assert ("policy t=0.15", "deferred") in plans  # replayed from the committed journal, scaled to 4 layers
    nums = [v for r in recs for v in r.values() if isinstance(v, float)]
    assert nums and all(math.isfinite(v) and v >= 0 for v in nums)
