"""Build entry point.

All metadata lives in pyproject.toml. This file exists for the optional native CUDA extension
(`csrc/`, the fused KV-cache copy-forward), which a later change adds: it will be built only when a
CUDA toolkit is found and CEE_GEN_BUILD_CUDA is not 0. Today there is no extension, so installing is
pure Python everywhere.
"""

from setuptools import setup

setup()
