"""Model FLOPs of the JeDi UNet, and the dense bf16 peak of the card, for TFLOP/s and MFU figures: the one home of
both, used by train.py's MFU log line and by every benchmark in bench/.

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
- attention kernels alone (bench/bench_attention.py) follow the FlashAttention papers' convention instead: the
  backward is ATTENTION_BACKWARD_FACTOR = 2.5 × the forward (5 matmuls, the recompute of P included, against 2),
  at the true head dim, not the padded one.
The UNet's forward never runs an attention kernel here: a recording stub stands in for ``model.unet.attention``,
so under JEDI_ATTN=triton no meta tensor reaches Triton.
"""
import contextlib
from dataclasses import dataclass

import torch

# Dense (no sparsity) bf16 tensor-core peaks with fp32 accumulation, FLOP/s, from NVIDIA's data sheets (their
# "with sparsity" figures halved): H100 / H200 (SXM 1,979 / PCIe 1,513 / NVL 1,671 sparse), A100 (312 dense),
# L40S (733 sparse), L40 (362 sparse), L4 (242 sparse), A10 (250 sparse), H20 (296 sparse), GeForce RTX 4090 (Ada
# whitepaper: 165 with fp32 accumulate). More specific names first: the key is a substring of
# torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA GH200 480GB".
# A10G (AWS's variant of the A10) has no NVIDIA data sheet; earlier tables here said 70 and 125. It is listed as
# unknown (no MFU) rather than guessed: pass the peak (train.py --peak_flops, bench --peak-tflops).
PEAK_BF16 = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),  # SXM5 (HBM3)
    ("H200", 989e12),  # SXM; also matches GH200 (the same 989)
    ("H20", 148e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 0.0),
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


ATTENTION_BACKWARD_FACTOR = 2.5  # kernel benchmarks: backward FLOPs = 2.5 × attention_flops (REFERENCE.md)


def attention_flops(b, lq, lk, h, d) -> float:
    """Forward FLOPs of non-causal attention, q (b, lq, h, d), k and v (b, lk, h, d): QKᵀ and PV."""
    return 4.0 * b * h * lq * lk * d


def _meta_forward(cfg, latent_hw, set_size, num_sets, context_len):
    """-> (images, a no-argument call of our UNet on meta tensors of that shape): costs no memory or time."""
    from model.conditioning import Cond
    from model.unet import UNet

    with torch.device("meta"):
        net = UNet(cfg)
    n = num_sets * set_size
    x = torch.empty(n, cfg.in_channels, latent_hw, latent_hw, device="meta")  # (B·N, C, h, w)
    ctx = torch.empty(n, context_len, cfg.context_dim, device="meta")  # (B·N, 77, D)
    y = None if cfg.adm_in_channels is None else torch.empty(n, cfg.adm_in_channels, device="meta")  # SDXL (B·N, 2816)
    return n, lambda: net(x, torch.zeros(n, dtype=torch.long, device="meta"), Cond(ctx, y), set_size=set_size)


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


def parameter_count(cfg) -> int:
    """Parameters of our UNet with this config (built on meta: no memory)."""
    from model.unet import UNet

    with torch.device("meta"):
        return sum(p.numel() for p in UNet(cfg).parameters())


if __name__ == "__main__":  # python flops.py: the numbers for the benchmark shapes and the JeDi-XL configs
    from dataclasses import replace

    from model.flavours import FLAVOURS
    from model.unet import JEDI_IN_CHANNELS, UNetConfig

    for n, sets in ((4, 2), (4, 4)):
        f = unet_flops(UNetConfig(), 64, n, sets)
        print(f"SD-1.4 JeDi UNet, 64x64 latents, {sets} sets of {n}: forward {f.forward / 1e12:.2f} TFLOP "
              f"(attention {f.attention / 1e12:.2f}), {f.per_image() / 1e12:.3f} TFLOP per image")
    xl = FLAVOURS["sdxl"].unet
    jedi_xl = replace(xl, in_channels=JEDI_IN_CHANNELS)
    print(f"SDXL UNet: {parameter_count(xl):,} parameters; JeDi-XL (9 input channels): {parameter_count(jedi_xl):,}")
    f = unet_flops(xl, 128, 1, 1)
    print(f"SDXL UNet, 1024 px (128x128 latents), one image: forward {f.forward / 1e12:.2f} TFLOP "
          f"(attention {f.attention / 1e12:.2f})")
    for px in (512, 1024):
        f = unet_flops(jedi_xl, px // 8, 4, 1)
        print(f"JeDi-XL UNet, {px} px ({px // 8}x{px // 8} latents), one set of 4: forward {f.forward / 1e12:.2f} "
              f"TFLOP (attention {f.attention / 1e12:.2f}), train step {f.train_step / 1e12:.2f} TFLOP, "
              f"{f.per_image() / 1e12:.3f} TFLOP forward per image")
