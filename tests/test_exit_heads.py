"""Exit heads and their side file: round trip, identity checks, and clear errors for bad files."""

import json

import pytest
import torch
from conftest import default_model_available, make_tiny_checkpoint, run_cli
from safetensors.torch import save_file

import cee_gen
from cee_gen import CeeGenError, ExitConfig
from cee_gen.exits.heads import ExitHeads, HeadsFileError, load_heads


def _heads(model, **kw):
    torch.manual_seed(0)
    h = ExitHeads(model.net, [1, 2], adapter_rank=kw.pop("adapter_rank", 4), policy=kw.pop("policy", "mlp"),
                  **kw)
    with torch.no_grad():
        for p in h.parameters():
            p.normal_(0, 0.3)
    return h


def test_heads_file_round_trip_keeps_tensors_metadata_and_outputs(tiny_model, tmp_path):
    h = _heads(tiny_model)
    h.meta["training"] = {"method": "unit test"}
    path = h.save(tmp_path / "h.safetensors", base_name="tiny")
    back = load_heads(path, tiny_model)
    assert back.layers == [1, 2] and back.adapter_rank == 4 and back.policy_kind == "mlp"
    assert back.meta["training"] == {"method": "unit test"}
    for k, v in h.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    x = torch.randn(5, tiny_model.args.dim)
    with torch.no_grad():  # one matmul path for both (with gradients, F.linear serves the trainable one)
        for layer in (1, 2):
            assert torch.equal(h.logits(layer, x), back.logits(layer, x))
            assert torch.equal(h.p_exit(layer, x), back.p_exit(layer, x))


def test_exit_head_at_the_last_layer_is_the_models_own_head(tiny_model):
    h = _heads(tiny_model)
    x = torch.randn(3, 1, tiny_model.args.dim)
    L = tiny_model.n_layers
    assert torch.equal(h.logits(L, x[:, 0]), tiny_model.net.head(x)[:, 0].float())


def test_new_adapter_starts_as_the_logit_lens(tiny_model):
    h = ExitHeads(tiny_model.net, [1], adapter_rank=8)
    lens = ExitHeads.logit_lens(tiny_model.net)
    x = torch.randn(4, tiny_model.args.dim)
    with torch.no_grad():  # one matmul path for both (with gradients, F.linear serves the trainable one)
        assert torch.equal(h.logits(1, x), lens.logits(1, x))


def test_heads_cost_a_few_parameters_not_a_vocabulary_matrix_per_layer(tiny_model):
    h = _heads(tiny_model)
    D, V = tiny_model.args.dim, tiny_model.args.vocab_size
    assert h.n_params() < 2 * V * D  # two layers' worth of full heads would be 2 V D


def test_heads_load_in_another_dtype_of_the_same_checkpoint(tiny_dir, tiny_model, tmp_path):
    path = _heads(tiny_model).save(tmp_path / "h.safetensors")
    bf16 = cee_gen.load_model(str(tiny_dir), dtype="bfloat16", device="cpu")
    back = load_heads(path, bf16)
    assert next(back.parameters()).dtype == torch.bfloat16


def test_heads_made_for_another_base_model_are_refused(tiny_model, tmp_path):
    path = _heads(tiny_model).save(tmp_path / "h.safetensors", base_name="tiny")
    other_dir = tmp_path / "other"
    make_tiny_checkpoint(other_dir, seed=1)  # same shapes, other weights
    other = cee_gen.load_model(str(other_dir), dtype="float32", device="cpu")
    with pytest.raises(HeadsFileError, match="was made for tiny .* not for"):
        load_heads(path, other)
    deeper_dir = tmp_path / "deeper"
    make_tiny_checkpoint(deeper_dir, n_layers=4)  # other shapes
    deeper = cee_gen.load_model(str(deeper_dir), dtype="float32", device="cpu")
    with pytest.raises(HeadsFileError, match="was made for tiny"):
        load_heads(path, deeper)


def test_truncated_heads_file_is_a_clear_error(tiny_model, tmp_path):
    path = _heads(tiny_model).save(tmp_path / "h.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(HeadsFileError, match="damaged or incomplete"):
        load_heads(path, tiny_model)


def _rewrite(path, edit):
    """Rewrite a heads file through edit(tensors, meta dict) -> (tensors, meta dict)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["cee_gen_heads"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors, meta = edit(tensors, meta)
    save_file(tensors, str(path), metadata={"cee_gen_heads": json.dumps(meta)})


def test_heads_file_missing_tensors_is_a_clear_error(tiny_model, tmp_path):
    path = _heads(tiny_model).save(tmp_path / "h.safetensors")
    _rewrite(path, lambda t, m: ({k: v for k, v in t.items() if not k.startswith("policies.2.")}, m))
    with pytest.raises(HeadsFileError, match=r"lacks tensor\(s\) \['policies\.2\."):
        load_heads(path, tiny_model)


def test_safetensors_file_without_heads_metadata_is_refused(tiny_model, tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(HeadsFileError, match="not a cee-gen heads file"):
        load_heads(path, tiny_model)


def test_heads_file_of_another_format_version_is_refused(tiny_model, tmp_path):
    path = _heads(tiny_model).save(tmp_path / "h.safetensors")
    _rewrite(path, lambda t, m: (t, {**m, "format_version": 99}))
    with pytest.raises(HeadsFileError, match="format version 99"):
        load_heads(path, tiny_model)


def test_missing_heads_file_names_the_fix(tiny_model, tmp_path):
    with pytest.raises(HeadsFileError, match="does not exist.*quickfit"):
        load_heads(tmp_path / "nope.safetensors", tiny_model)


def test_heads_save_is_atomic_and_refuses_missing_folder(tiny_model, tmp_path):
    with pytest.raises(HeadsFileError, match="does not exist"):
        _heads(tiny_model).save(tmp_path / "no" / "h.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_generate_with_bad_heads_file_is_one_line_error(tiny_model, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(cee_gen.CeeGenError, match="cannot read heads file"):
        cee_gen.generate(tiny_model, "hi", exit=cee_gen.ExitConfig(strategy="policy", heads=str(bad)))


def test_heads_operating_point_is_the_policy_default_threshold_and_is_reported(model4, policy_file,
                                                                              tmp_path, capsys):
    import shutil

    from cee_gen.exits.heads import set_operating_points

    f = tmp_path / "calibrated.safetensors"
    shutil.copy(policy_file, f)
    set_operating_points(f, {"rougeL_drop:1": {"threshold": 0.31, "how": "test"}}, "rougeL_drop:1")
    [r] = cee_gen.generate(model4, "the quick", max_new_tokens=4,
                           exit=ExitConfig(strategy="policy", heads=str(f)))
    assert r.stats["threshold"] == 0.31 and r.stats["operating_point"] == "rougeL_drop:1"
    [r] = cee_gen.generate(model4, "the quick", max_new_tokens=4,
                           exit=ExitConfig(strategy="policy", heads=str(f), threshold=0.7))
    assert r.stats["threshold"] == 0.7 and r.stats["operating_point"] is None  # an explicit one wins
    [r] = cee_gen.generate(model4, "the quick", max_new_tokens=4,
                           exit=ExitConfig(strategy="policy", heads=policy_file))
    assert r.stats["threshold"] == 0.5 and r.stats["operating_point"] is None  # no calibration: 0.5
    code, _, err = run_cli(["--model", str(model4.path), "--max-new-tokens", "3", "--exit", "policy",
                            "--heads", str(f), "hi"], capsys)
    assert code == 0 and "threshold 0.31, the heads' calibrated operating point 'rougeL_drop:1'" in err


def test_operating_point_is_the_lowest_threshold_within_a_point_of_full_on_dev():
    from cee_gen.bench.operating_point import choose

    def rec(ds, t, d):
        return {"kind": "setting", "split": "dev", "family": "policy", "knob": t, "dataset": ds,
                "rougeL_delta": d, "rows": 5}

    recs = [rec("alpaca", 0.3, 0.0), rec("dolly", 0.3, -2.0), rec("alpaca", 0.15, -0.5),
            rec("dolly", 0.15, -1.0), rec("alpaca", 0.08, -3.0), rec("dolly", 0.08, 0.0)]
    t, how = choose(recs)
    assert t == 0.15 and "-0.75" in how  # 0.08 averages -1.5: too far below full depth
    with pytest.raises(CeeGenError, match="no policy threshold"):
        choose([rec("alpaca", 0.3, -5.0)])


def test_unknown_heads_name_is_a_one_line_error(model4):
    with pytest.raises(CeeGenError, match="neither a file nor heads shipped"):
        cee_gen.generate(model4, "hi", max_new_tokens=2,
                         exit=ExitConfig(strategy="policy", heads="quikfit"))


@pytest.mark.default_model
def test_shipped_heads_by_name_from_any_folder(tmp_path, monkeypatch):
    if not default_model_available():
        pytest.skip("CEE_GEN_SKIP_DEFAULT_MODEL=1: tests on the real default model are switched off")
    monkeypatch.chdir(tmp_path)
    model = cee_gen.load_model()  # its own copy: the trained heads merge their LoRA into the model
    for name in ("quickfit", "trained"):
        [r] = cee_gen.generate(model, "Hi", max_new_tokens=3,
                               exit=ExitConfig(strategy="policy", heads=name, threshold=0.5))
        assert r.stats["exit"] == "policy"
    assert model.weights.merged is not None  # the trained heads' LoRA, by name
