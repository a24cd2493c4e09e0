"""load_model(): checkpoint formats and dtypes."""

import pytest
import torch

import cee_gen


def test_pytorch_bin_checkpoint_loads_like_safetensors(tmp_path):
    import shutil

    from conftest import make_tiny_checkpoint

    hf = make_tiny_checkpoint(tmp_path / "st")
    shutil.copytree(tmp_path / "st", tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # the older HF format
    a = cee_gen.load_model(str(tmp_path / "st"), device="cpu")
    b = cee_gen.load_model(str(tmp_path / "bin"), device="cpu")
    for (n, p), (_, q) in zip(a.net.state_dict().items(), b.net.state_dict().items()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_dtypes_load_and_generate(tiny_dir, dtype):
    m = cee_gen.load_model(str(tiny_dir), dtype=dtype, device="cpu")
    assert m.dtype == getattr(torch, dtype)
    [r] = cee_gen.generate(m, "the quick", max_new_tokens=5)
    assert 1 <= len(r.token_ids) <= 5


def test_untied_head_is_loaded_separately(tmp_path):
    from conftest import make_tiny_checkpoint

    make_tiny_checkpoint(tmp_path, tie=False)
    m = cee_gen.load_model(str(tmp_path), device="cpu")
    assert m.net.output.weight.data_ptr() != m.net.tok_embeddings.weight.data_ptr()
