"""Pure-PyTorch attention reference, for tests only: materialises the full (B, H, Lq, Lk) score matrix."""
import math

import torch


def attention_reference(q, k, v, scale=None):
    """Non-causal softmax attention computed in fp32, or in fp64 when given fp64.

    q: (B, Lq, H, D), k and v: (B, Lk, H, D)  ->  (B, Lq, H, D) in the compute dtype (fp32 or fp64).
    Differentiable, so the tests get reference gradients from autograd.
    """
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (B, H, Lq, Lk)
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)  # (B, Lq, H, D)
