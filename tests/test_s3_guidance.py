"""The S³ engine's SD-1.x model_fn's against diffusers' pipelines, two DDIM steps at tiny random weights:
SD inpainting (9 channels [x_t, mask, masked-image latent]) and InstructPix2Pix (8 channels, two guidance scales)."""
import pytest
import torch

from model.diffusion import Diffusion, inpaint_guided, ip2p_guided, sample, text_guided
from model.unet import UNet, UNetConfig
from test_unet import TINY, diffusers_unet, randomize

H = W = 16  # pixels; the tiny VAE below has 2 levels, so latents are 8 x 8
STEPS = 2  # DDIM at t = 501, then 1 -> x0: one guided denoising step in the middle and the final one


def tiny_pair(in_channels):
    """Our tiny UNet with random weights and the same weights in a diffusers UNet2DConditionModel."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = UNetConfig(in_channels=in_channels, **TINY)
    ours = randomize(UNet(cfg)).eval()
    ref = diffusers_unet(cfg).eval()
    ldm = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    ref.load_state_dict(convert_ldm_unet_checkpoint(ldm, dict(ref.config)), strict=True)
    return ours, ref, cfg


def pipeline_parts(ref_unet):
    import diffusers

    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4)
    # SD-1.x's scheduler config (CompVis' DDIM spacing: leading + offset 1; ᾱ_0 as the final ᾱ)
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                    timestep_spacing="leading", prediction_type="epsilon")
    return dict(vae=vae, text_encoder=None, tokenizer=None, unet=ref_unet, scheduler=sched)


# Measured 3e-7 to 5e-7 (the UNets agree exactly; the rest is the schedulers' float arithmetic): a wrong constant
# in the UNet (a GroupNorm eps of 1e-5 for 1e-6 gives 6e-6 at its output) must not fit under the tolerance.
PARITY_TOL = 2e-6


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def test_inpainting_matches_diffusers():
    import diffusers

    torch.manual_seed(0)
    ours, ref, cfg = tiny_pair(9)
    pipe = diffusers.StableDiffusionInpaintPipeline(**pipeline_parts(ref), safety_checker=None,
                                                    feature_extractor=None, requires_safety_checker=False)
    B, h = 2, H // 2
    ctx, null = torch.randn(B, 77, cfg.context_dim), torch.randn(1, 77, cfg.context_dim)
    mask = torch.zeros(B, 1, H, W)
    mask[0, :, 4:12, 2:10] = 1  # 1 = repaint
    mask[1, :, :, 8:] = 1
    masked_latent = torch.randn(B, 4, h, h)
    x_T = torch.randn(B, 4, h, h, generator=torch.Generator().manual_seed(7))
    want = pipe(prompt_embeds=ctx, negative_prompt_embeds=null.expand(B, -1, -1), image=torch.zeros(B, 3, H, W),
                mask_image=mask, masked_image_latents=masked_latent, latents=x_T, height=H, width=W,
                num_inference_steps=STEPS, guidance_scale=7.5, output_type="latent").images
    small = torch.nn.functional.interpolate(mask, size=(h, h))  # the pipeline's own pixel -> latent mask
    fn = inpaint_guided(ours, Diffusion(), small, masked_latent, ctx, null, guidance=7.5)
    got = sample(fn, Diffusion(), (B, 4, h, h), steps=STEPS, generator=torch.Generator().manual_seed(7))
    err = rel_err(got, want)
    print(f"inpainting vs diffusers: rel err {err:.1e}")
    assert err < PARITY_TOL
    # the mask and the masked image reach the UNet: another mask, another result
    other = inpaint_guided(ours, Diffusion(), 1 - small, masked_latent, ctx, null, guidance=7.5)
    assert rel_err(sample(other, Diffusion(), (B, 4, h, h), steps=STEPS,
                          generator=torch.Generator().manual_seed(7)), want) > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("s_text,s_image", [(7.5, 1.5), (3.0, 2.0)])
def test_instruct_pix2pix_matches_diffusers(s_text, s_image):
    import diffusers

    torch.manual_seed(1)
    ours, ref, cfg = tiny_pair(8)
    pipe = diffusers.StableDiffusionInstructPix2PixPipeline(**pipeline_parts(ref), safety_checker=None,
                                                           feature_extractor=None, requires_safety_checker=False)
    B, h = 2, H // 2
    ctx, null = torch.randn(B, 77, cfg.context_dim), torch.randn(1, 77, cfg.context_dim)
    source = torch.randn(B, 4, h, h)  # a 4-channel `image` is taken by the pipeline as the source latent itself
    x_T = torch.randn(B, 4, h, h, generator=torch.Generator().manual_seed(3))
    want = pipe(prompt_embeds=ctx, negative_prompt_embeds=null.expand(B, -1, -1), image=source, latents=x_T,
                num_inference_steps=STEPS, guidance_scale=s_text, image_guidance_scale=s_image,
                output_type="latent").images
    fn = ip2p_guided(ours, Diffusion(), source, ctx, null, text_guidance=s_text, image_guidance=s_image)
    got = sample(fn, Diffusion(), (B, 4, h, h), steps=STEPS, generator=torch.Generator().manual_seed(3))
    err = rel_err(got, want)
    print(f"InstructPix2Pix (s_T {s_text}, s_I {s_image}) vs diffusers: rel err {err:.1e}")
    assert err < PARITY_TOL


@torch.no_grad()
def test_text_guidance_matches_diffusers_text_to_image():
    import diffusers

    torch.manual_seed(2)
    ours, ref, cfg = tiny_pair(4)
    pipe = diffusers.StableDiffusionPipeline(**pipeline_parts(ref), safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    B, h = 2, H // 2
    ctx, null = torch.randn(B, 77, cfg.context_dim), torch.randn(1, 77, cfg.context_dim)
    x_T = torch.randn(B, 4, h, h, generator=torch.Generator().manual_seed(5))
    want = pipe(prompt_embeds=ctx, negative_prompt_embeds=null.expand(B, -1, -1), latents=x_T, height=H, width=W,
                num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent").images
    got = sample(text_guided(ours, Diffusion(), ctx, null, guidance=5.0), Diffusion(), (B, 4, h, h), steps=STEPS,
                 generator=torch.Generator().manual_seed(5))
    assert rel_err(got, want) < PARITY_TOL
