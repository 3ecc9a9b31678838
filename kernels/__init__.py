"""The one attention entry point used by every attention layer of the model.

``attention(q, k, v, scale=None)``
    q: (B, Lq, H, D), k and v: (B, Lk, H, D)  ->  (B, Lq, H, D), non-causal softmax attention.

The backend is PyTorch's ``scaled_dot_product_attention`` for now (it never materialises the
Lq x Lk matrix on its fused paths); the Triton kernel plugs in here.
"""
import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    # SDPA wants (B, H, L, D); transposes are views, SDPA handles the strides.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)  # (B, Lq, H, D)
