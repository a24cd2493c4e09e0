"""Golden outputs: token ids and exit layers of every strategy x KV-fill mode x fill timing, recorded
from the commit before the early-exit core was redesigned (issue 15), so the redesign is proved to
change no behaviour (tests/test_golden_outputs.py).

Not a test file: the recorder and the cases it shares with the test. Only the public API is used
(`cee_gen.load_model`, `cee_gen.generate`, `ExitConfig`), so the same code runs before and after.

    python tests/golden.py tests/data/golden_outputs.json   # record (with the code of that commit)

The tiny model's weights are drawn from a seeded torch.Generator in sorted-name order, not from
transformers' initializers, so the fixture does not depend on the transformers version.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

TINY_PROMPTS = ["the quick brown fox", "give three tips", "a b c d e f", "z"]
DEFAULT_PROMPTS = ["Give three tips for staying healthy.", "Summarize: the cat sat on the mat all day.",
                   "What is 2 + 2?"]
STRATEGIES = {  # name -> ExitConfig fields (heads filled in for policy)
    "policy": {"strategy": "policy", "threshold": 0.5},
    "confidence": {"strategy": "confidence", "threshold": 0.5},
    "entropy": {"strategy": "entropy", "threshold": 0.5},
    "patience": {"strategy": "patience", "patience": 1},
    "saturation": {"strategy": "saturation", "threshold": 0.5},
    "hash-frequency": {"strategy": "hash", "exit_layers": "1,3"},
    "hash-random": {"strategy": "hash", "hash_method": "random"},
    "static": {"strategy": "static", "exit_layer": 2},
}
FILLS = {  # name -> ExitConfig fields
    "propagate-deferred": {"kv_fill": "propagate", "fill_timing": "deferred"},
    "propagate-eager": {"kv_fill": "propagate", "fill_timing": "eager"},
    "propagate-raw": {"kv_fill": "propagate-raw"},
    "copy-kv": {"kv_fill": "copy-kv"},
    "recompute": {"kv_fill": "recompute"},
}


def make_tiny_golden_model(path: Path):
    """A 4-layer tiny LLaMA checkpoint whose weights depend only on torch's RNG."""
    from conftest import make_tiny_checkpoint

    hf = make_tiny_checkpoint(path, n_layers=4, seed=3)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in sorted(hf.named_parameters()):
            r = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * r if "norm" in name else 0.25 * r)
    hf.save_pretrained(path)


def make_tiny_policy_heads(model, path: Path) -> str:
    from cee_gen.exits.heads import ExitHeads

    torch.manual_seed(1)
    h = ExitHeads(model.net, [1, 2, 3], adapter_rank=4, policy="linear")
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for _, p in sorted(h.named_parameters()):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return str(h.save(path, base_name="golden-tiny"))


def tiny_cases(heads: str, small: str) -> dict[str, dict]:
    """case name -> generate() keywords, with 'exit' an ExitConfig's fields."""
    cases = {"full": {"exit": {"strategy": "full"}}}
    for s, sf in STRATEGIES.items():
        for f, ff in FILLS.items():
            ex = {**sf, **ff}
            if s == "policy":
                ex["heads"] = heads
            cases[f"{s}/{f}"] = {"exit": ex}
    cases["cascade/recompute"] = {"exit": {"strategy": "cascade", "exit_layer": 2, "threshold": 0.5}}
    cases["cascade-model/recompute"] = {"exit": {"strategy": "cascade", "cascade_model": small,
                                                 "threshold": 0.5}}
    cases["policy/sampled"] = {"exit": {"strategy": "policy", "heads": heads}, "do_sample": True,
                               "seed": 7, "temperature": 0.8, "top_p": 0.9}
    cases["confidence/repetition-penalty"] = {"exit": {"strategy": "confidence", "threshold": 0.5},
                                              "repetition_penalty": 1.3}
    return cases


def default_cases() -> dict[str, dict]:
    return {
        "full": {"exit": {"strategy": "full"}},
        "static-15": {"exit": {"strategy": "static", "exit_layer": 15}},
        "confidence-0.9": {"exit": {"strategy": "confidence", "threshold": 0.9, "min_exit_layer": 16}},
        "policy-0.15": {"exit": {"strategy": "policy", "threshold": 0.15}},  # the shipped heads
        "policy-0.05-eager": {"exit": {"strategy": "policy", "threshold": 0.05, "fill_timing": "eager"}},
    }


def run_case(model, prompts, kw: dict, max_new_tokens: int, batch_size: int) -> dict:
    import cee_gen

    kw = dict(kw)
    ex = cee_gen.ExitConfig(**kw.pop("exit"))
    res = cee_gen.generate(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, exit=ex,
                           **kw)
    return {"prompt_token_ids": [r.prompt_token_ids for r in res],
            "token_ids": [r.token_ids for r in res],
            "layers_per_token": [r.stats["layers_per_token"] for r in res],
            "finish_reason": [r.finish_reason for r in res]}


def record_tiny(tmp: Path) -> dict:
    from conftest import make_tiny_checkpoint

    import cee_gen

    make_tiny_golden_model(tmp / "tiny")
    make_tiny_checkpoint(tmp / "small", n_layers=2, seed=7)
    model = cee_gen.load_model(str(tmp / "tiny"), dtype="float32", device="cpu")
    heads = make_tiny_policy_heads(model, tmp / "heads.safetensors")
    out = {}
    for name, kw in tiny_cases(heads, str(tmp / "small")).items():
        out[name] = run_case(model, TINY_PROMPTS, kw, 16, len(TINY_PROMPTS))
    return out


def record_default() -> dict:
    import cee_gen

    out = {}
    for name, kw in default_cases().items():
        # policy's shipped heads merge their LoRA into the model: a fresh copy for every case
        model = cee_gen.load_model(None, dtype="float32", device="cpu")
        out[name] = run_case(model, DEFAULT_PROMPTS, kw, 24, 2)
    return out


def main(argv: list[str]) -> int:
    import subprocess
    import tempfile

    out = Path(argv[0])
    with tempfile.TemporaryDirectory() as tmp:
        data = {"commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                         text=True).stdout.strip(),
                "torch": torch.__version__, "tiny": record_tiny(Path(tmp)), "default": record_default()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(f"wrote {out}: {len(data['tiny'])} tiny cases, {len(data['default'])} default-model cases")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    raise SystemExit(main(sys.argv[1:]))
