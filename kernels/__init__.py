"""The one attention entry point used by every attention layer of the model.

``attention(q, k, v, scale=None, backend=None)``
    q: (B, Lq, H, D), k and v: (B, Lk, H, D)  ->  (B, Lq, H, D), non-causal softmax attention, differentiable.

Backends:
    "triton": the fused flash-attention kernel in ``kernels/flash_attn.py`` (fp16/bf16/fp32, D <= 256).
    "sdpa":   PyTorch's ``scaled_dot_product_attention`` (never materialises Lq x Lk on its fused paths).
    "auto" (default): triton for CUDA tensors it supports when Triton is installed, sdpa otherwise.
The ``backend`` argument wins over the environment variable ``JEDI_ATTN=auto|triton|sdpa``.
Forcing "triton" on CPU tensors needs ``TRITON_INTERPRET=1`` (that is how the tests run it).
"""
import functools
import importlib.util
import os

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "triton", "sdpa")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_supports(q, k, v) -> bool:
    return (q.is_cuda and triton_available() and q.dtype == k.dtype == v.dtype
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] <= 256)


def sdpa_attention(q, k, v, scale=None):
    # SDPA wants (B, H, L, D); transposes are views, SDPA handles the strides.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)  # (B, Lq, H, D)


def resolve_backend(q, k, v, backend=None) -> str:
    """The backend ``attention`` would use for these tensors: "triton" or "sdpa"."""
    backend = (backend or os.environ.get("JEDI_ATTN") or "auto").lower()
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS} (JEDI_ATTN / backend=)")
    if backend == "auto":
        return "triton" if _triton_supports(q, k, v) else "sdpa"
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              backend: str | None = None) -> torch.Tensor:
    if resolve_backend(q, k, v, backend) == "triton":
        from . import flash_attn  # imported lazily: triton.jit fixes interpreter vs compiler at import time
        return flash_attn.flash_attention(q, k, v, scale)
    return sdpa_attention(q, k, v, scale)
