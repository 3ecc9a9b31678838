"""SDXL in the S³ engine, at tiny random weights on CPU:
- one DDIM step of SDXL text-to-image through our stack (load_sd of a diffusers folder, the SDXL Cond with its size
  features, text_guided, the DDIM update) against diffusers' StableDiffusionXLPipeline built from the same modules;
  the same for SDXL inpainting (9 channels) against StableDiffusionXLInpaintPipeline;
- s3.py's collages and backgrounds stages on tiny SDXL single files (Stability's layout), end to end;
- the up-front weight check with SDXL files (input channels, InstructPix2Pix SD-1.x only), and the settings check
  refusing to mix SD-1.x and SDXL images in one stage folder."""
import importlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import s3
import tiny_weights
from model.conditioner import TextConditioner, sdxl_text_config
from model.diffusion import Diffusion, ddim_step, inpaint_guided, sample, spaced_timesteps, text_guided
from model.loading import load_sd
from model.unet import UNet, UNetConfig
from test_s3_guidance import rel_err
from test_sdxl import diffusers_kwargs, tiny_sdxl_text
from test_text import clip_tokenizer
from test_unet import randomize

H = W = 32  # pixels; the tiny VAE has 2 levels, so latents are 16 x 16 (the 3-level UNet needs a multiple of 4)
GUIDANCE = 5.0
PROMPTS = ["a photo of a red mug, photos of the same", "a toy robot on a table"]  # ftfy-neutral (transformers 5)
# Text widths with SDXL's head dim 64 (heads = width // 64, as the loader infers them): CLIP-L 64, bigG 128.
TINY_L = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=128)
TINY_G = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, projection_dim=32)
# An SDXL-shaped UNet: three levels, attention at factors 2 and 4 (depths 2 and 3), head dim 64, linear proj,
# context 64 + 128, label_emb over the pooled 32 + 6·256 size features.
UNET_XL = dict(model_channels=32, channel_mult=(1, 2, 4), attention_resolutions=(2, 4), num_res_blocks=1,
               num_head_channels=64, transformer_depth=(0, 2, 3), context_dim=192, use_linear_proj=True,
               adm_in_channels=32 + 6 * 256)
# Measured (fp32, CPU): 1.1e-7 one step, 5.1e-7 two steps (text-to-image), 3.3e-7 (inpainting): float rounding in
# the UNets and the schedulers' arithmetic. Issue 27 asks for 1e-5; a wrong size feature (crop (0, 8) for (0, 0))
# gives > 1e-3, so the tighter bound of the SD-1.x guidance tests holds here too.
PARITY_TOL = 2e-6


def tiny_vae():
    import diffusers

    return diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                                   scaling_factor=0.13025, force_upcast=True)


def sdxl_folder(root, in_channels=4, seed=0) -> dict:
    """A tiny SDXL base (4) or inpainting (9) model as a diffusers folder (unet/, vae/, text_encoder/,
    text_encoder_2/, each save_pretrained), random in every parameter. -> the diffusers modules, for the oracle."""
    import diffusers

    torch.manual_seed(seed)
    cfg = UNetConfig(in_channels=in_channels, **UNET_XL)
    unet = randomize(diffusers.UNet2DConditionModel(**diffusers_kwargs(cfg, sample_size=H // 2))).eval()
    vae = randomize(tiny_vae()).eval()
    text = TextConditioner(sdxl_text_config(clip_l=TINY_L, bigg=TINY_G))  # transformers' CLIP classes
    enc1, enc2 = (randomize(e).eval() for e in text.encoders)
    for name, m in (("unet", unet), ("vae", vae), ("text_encoder", enc1), ("text_encoder_2", enc2)):
        m.save_pretrained(os.path.join(root, name))
    return dict(unet=unet, vae=vae, text_encoder=enc1, text_encoder_2=enc2)


def ddim_scheduler():
    """Our schedule and DDIM spacing in diffusers' terms: SD's scaled-linear betas, leading spacing + offset 1, ᾱ_0
    as the final ᾱ (set_alpha_to_one False), ε-prediction: what SDXL's own scheduler config also says."""
    import diffusers

    return diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                   timestep_spacing="leading", prediction_type="epsilon")


def pipeline(cls, modules):
    return cls(**modules, tokenizer=clip_tokenizer(model_max_length=77),
               tokenizer_2=clip_tokenizer(model_max_length=77, pad_token="!"), scheduler=ddim_scheduler())


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sdxl_base"))
    return root, sdxl_folder(root, 4, seed=0)


@torch.no_grad()
def test_one_ddim_step_of_sdxl_text_to_image_matches_diffusers(base_folder):
    """Step 1 of 50 (t 981 -> 961), classifier-free guidance 5: our model_fn (text_guided over the SDXL Cond of
    load_sd's conditioner, with the size features of a 32² image) and DDIM update against the pipeline's."""
    from diffusers import StableDiffusionXLPipeline

    root, modules = base_folder
    pipe = pipeline(StableDiffusionXLPipeline, modules)
    m = load_sd(root, in_channels=None)
    assert m.unet.config.adm_in_channels == UNET_XL["adm_in_channels"] and m.text.y_dim == m.unet.config.adm_in_channels
    B, h = len(PROMPTS), H // m.down
    x_T = torch.randn(B, 4, h, h, generator=torch.Generator().manual_seed(7))
    # denoising_end 0.02 keeps the timesteps >= 980 of the 50: exactly the first step, 981 -> 961
    want = pipe(prompt=PROMPTS, height=H, width=W, num_inference_steps=50, denoising_end=0.02,
                guidance_scale=GUIDANCE, latents=x_T, output_type="latent").images
    size = s3.sizes(H)  # what the collages stage passes: original = target = the image, crop (0, 0)
    fn = text_guided(m.unet, m.diffusion, m.encode(PROMPTS, **size), m.null(**size), GUIDANCE)
    t, t_prev = spaced_timesteps(50)[:2]
    assert (t, t_prev) == (981, 961)
    eps, x0 = fn(x_T, t)
    got = ddim_step(m.diffusion, x_T, t, t_prev, eps, x0, 0.0, None)
    err = rel_err(got, want)
    print(f"SDXL text-to-image, one DDIM step vs StableDiffusionXLPipeline: rel err {err:.1e}")
    assert err < PARITY_TOL
    # the whole sampler too: sample() over 2 steps (501, then 1 -> x0) against the pipeline's 2 steps
    want2 = pipe(prompt=PROMPTS, height=H, width=W, num_inference_steps=2, guidance_scale=GUIDANCE, latents=x_T,
                 output_type="latent").images
    got2 = sample(fn, m.diffusion, (B, 4, h, h), steps=2, generator=torch.Generator().manual_seed(7))
    err2 = rel_err(got2, want2)
    print(f"SDXL text-to-image, 2 DDIM steps vs StableDiffusionXLPipeline: rel err {err2:.1e}")
    assert err2 < PARITY_TOL
    # the size features reach the UNet: another crop, another step
    other = text_guided(m.unet, m.diffusion, m.encode(PROMPTS, **{**size, "crop_top_left": (0, 8)}),
                        m.null(**size), GUIDANCE)
    eps, x0 = other(x_T, t)
    assert rel_err(ddim_step(m.diffusion, x_T, t, t_prev, eps, x0, 0.0, None), want) > 1e-3


@torch.no_grad()
def test_sdxl_inpainting_matches_diffusers(tmp_path):
    """SDXL inpainting, two DDIM steps: the 9-channel input in diffusers' StableDiffusionXLInpaintPipeline order
    [x_t, mask, masked-image latent], the same as SD-1.x inpainting, so inpaint_guided serves both."""
    from diffusers import StableDiffusionXLInpaintPipeline

    modules = sdxl_folder(str(tmp_path), 9, seed=1)
    pipe = pipeline(StableDiffusionXLInpaintPipeline, modules)
    pipe.register_to_config(requires_aesthetics_score=False)  # the SDXL 1.0 inpainting model's: base-model time ids
    m = load_sd(str(tmp_path), in_channels=None)
    assert m.unet.config.in_channels == 9
    B, h = len(PROMPTS), H // m.down
    mask = torch.zeros(B, 1, H, W)
    mask[0, :, 4:24, 2:20] = 1  # 1 = repaint
    mask[1, :, :, 16:] = 1
    masked_latent = torch.randn(B, 4, h, h)
    x_T = torch.randn(B, 4, h, h, generator=torch.Generator().manual_seed(3))
    want = pipe(prompt=PROMPTS, image=torch.zeros(B, 3, H, W), mask_image=mask, masked_image_latents=masked_latent,
                height=H, width=W, strength=1.0, num_inference_steps=2, guidance_scale=GUIDANCE, latents=x_T,
                output_type="latent").images
    small = torch.nn.functional.interpolate(mask, size=(h, h))  # the pipeline's own pixel -> latent mask
    size = s3.sizes(H)
    fn = inpaint_guided(m.unet, m.diffusion, small, masked_latent, m.encode(PROMPTS, **size), m.null(**size),
                        GUIDANCE)
    got = sample(fn, Diffusion(), (B, 4, h, h), steps=2, generator=torch.Generator().manual_seed(3))
    err = rel_err(got, want)
    print(f"SDXL inpainting, 2 DDIM steps vs StableDiffusionXLInpaintPipeline: rel err {err:.1e}")
    assert err < PARITY_TOL
    # the mask reaches the UNet: another mask, another result
    other = inpaint_guided(m.unet, m.diffusion, 1 - small, masked_latent, m.encode(PROMPTS, **size), m.null(**size),
                           GUIDANCE)
    got = sample(other, Diffusion(), (B, 4, h, h), steps=2, generator=torch.Generator().manual_seed(3))
    assert rel_err(got, want) > 1e-3


# ----------------------------------------------------------------------------- s3.py with SDXL files

LOAD_XL = dict(model_channels=32, channel_mult=(1, 2, 4), attention_resolutions=(2, 4), num_res_blocks=1,
               num_head_channels=64, transformer_depth=(0, 2, 3), context_dim=24, use_linear_proj=True,
               adm_in_channels=16 + 6 * 256)  # test_sdxl's tiny text: CLIP-L 8 + bigG 16 wide, pooled 16


def sdxl_checkpoint(path, in_channels=4, seed=0) -> str:
    """A tiny SDXL single file in Stability's layout (model.diffusion_model.*, first_stage_model.*, both
    conditioner.embedders.*), random weights: the base (4 input channels) or inpainting (9)."""
    from safetensors.torch import save_file

    from model.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(seed)
    unet = randomize(UNet(UNetConfig(in_channels=in_channels, **LOAD_XL)))
    vae = AutoencoderKL(VAEConfig(**tiny_weights.VAE))
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    sd.update(tiny_sdxl_text())
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


TINY = dict(num_objects=2, prompts_per_object=2, collage_resolution=32, collage_steps=2, canvas=32, inpaint_steps=2,
            box_threshold=0.0, text_threshold=0.0, min_area=0.0, max_area=1.0, border=-1, max_overlap=1.0,
            min_similarity=-1.0, batch_size=2, stylize_p=0.0)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    d = tmp_path_factory.mktemp("s3xl")
    w = tiny_weights.all_weights(str(d / "weights"))
    w["sd"] = sdxl_checkpoint(d / "weights" / "sd_xl_tiny.safetensors", 4, seed=4)
    w["inpaint"] = sdxl_checkpoint(d / "weights" / "sd_xl_inpaint_tiny.safetensors", 9, seed=5)
    return d, w


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As tests/test_s3.py: one thread, so a stage and its recomputation here sum floats in the same order."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def configure(argv):
    importlib.reload(s3)  # the config lives in module globals: start from the defaults
    s3.configure(argv)


def flags(d: dict) -> list:
    return [f"--{k}={v}" for k, v in d.items()]


def test_collages_and_backgrounds_with_sdxl_end_to_end(xl, tmp_path):
    d, w = xl
    m = tmp_path / "m"
    configure(flags({**w, **TINY, "manifest": m}))
    s3.run(list(s3.STAGES))
    rt = s3.Runtime()  # what the stages loaded: SDXL, the flavour told by the loader from the file's keys
    for key in ("sd", "inpaint"):
        model = s3._load_sd(rt, key, w[key], 4 if key == "sd" else 9, key)
        assert model.unet.config.adm_in_channels == LOAD_XL["adm_in_channels"] and len(model.text.encoders) == 2
    collages = s3.live("collages")
    assert len(collages) == 4 and all(r["model"] == "sdxl" for r in collages.values())
    assert all(Image.open(m / "collages" / f"{k}.png").size == (32, 32) for k in collages)
    sets = [json.loads(line) for line in open(m / "sets.jsonl")]
    assert len(sets) == 4 and all(2 <= len(s["images"]) <= 4 for s in sets)
    assert all(Image.open(m / p).size == (32, 32) for s in sets for p in s["images"])
    assert json.load(open(m / "collages" / ".settings.json"))["model"] == "sdxl"
    assert json.load(open(m / "backgrounds" / ".settings.json"))["model"] == "sdxl"
    from test_s3 import check_subject_kept

    check_subject_kept(str(m))  # the subject's opaque pixels exactly, the background painted by SDXL inpainting


@torch.no_grad()
def test_collages_stage_is_sdxl_text_to_image(xl, tmp_path):
    """The collage of a prompt is what text_guided + sample make of the SDXL model at the stage's settings: the
    suffixed prompt, original = target = collage_resolution, crop (0, 0), zero null text."""
    from sample import to_pil

    d, w = xl
    configure(flags({**w, **TINY, "manifest": tmp_path / "m", "num_objects": 1, "prompts_per_object": 1}))
    s3.run(["prompts", "collages"])
    (item,) = s3.prompt_items()
    m = load_sd(w["sd"], in_channels=None)
    size = dict(original_size=(32, 32), crop_top_left=(0, 0), target_size=(32, 32))
    fn = text_guided(m.unet, m.diffusion, m.encode([f"{item['prompt']}, photos of the same"], **size),
                     m.null(**size), s3.collage_guidance)
    gen = torch.Generator().manual_seed(s3._seed("collages", item["id"]))
    z = sample(fn, m.diffusion, (1, 4, 32 // m.down, 32 // m.down), steps=2, generator=gen)
    want = to_pil(m.to_pixels(z)[0])
    got = np.asarray(Image.open(tmp_path / "m" / "collages" / f"{item['id']}.png"), dtype=np.int16)
    assert np.abs(got - np.asarray(want, dtype=np.int16)).max() <= 1


def test_check_weights_with_sdxl_files(xl, tmp_path, capsys):
    """Up front, before any work: SDXL files pass where their stage takes them, with the stage's input channels;
    a base model given as the inpainting model, an inpainting model as the base, or SDXL for InstructPix2Pix are
    refused, all in one message."""
    d, w = xl
    configure(flags({**w, **TINY, "manifest": tmp_path / "ok"}))
    s3.check_weights(list(s3.STAGES))  # SDXL sd and inpaint: accepted
    out = tmp_path / "bad"
    rc = s3.main(["all", *flags({**w, **TINY, "manifest": out, "sd": w["inpaint"], "inpaint": w["sd"],
                                 "ip2p": w["sd"], "stylize_p": 0.5})])
    err = capsys.readouterr().err
    assert rc == 2 and "3 missing or unusable" in err, err
    assert f"--sd) {w['inpaint']}: its UNet takes 9 input channels, expected 4" in err
    assert f"--inpaint) {w['sd']}: its UNet takes 4 input channels, expected 9" in err
    assert f"--ip2p) {w['sd']}: its UNet takes 4 input channels, expected 8" in err
    assert not out.exists()
    # num_heads is SD-1.x's (its inpainting or InstructPix2Pix model in the same run): SDXL keeps head dim 64
    configure(flags({**w, **TINY, "manifest": out, "num_heads": 2}))
    xl_model = s3._load_sd(s3.Runtime(), "sd", w["sd"], 4, "--sd")
    assert xl_model.unet.config.num_head_channels == 64
    sd1 = s3._load_sd(s3.Runtime(), "ip2p", w["ip2p"], 8, "--ip2p")
    assert sd1.unet.config.num_heads == 2 and sd1.unet.config.num_head_channels <= 0
    # an SDXL model with InstructPix2Pix's 8 channels is still refused: that stage runs SD-1.x only
    ip2p_xl = sdxl_checkpoint(tmp_path / "ip2p_xl.safetensors", 8, seed=6)
    configure(flags({**w, **TINY, "manifest": out, "ip2p": ip2p_xl, "stylize_p": 0.5}))
    with pytest.raises(s3.MissingWeights, match=r"ip2p_xl.safetensors: an sdxl model; this stage takes sd1$"):
        s3.check_weights(["stylize"])


def test_settings_refuse_mixing_sd1_and_sdxl_collages(xl, tmp_path):
    """The collages and backgrounds folders remember their model's flavour: a rerun with the other flavour over
    the same folder is refused (two datasets), the same flavour resumes; a settings file from before the key is
    SD-1.x's."""
    d, w = xl
    m = tmp_path / "m"
    base = {**w, **TINY, "manifest": m, "num_objects": 1}
    configure(flags({**base, "sd": w["sd"]}))
    s3.run(["prompts", "collages"])
    made = {p: p.read_bytes() for p in sorted((m / "collages").glob("*.png"))}
    stamps = {p: p.stat().st_mtime_ns for p in made}
    configure(flags({**base, "sd": w["sd"]}))
    s3.run(["collages"])  # the same settings: resumes (nothing to do)
    assert made and {p: p.stat().st_mtime_ns for p in made} == stamps  # nothing remade or rewritten
    assert {p: p.read_bytes() for p in sorted((m / "collages").glob("*.png"))} == made
    configure(flags({**base, "sd": tiny_weights.sd_checkpoint(tmp_path / "sd1.safetensors"), "num_heads": 2}))
    with pytest.raises(s3.S3Error, match=r"collages: .* was made with model='sdxl' \(now 'sd1'\)"):
        s3.run(["collages"])
    settings = m / "collages" / ".settings.json"
    old = json.load(open(settings))
    old.pop("model")  # written before the key existed: SD-1.x collages
    settings.write_text(json.dumps(old))
    s3.run(["collages"])  # an SD-1.x rerun over an old folder: accepted (nothing to redo)
    configure(flags({**base, "sd": w["sd"]}))
    with pytest.raises(s3.S3Error, match=r"model='sd1' \(now 'sdxl'\)"):
        s3.run(["collages"])


def test_sdxl_config_is_the_papers_collage_setting():
    configure([os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config", "s3_sdxl.py")])
    assert (s3.collage_resolution, s3.collage_suffix, s3.dtype) == (1024, "photos of the same", "bfloat16")
    assert s3.sd.endswith("sd_xl_base_1.0.safetensors") and s3.batch_size > 1
