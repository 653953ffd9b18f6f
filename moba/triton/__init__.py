"""Triton MoBA kernels for CUDA (routing, key-block prefill, split-K decode, merge).

Importing this package imports Triton first, so on machines without Triton `import moba.triton`
raises ImportError and moba/ops.py falls back to the portable path. Same contract as
`moba.moba_attention` (`moba.types.MobaKernel`); the portable path is the reference these kernels are tested against.
"""

import triton  # noqa: F401  (must fail early where Triton is absent)

from moba.triton.launcher import triton_moba_attention

__all__ = ["triton_moba_attention"]
