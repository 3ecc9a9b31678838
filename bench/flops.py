"""Model FLOPs of the JeDi UNet, and the dense bf16 peak of the card, for TFLOP/s and MFU figures.

How the UNet is counted (once per shape, on the meta device, so no compute and no memory):
- every op but attention: ``torch.utils.flop_counter.FlopCounterMode`` over one forward (convolutions, linears,
  the time embedding MLP; it counts matmul-class ops only: norms, activations and softmax are not FLOPs here);
- attention: analytically, 4·B·H·Lq·Lk·D per call (QKᵀ and PV, 2 FLOPs per multiply-add), recorded from the
  shapes of every ``attention`` call of the forward. FlopCounterMode does count SDPA (on meta through its math
  decomposition, two bmm's; on CUDA through the formulas registered for the flash/efficient/cuDNN ops), but it
  cannot see inside the Triton kernel, so one analytic count serves both backends.
  ``tests/test_bench_e2e.py`` checks the analytic count equals FlopCounterMode's count of the SDPA path.
- forward + backward = 3 × forward (the backward does two matmuls per forward matmul, attention included):
  model FLOPs, as in PaLM's MFU. Activation-checkpoint recompute and FlashAttention's recompute of P are
  hardware work, not model work, and are not counted. The VAE and text encoder are not counted.
"""
import contextlib
from dataclasses import dataclass

import torch

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from the vendors' data sheets. More specific names first:
# "H100 PCIe" must not match the SXM row. The name is torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3".
PEAK_BF16 = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM5 (HBM3): "NVIDIA H100 80GB HBM3"
    ("H200", 989e12),
    ("H20", 148e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
]


def peak_bf16_flops(device_name: str) -> float:
    """Dense bf16 peak FLOP/s for a card name, 0.0 if unknown (then MFU is not reported)."""
    for key, value in PEAK_BF16:
        if key in device_name:
            return value
    return 0.0


@dataclass
class UNetFlops:
    """Forward FLOPs of one UNet call on `images` images (sets of `set_size`)."""
    images: int
    set_size: int
    attention: float  # analytic, every attention call (coupled self-attention and cross-attention)
    other: float  # FlopCounterMode, everything but attention

    @property
    def forward(self) -> float:
        return self.attention + self.other

    @property
    def train_step(self) -> float:
        """Model FLOPs of forward + backward."""
        return 3.0 * self.forward

    def per_image(self) -> float:
        return self.forward / self.images


@contextlib.contextmanager
def _recorded_attention(calls):
    """Replace the attention the UNet calls by a shape-only stub that records (B, Lq, Lk, H, D)."""
    import model.unet as unet_mod

    def stub(q, k, v, *args, **kwargs):
        calls.append((q.shape[0], q.shape[1], k.shape[1], q.shape[2], q.shape[3]))
        return torch.empty_like(q)

    real = unet_mod.attention
    unet_mod.attention = stub
    try:
        yield
    finally:
        unet_mod.attention = real


def attention_flops(b, lq, lk, h, d) -> float:
    return 4.0 * b * h * lq * lk * d


def _meta_forward(cfg, latent_hw, set_size, num_sets, context_len):
    """-> (images, a no-argument call of our UNet on meta tensors of that shape): costs no memory or time."""
    from model.unet import UNet

    with torch.device("meta"):
        net = UNet(cfg)
    n = num_sets * set_size
    x = torch.empty(n, cfg.in_channels, latent_hw, latent_hw, device="meta")  # (B·N, C, h, w)
    ctx = torch.empty(n, context_len, cfg.context_dim, device="meta")  # (B·N, 77, D)
    return n, lambda: net(x, torch.zeros(n, dtype=torch.long, device="meta"), ctx, set_size=set_size)


def unet_flops(cfg, latent_hw: int, set_size: int, num_sets: int = 1, context_len: int = 77) -> UNetFlops:
    """Forward FLOPs of our UNet on `num_sets` sets of `set_size` images at latent_hw × latent_hw."""
    from torch.utils.flop_counter import FlopCounterMode

    n, forward = _meta_forward(cfg, latent_hw, set_size, num_sets, context_len)
    calls = []
    with _recorded_attention(calls), FlopCounterMode(display=False) as counter:
        forward()
    return UNetFlops(images=n, set_size=set_size, attention=sum(attention_flops(*c) for c in calls),
                     other=float(counter.get_total_flops()))


def counted_sdpa_flops(cfg, latent_hw: int, set_size: int, num_sets: int = 1, context_len: int = 77) -> float:
    """FlopCounterMode's own total for the SDPA path on meta (attention included): the cross-check."""
    import os

    from torch.utils.flop_counter import FlopCounterMode

    _, forward = _meta_forward(cfg, latent_hw, set_size, num_sets, context_len)
    old = os.environ.get("JEDI_ATTN")
    os.environ["JEDI_ATTN"] = "sdpa"
    try:
        with FlopCounterMode(display=False) as counter:
            forward()
    finally:
        if old is None:
            os.environ.pop("JEDI_ATTN")
        else:
            os.environ["JEDI_ATTN"] = old
    return float(counter.get_total_flops())


if __name__ == "__main__":  # python bench/flops.py: the numbers for the benchmark shapes
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from model.unet import UNetConfig

    for n, sets in ((4, 2), (4, 4)):
        f = unet_flops(UNetConfig(), 64, n, sets)
        print(f"SD-1.4 JeDi UNet, 64x64 latents, {sets} sets of {n}: forward {f.forward / 1e12:.2f} TFLOP "
              f"(attention {f.attention / 1e12:.2f}), {f.per_image() / 1e12:.3f} TFLOP per image")
