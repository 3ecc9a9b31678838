"""UNet: parity with diffusers at the full SD-1.4 size, coupled self-attention, 4 -> 9 channel inflation."""
import pytest
import torch

from model.loading import convert_diffusers_unet, inflate_input_channels, unet_config_from_state_dict
from model.unet import UNet, UNetConfig

TINY = dict(model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2), num_res_blocks=1, num_heads=2,
            context_dim=16)


def randomize(module, std=0.05):
    """Random values in every parameter (norms and zero-initialised layers too), so no mix-up can hide."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name.endswith("weight") and p.ndim == 1 else 0.0  # norm scales around 1
            p.copy_(base + std * torch.randn(p.shape, generator=g))
    return module


def diffusers_unet(cfg: UNetConfig):
    import diffusers  # the parity oracle: requirements-test.txt, never skipped
    L = len(cfg.channel_mult)
    attn = [2 ** i in cfg.attention_resolutions for i in range(L)]
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult), layers_per_block=cfg.num_res_blocks,
        cross_attention_dim=cfg.context_dim, attention_head_dim=cfg.num_heads)  # diffusers' misnomer: = heads


# Ours computes exactly what diffusers computes on CPU (measured rel. error 0.0 at the tiny and the full SD-1.4
# size, fp32, 1 and 2 threads); SpatialTransformer's GroupNorm at eps 1e-5 instead of 1e-6 already gives 6e-6.
PARITY_TOL = 1e-6


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def check_parity(cfg: UNetConfig, hw: int):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    torch.set_grad_enabled(False)
    try:
        ours = randomize(UNet(cfg)).eval()
        ref = diffusers_unet(cfg).eval()
        ldm = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
        ref.load_state_dict(convert_ldm_unet_checkpoint(ldm, dict(ref.config)), strict=True)
        del ldm
        x = torch.randn(2, cfg.in_channels, hw, hw)
        t = torch.tensor([3, 871])
        ctx = torch.randn(2, 77, cfg.context_dim)
        err = rel_err(ours(x, t, ctx), ref(x, t, ctx).sample)
        print(f"UNet parity vs diffusers ({cfg.model_channels}ch, in {cfg.in_channels}): rel err {err:.2e}")
        assert err <= PARITY_TOL
        # and back: diffusers names -> ours must give the very same tensors and the same inferred config
        back, inferred = convert_diffusers_unet(ref.state_dict(), num_heads=cfg.num_heads)
        own = ours.state_dict()
        assert set(back) == set(own)
        assert all(torch.equal(back[k], own[k]) for k in own)
        assert inferred == cfg
    finally:
        torch.set_grad_enabled(True)


def test_parity_tiny_with_diffusers():
    check_parity(UNetConfig(in_channels=4, **TINY), hw=8)


def test_parity_sd14_full_size_with_diffusers():
    check_parity(UNetConfig(in_channels=4), hw=16)  # the real SD-1.4 configuration, 860M parameters


def test_parity_inpainting_shaped_9ch_with_diffusers():
    check_parity(UNetConfig(in_channels=9, **TINY), hw=8)


def test_config_inference_roundtrip():
    for cfg in [UNetConfig(in_channels=9, **TINY),
                UNetConfig(in_channels=4, model_channels=64, channel_mult=(1, 2, 3), attention_resolutions=(2, 4),
                           num_res_blocks=2, num_heads=4, context_dim=24, transformer_depth=2, use_linear_proj=True)]:
        sd = UNet(cfg).state_dict()
        assert unet_config_from_state_dict(sd, num_heads=cfg.num_heads) == cfg


def tiny_inputs(B=2, N=3, hw=8, cin=4, ctx_dim=16):
    x = torch.randn(B * N, cin, hw, hw)
    t = torch.randint(0, 1000, (B,)).repeat_interleave(N)
    ctx = torch.randn(B * N, 5, ctx_dim)
    return x, t, ctx


@torch.no_grad()
def test_set_size_one_is_plain_sd():
    unet = randomize(UNet(UNetConfig(in_channels=4, **TINY))).eval()
    x, t, ctx = tiny_inputs()
    batched = unet(x, t, ctx, set_size=1)
    one_by_one = torch.cat([unet(x[i : i + 1], t[i : i + 1], ctx[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_coupled_attention_is_permutation_equivariant():
    unet = randomize(UNet(UNetConfig(in_channels=4, **TINY))).eval()
    B, N = 2, 3
    x, t, ctx = tiny_inputs(B, N)
    out = unet(x, t, ctx, set_size=N)
    perm = torch.tensor([2, 0, 1])
    idx = (torch.arange(B)[:, None] * N + perm[None]).reshape(-1)  # permute images inside each set
    out_p = unet(x[idx], t[idx], ctx[idx], set_size=N)
    torch.testing.assert_close(out_p, out[idx], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_images_of_a_set_see_each_other_only_when_coupled():
    unet = randomize(UNet(UNetConfig(in_channels=4, **TINY))).eval()
    B, N = 2, 2
    x, t, ctx = tiny_inputs(B, N)
    x2 = x.clone()
    x2[1] += torch.randn_like(x2[1])  # change image 2 of set 1
    coupled, coupled2 = unet(x, t, ctx, set_size=N), unet(x2, t, ctx, set_size=N)
    assert (coupled[0] - coupled2[0]).abs().max() > 1e-3  # image 1 of the same set changed
    torch.testing.assert_close(coupled[2:], coupled2[2:])  # the other set did not
    single, single2 = unet(x, t, ctx, set_size=1), unet(x2, t, ctx, set_size=1)
    torch.testing.assert_close(single[0], single2[0])


def test_set_size_must_divide_batch():
    unet = UNet(UNetConfig(in_channels=4, **TINY))
    x, t, ctx = tiny_inputs(1, 3)
    with pytest.raises(ValueError, match="whole number of sets"):
        unet(x, t, ctx, set_size=2)


@torch.no_grad()
def test_inflated_input_equals_source_on_zero_reference_and_mask():
    sd_unet = randomize(UNet(UNetConfig(in_channels=4, **TINY))).eval()
    wide = inflate_input_channels(sd_unet.state_dict(), 9)
    assert wide["input_blocks.0.0.weight"].shape[1] == 9
    assert torch.count_nonzero(wide["input_blocks.0.0.weight"][:, 4:]) == 0
    jedi = UNet(UNetConfig(in_channels=9, **TINY)).eval()
    jedi.load_state_dict(wide, strict=True)
    x, t, ctx = tiny_inputs(2, 2)
    x9 = torch.cat([x, torch.zeros(4, 5, 8, 8)], dim=1)  # [x_t, reference 0, mask 0]
    torch.testing.assert_close(jedi(x9, t, ctx, set_size=2), sd_unet(x, t, ctx, set_size=2), rtol=0, atol=0)


def test_gradients_flow_through_coupled_attention():
    """The gradient training uses, checked against finite differences (float64): image 0's output depends on image 1's
    input only through coupled attention, and autograd's derivative along a random direction is the difference
    quotient's, for image 1's input and for the attention weights; uncoupled, it is exactly 0."""
    unet = randomize(UNet(UNetConfig(in_channels=4, **TINY))).double()
    x, t, ctx = tiny_inputs(1, 2)
    x, ctx = x.double().requires_grad_(True), ctx.double()
    f = lambda x, set_size=2: unet(x, t, ctx, set_size=set_size)[0].square().sum()  # noqa: E731
    params = [p for n, p in unet.named_parameters() if "attn1" in n]  # the coupled self-attention's weights
    grads = [torch.zeros_like(p) if g is None else g  # a weight cut off from the graph gets no gradient
             for p, g in zip([x, *params], torch.autograd.grad(f(x), [x, *params], allow_unused=True))]
    assert grads[0][1].abs().sum() > 0  # image 0's output depends on image 1's input
    g = torch.Generator().manual_seed(0)
    only_image_1 = torch.tensor([0.0, 1.0], dtype=torch.float64)[:, None, None, None]
    d = [torch.randn(x.shape, generator=g, dtype=torch.float64) * only_image_1,
         *[torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]]
    want = sum((gi * di).sum() for gi, di in zip(grads, d))
    eps = 1e-6
    with torch.no_grad():
        def moved(sign):
            for p, dp in zip(params, d[1:]):
                p.add_(sign * eps * dp)
            out = f(x + sign * eps * d[0])
            for p, dp in zip(params, d[1:]):
                p.sub_(sign * eps * dp)
            return out
        fd = (moved(1) - moved(-1)) / (2 * eps)
    assert abs(fd - want) <= 1e-6 * abs(want) and abs(want) > 1e-3, (fd, want)
    assert torch.autograd.grad(f(x, set_size=1), x)[0][1].abs().max() == 0  # uncoupled: nothing flows across
