"""Early exit from inside transformers' `generate`: a custom generation method (transformers'
`custom_generate`), loadable from this package's folder.

    from transformers import AutoModelForCausalLM
    import cee_gen, cee_gen.hf

    hf = AutoModelForCausalLM.from_pretrained(path)            # LlamaForCausalLM, Qwen2ForCausalLM, ...
    out = hf.generate(input_ids, attention_mask=mask, max_new_tokens=64,
                      custom_generate=cee_gen.hf.CUSTOM_GENERATE, trust_remote_code=True,
                      exit=cee_gen.ExitConfig(strategy="policy", heads="heads.safetensors"))

`trust_remote_code=True` is transformers' opt-in for running a folder's `custom_generate/generate.py`
(here: this package's own, which calls `generate` below). What it returns is what `generate` returns
by default: the (B, T + new) token ids, the prompt as given (left padding kept) then the new tokens,
rows that stopped early padded with the pad token.
"""

from __future__ import annotations

from pathlib import Path

from cee_gen.hf.entry import generate

CUSTOM_GENERATE = str(Path(__file__).parent)  # holds custom_generate/generate.py

__all__ = ["CUSTOM_GENERATE", "generate"]
