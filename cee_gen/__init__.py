"""cee-gen: token-level early-exit generation for LLaMA-family decoders (after ConsistentEE, AAAI 2024)."""

from cee_gen.config import ExitConfig, GenerationConfig, LoadConfig
from cee_gen.errors import CeeGenError, ModelLoadError
from cee_gen.generate import GenerationResult, generate
from cee_gen.weights.loading import Model, load_model

__version__ = "0.1.0"
__all__ = ["generate", "load_model", "GenerationConfig", "LoadConfig", "ExitConfig", "GenerationResult",
           "Model", "CeeGenError", "ModelLoadError", "__version__"]
