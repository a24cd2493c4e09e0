"""transformers' entry point for `custom_generate=cee_gen.hf.CUSTOM_GENERATE` (see cee_gen/hf)."""

from cee_gen.hf.entry import generate  # noqa: F401
