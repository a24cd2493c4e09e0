"""Weights: loading a checkpoint (loading.py), the embedded default model (default_model.py), what a
loaded model carries (provenance.py), bitsandbytes quantization (quant.py), LoRA deltas (lora.py) and
models split across devices (placement.py)."""

from cee_gen.weights.loading import Model, load_model

__all__ = ["Model", "load_model"]
