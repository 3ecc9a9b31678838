"""Loading: original .ckpt, .safetensors and diffusers folders give the same models; unsafe or mismatched files fail."""
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from model.loading import CheckpointError, load_jedi, load_sd, read_original_parts, save_jedi
from model.text import build_text_encoder, encode, sd14_text_config
from model.unet import UNet, UNetConfig
from model.vae import AutoencoderKL, VAEConfig
from test_unet import TINY, diffusers_unet, randomize

UNET_CFG = UNetConfig(in_channels=4, **{**TINY, "context_dim": 64})
VAE_CFG = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
TEXT_CFG = sd14_text_config(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=128)


@pytest.fixture(scope="module")
def tiny_sd():
    """A narrow SD-1.x-topology model in the original layout (prefixes, text position_ids, schedule buffers)."""
    torch.manual_seed(0)
    unet, vae, text = randomize(UNet(UNET_CFG)), randomize(AutoencoderKL(VAE_CFG)), build_text_encoder(TEXT_CFG)
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    sd.update({"cond_stage_model.transformer.text_model." + k: v for k, v in text.state_dict().items()})
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["alphas_cumprod"] = torch.rand(1000)
    return unet, vae, text, sd


def same_modules(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_ckpt_safetensors_and_diffusers_folder_load_identically(tiny_sd, tmp_path):
    import diffusers  # the parity oracle: requirements-test.txt, never skipped
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet, vae, text, sd = tiny_sd
    torch.save({"state_dict": sd, "global_step": 470000}, tmp_path / "m.ckpt")
    save_file(sd, tmp_path / "m.safetensors")
    folder = tmp_path / "diffusers"
    for sub in ("unet", "vae", "text_encoder"):
        (folder / sub).mkdir(parents=True)
    d_unet = diffusers_unet(UNET_CFG)
    save_file(convert_ldm_unet_checkpoint(sd, dict(d_unet.config)), folder / "unet/diffusion_pytorch_model.safetensors")
    d_vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4)
    save_file(convert_ldm_vae_checkpoint(sd, dict(d_vae.config)), folder / "vae/diffusion_pytorch_model.safetensors")
    save_file({"text_model." + k: v.contiguous() for k, v in text.state_dict().items()},
              folder / "text_encoder/model.safetensors")

    loaded = [load_sd(str(p), num_heads=UNET_CFG.num_heads, in_channels=None)
              for p in (tmp_path / "m.ckpt", tmp_path / "m.safetensors", folder)]
    for m in loaded:
        assert same_modules(m.unet, unet) and same_modules(m.vae, vae) and same_modules(m.text.encoders[0], text)
        assert m.unet.config == UNET_CFG
    ids = loaded[0].text.tokenize(["a photo of a dog"])  # (1, 1, 77): one encoder
    with torch.no_grad():
        torch.testing.assert_close(loaded[2].text(ids).context, encode(text, ids[:, 0]), rtol=0, atol=0)


def test_default_load_inflates_to_jedi_input(tiny_sd, tmp_path):
    unet, _, _, sd = tiny_sd
    save_file(sd, tmp_path / "m.safetensors")
    jedi = load_sd(str(tmp_path / "m.safetensors"), num_heads=2).unet
    assert jedi.config.in_channels == 9
    x, ctx = torch.randn(4, 4, 8, 8), torch.randn(4, 7, 64)
    with torch.no_grad():
        out = jedi(torch.cat([x, torch.zeros(4, 5, 8, 8)], 1), torch.tensor([5, 900]), ctx, set_size=2)
        torch.testing.assert_close(out, unet.eval()(x, torch.tensor([5, 900]), ctx, set_size=2), rtol=0, atol=0)


def test_ema_weights_are_chosen_when_present(tiny_sd, tmp_path):
    unet, vae, text, sd = tiny_sd
    full = dict(sd)
    for k, v in unet.state_dict().items():  # a "full" checkpoint: EMA copy with the dots removed
        full["model_ema." + ("diffusion_model." + k).replace(".", "")] = v + 1
    full["model_ema.decay"], full["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(10)
    torch.save({"state_dict": full}, tmp_path / "full.ckpt")
    ema, _, _ = read_original_parts(str(tmp_path / "full.ckpt"), ema=True)
    raw, _, _ = read_original_parts(str(tmp_path / "full.ckpt"), ema=False)
    k = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    torch.testing.assert_close(ema[k], unet.state_dict()[k] + 1)
    torch.testing.assert_close(raw[k], unet.state_dict()[k])
    # through the loader users call: every UNet tensor is its EMA copy (by default), or the raw one with ema=False;
    # the VAE and text encoder have no EMA copy and load as stored
    for kw, shift in (({}, 1), ({"ema": False}, 0)):
        m = load_sd(str(tmp_path / "full.ckpt"), num_heads=2, in_channels=None, **kw)
        got, want = m.unet.state_dict(), unet.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k] + shift) for k in want), kw
        assert same_modules(m.vae, vae) and same_modules(m.text.encoders[0], text)


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_checkpoint",))


def test_pickle_with_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": {"x": Exploit()}}, f)
    with pytest.raises(CheckpointError, match="refusing"):
        load_sd(str(tmp_path / "evil.ckpt"))
    assert not (tmp_path / "pwned_by_checkpoint").exists()


def test_wrong_shape_missing_and_unexpected_keys_are_named(tiny_sd, tmp_path):
    _, _, _, sd = tiny_sd
    bad = dict(sd)
    bad["model.diffusion_model.input_blocks.1.0.emb_layers.1.weight"] = torch.zeros(3, 3)
    del bad["model.diffusion_model.output_blocks.2.1.proj_out.bias"]
    bad["model.diffusion_model.input_blocks.1.0.extra.weight"] = torch.zeros(1)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_sd(str(tmp_path / "bad.safetensors"), num_heads=2)
    msg = str(e.value)
    assert "input_blocks.1.0.emb_layers.1.weight" in msg and "wrong shape" in msg
    assert "output_blocks.2.1.proj_out.bias" in msg and "missing" in msg
    assert "input_blocks.1.0.extra.weight" in msg and "unexpected" in msg


def test_truncated_and_foreign_files_fail_clearly(tiny_sd, tmp_path):
    _, _, _, sd = tiny_sd
    torch.save({"state_dict": {k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}},
               tmp_path / "novae.ckpt")
    with pytest.raises(CheckpointError, match="no VAE weights"):
        load_sd(str(tmp_path / "novae.ckpt"), num_heads=2)
    for name in ("junk.ckpt", "junk.safetensors"):  # a clear error naming the file, never a traceback from inside
        (tmp_path / name).write_bytes(b"not a checkpoint at all")
        with pytest.raises(CheckpointError, match=str(tmp_path / name)):
            load_sd(str(tmp_path / name))
    with pytest.raises(FileNotFoundError):
        load_sd(str(tmp_path / "nope.ckpt"))


def test_jedi_checkpoint_roundtrip(tmp_path):
    unet = randomize(UNet(UNetConfig(**{**TINY, "context_dim": 64})))
    text = build_text_encoder(TEXT_CFG)
    vae = AutoencoderKL(VAE_CFG)
    path = str(tmp_path / "jedi.safetensors")
    save_jedi(path, unet, text, vae, resolution=64, diffusion={"prediction": "eps"})
    m = load_jedi(path)
    assert same_modules(m.unet, unet) and same_modules(m.text.encoders[0], text) and same_modules(m.vae, vae)
    assert m.meta["resolution"] == 64 and m.meta["space"] == "latent"
    save_jedi(path, unet, text, None, resolution=32, diffusion={}, dtype=torch.float16)
    half = load_jedi(path)
    assert half.vae is None and next(half.unet.parameters()).dtype == torch.float32
    # every floating tensor is stored in fp16 (weights, biases, norms, of the UNet and the text encoder alike) and
    # loads back as its fp16 rounding; integer tensors stay as they are
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        stored = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert {d for d in stored.values() if d.is_floating_point} == {torch.float16}
    for module, loaded in ((unet, half.unet), (text, half.text.encoders[0])):
        want, got = module.state_dict(), loaded.state_dict()
        assert want.keys() == got.keys()
        for k, v in want.items():
            torch.testing.assert_close(got[k], v.half().float() if v.is_floating_point() else v, rtol=0, atol=0,
                                       msg=k)
    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="no JeDi metadata"):
        load_jedi(str(tmp_path / "plain.safetensors"))


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """save_jedi writes through model.files.atomic_path (the one atomic writer, also s3's records and eval's and s3's
    images): a write that fails half-way leaves the previous file intact and no temporary file behind."""
    import safetensors.torch

    unet, text = randomize(UNet(UNetConfig(**{**TINY, "context_dim": 64}))), build_text_encoder(TEXT_CFG)
    path = str(tmp_path / "jedi.safetensors")
    save_jedi(path, unet, text, None, resolution=32, diffusion={}, step=1)
    before = open(path, "rb").read()
    real = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        real(dict(list(tensors.items())[:3]), filename, metadata=metadata)  # a part is written, then the disk is full
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_jedi(path, unet, text, None, resolution=32, diffusion={}, step=2)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["jedi.safetensors"]
    assert load_jedi(path).meta["step"] == 1
