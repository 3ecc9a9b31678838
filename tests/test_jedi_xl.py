"""JeDi-XL (JeDi on an SDXL base) end to end on CPU, with a tiny random SDXL-shaped single file in Stability's layout
(tests/tiny_weights.sdxl_checkpoint): load -> sample -> train -> export -> load -> sample (the sample.py CLI too),
exact resume, two processes under torchrun with activation checkpointing, a `sets:` manifest of odd-sized images,
and SDXL's micro-conditioning reaching the UNet per image (also when the text is dropped)."""
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.test_eval import mini_dataset, weights  # noqa: F401  (fixtures)
from tests.test_train import (ENV, ROOT, TORCHRUN, assert_same_tensors, checkpoint_tensors, losses, run,
                              saved_steps)
from tests.tiny_weights import SDXL_POOLED, sdxl_checkpoint

import data  # noqa: E402
import train  # noqa: E402

RES = 16  # pixels; the tiny VAE downsamples by 2: latents 8 x 8, UNet levels 8, 4, 2


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    return sdxl_checkpoint(tmp_path_factory.mktemp("xl") / "sd_xl_tiny.safetensors", seed=3)


@pytest.fixture(scope="module")
def xl_run(xl, tmp_path_factory):
    """train.py from the SDXL file, lr 0 (so the export must be the base), bf16 compute as on a GPU, activation
    checkpointing, text dropout, MFU and reference gain logged: -> (its log, its out_dir with jedi.safetensors)."""
    out = str(tmp_path_factory.mktemp("xl_run") / "run")
    log = run(out, xl_args(xl, '--max_iters=2', '--learning_rate=0.0', '--activation_checkpointing=True',
                           '--p_drop=0.5', '--peak_flops=1e9', '--dtype=bfloat16', '--eval_interval=2'))
    return log, out


def xl_args(xl, *extra):
    """train.py on the tiny SDXL file: config/tiny.py's run settings, SD's schedule and ε-prediction."""
    return ['--init_from=sd', f'--sd_path={xl}', '--space=latent', f'--resolution={RES}', '--schedule=scaled_linear',
            '--prediction=eps', '--log_interval=1', *extra]


def manifest(folder):
    """A `sets:` manifest (S³'s output format) of odd-sized images, PNG and JPEG, with a caption per image."""
    rng = np.random.default_rng(0)
    os.makedirs(folder / "img", exist_ok=True)
    sizes = [(40, 24), (24, 40), (33, 33), (64, 48), (200, 120), (48, 20)]  # (width, height)
    names = []
    for i, (w, h) in enumerate(sizes):
        name = f"img/{i}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    with open(folder / "sets.jsonl", "w") as f:
        for j in range(0, len(names), 2):
            f.write(json.dumps({"images": names[j:j + 2], "captions": [f"a toy {j}", f"the toy {j} outside"]}) + "\n")
    return str(folder / "sets.jsonl"), dict(zip(names, sizes))


# ----------------------------------------------------------------------------- data: each image's size and crop

def test_loader_reports_each_images_original_size_and_crop(tmp_path):
    path, sizes = manifest(tmp_path)
    recs = [json.loads(line) for line in open(path)]
    # a JPEG decodes at a reduced scale for a small resolution; the size reported is still the file's
    img = data.load_image(str(tmp_path / "img/3.jpg"), 8)
    assert img.size == (16, 12) and img.info["original_size"] == (48, 64)
    # a phone photo stored sideways (EXIF orientation 6): the upright size, height first
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 24)).save(tmp_path / "turned.jpg", exif=exif)
    img = data.load_image(str(tmp_path / "turned.jpg"))
    assert img.size == (24, 40) and img.info["original_size"] == (40, 24)
    assert data.fit(img, RES, geometry=True)[1].sizes() == ((40, 24), ((round(40 * RES / 24) - RES) // 2, 0))
    loader = data.build_loader("sets:" + path, resolution=RES, images_per_batch=2, set_sizes=(2,))
    seen = set()
    for _ in range(6):
        b = next(loader)
        assert b["original_size"].shape == b["crop_top_left"].shape == (1, 2, 2)
        rec = recs[int(b["keys"][0].split(":")[1])]
        for name, px, (oh, ow), (top, left) in zip(rec["images"], b["pixels"][0], b["original_size"][0].tolist(),
                                                    b["crop_top_left"][0].tolist()):
            w, h = sizes[name]
            assert (oh, ow) == (h, w), name
            want = data.fit(data.load_image(str(tmp_path / name), RES), RES)
            got = ((px.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
            mirrored = not (got == want).all()  # the loader mirrors whole sets at random
            assert not mirrored or (got == want[:, ::-1]).all()
            nw = max(RES, round(w * RES / min(w, h)))  # the resized width; center crop
            assert top == (max(RES, round(h * RES / min(w, h))) - RES) // 2
            assert left == (nw - RES - (nw - RES) // 2 if mirrored else (nw - RES) // 2), (name, mirrored)
            seen.add((name, mirrored))
    assert {n for n, _ in seen} == set(sizes)


def test_procedural_batches_report_the_resolution():
    b = next(data.build_loader("procedural", resolution=RES, images_per_batch=4, set_sizes=(2,)))
    assert (b["original_size"] == RES).all() and (b["crop_top_left"] == 0).all()


# ----------------------------------------------------------------------------- micro-conditioning reaches the UNet

class Spy(torch.nn.Module):
    """A UNet stand-in that records the conditioning it is called with (SDXL: a Cond with y)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, t, cond, set_size=1):
        self.calls.append(cond)
        return x[:, :(x.shape[1] - 1) // 2] * self.w  # [x_t, reference, mask] -> x_t's channels


def test_micro_conditioning_reaches_the_unet_per_image_also_when_the_text_is_dropped(xl):
    from model.conditioning import micro_conditioning
    from model.diffusion import Diffusion
    from model.loading import load_sd

    text = load_sd(xl).text
    sizes = torch.tensor([[[480, 640], [1024, 768]]]), torch.tensor([[[0, 80], [32, 0]]])  # (B=1, N=2, 2)
    batch = dict(pixels=torch.rand(1, 2, 3, RES, RES) * 2 - 1, captions=[["a toy", "the toy outside"]],
                 original_size=sizes[0], crop_top_left=sizes[1])
    parts = types.SimpleNamespace(vae=None, text=text, frozen_text=True)
    rt = types.SimpleNamespace(rank=0, dev="cpu", compute_dtype=torch.float32)
    inputs, N, g = train.micro_batch(batch, 0, 0, parts, train.caption_tokenizer(text), None, rt)
    feats = micro_conditioning(sizes[0][0], sizes[1][0], (RES, RES))  # (2, 1536): each image's own
    assert not torch.equal(feats[0], feats[1])
    encoded = text.encode(["a toy", "the toy outside"])
    for p_drop, dropped in ((0.0, False), (1.0, True)):
        spy = Spy()
        train.Trainee(spy, p_ref=0.5, p_drop=p_drop, p_drop_text=0.0, ref_loss_weight=1.0)(
            set_size=N, generator=g, diffusion=Diffusion(), **inputs)
        (cond,) = spy.calls
        assert cond.y.shape == (2, SDXL_POOLED + 1536)
        torch.testing.assert_close(cond.y[:, SDXL_POOLED:], feats, rtol=0, atol=1e-6)  # sizes kept, per image
        if dropped:  # text AND pooled vector are the null (zeros), the sizes are not
            assert not cond.context.any() and not cond.y[:, :SDXL_POOLED].any()
        else:
            torch.testing.assert_close(cond.context, encoded.context)
            torch.testing.assert_close(cond.y[:, :SDXL_POOLED], encoded.y[:, :SDXL_POOLED])
    # and the UNet's output depends on them (label_emb): other sizes, another prediction
    jedi = load_sd(xl)
    x, t = torch.randn(2, 9, 8, 8), torch.tensor([500, 500])
    with torch.no_grad():
        a = jedi.unet(x, t, text.encode(["a", "a"], original_size=sizes[0][0], crop_top_left=sizes[1][0],
                                        target_size=(RES, RES)), set_size=2)
        b = jedi.unet(x, t, text.encode(["a", "a"], target_size=(RES, RES)), set_size=2)
    assert (a - b).abs().max() > 1e-4


# ----------------------------------------------------------------------------- the whole path

def test_load_sample_train_export_load_sample(xl, xl_run, tmp_path):
    """lr 0, bf16 compute: the JeDi-XL export is the base exactly: its UNet, given zero reference and mask
    channels, is the base UNet bit for bit (sets of 1 and 2), and the frozen text conditioner and VAE are the base's
    fp32 weights, not their bf16 copies."""
    import sample
    from model.conditioning import Cond
    from model.loading import load_jedi, load_sd

    base = load_sd(xl)
    base.meta["resolution"] = RES
    (images,) = sample.generate(base, [], ["a toy", "the toy outside"], steps=2, seed=1)
    assert [im.size for im in images] == [(RES, RES)] * 2

    log, out = xl_run
    assert sorted(losses(log)) == [1, 2] and ' MFU ' in log, log
    assert re.search(r'^step 2 \| ref gain -?\d+\.\d+%', log, re.M), log  # the eval batch's Cond through FSDP
    jedi = load_jedi(f'{out}/jedi.safetensors')
    meta = jedi.meta
    assert meta['resolution'] == RES and meta['space'] == 'latent' and jedi.unet.config.in_channels == 9
    assert jedi.unet.config.adm_in_channels == SDXL_POOLED + 1536 and jedi.unet.config.num_head_channels == 64
    assert len(meta['text']['encoders']) == 2 and meta['text']['micro_conditioning']
    assert meta['text']['null'] == 'zeros' and meta['text']['resolution'] == RES  # sampling's default size
    assert meta['vae']['scale_factor'] == 0.13025 and meta['vae']['force_upcast']
    src = load_sd(xl, in_channels=None)  # the base as it is: 4 input channels
    for a, b in ((jedi.vae, src.vae), (jedi.text, src.text)):
        assert_same_tensors(a.state_dict(), b.state_dict())
    cond = src.text.encode(["a", "b", "c", "d"], target_size=(RES, RES))
    assert isinstance(cond, Cond) and cond.y is not None
    x, t = torch.randn(4, 4, 8, 8), torch.tensor([3, 500, 999, 42])
    with torch.no_grad():
        for n in (1, 2):
            torch.testing.assert_close(jedi.unet(torch.cat([x, torch.zeros(4, 5, 8, 8)], 1), t, cond, set_size=n),
                                       src.unet(x, t, cond, set_size=n), rtol=0, atol=0)

    # sample.py's CLI on the export, no SDXL flag: a reference, fp16 (the VAE stays fp32: force_upcast)
    ref = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(ref)
    sample.check_checkpoint(f'{out}/jedi.safetensors')  # what eval.py runs before it writes anything
    rc = sample.main(['--ckpt', f'{out}/jedi.safetensors', '--refs', str(ref), '--prompt', 'a toy', 'a toy outside',
                      '--steps', '2', '--out', str(tmp_path / 'samples'), '--device', 'cpu', '--dtype', 'fp16'])
    assert rc == 0 and sorted(os.listdir(tmp_path / 'samples')) == ['grid.png', 'set0_prompt0.png', 'set0_prompt1.png']
    model = sample.load_model(f'{out}/jedi.safetensors', 'cpu', dtype='fp16')
    assert model.dtype == torch.float16 and next(model.vae.parameters()).dtype == torch.float32


def test_exact_resume_and_training_on_a_sets_manifest(xl, tmp_path):
    """Training moves (lr > 0), on a `sets:` manifest of odd-sized images with text dropout; 2 steps, a checkpoint,
    a resume to 4 steps: bitwise the uninterrupted 4-step run (model, AdamW, EMA, export)."""
    path, _ = manifest(tmp_path / "data")
    args = xl_args(xl, f'--data_spec=sets:{path}', '--learning_rate=1e-3', '--warmup_iters=0', '--p_drop=0.5',
                   '--ckpt_interval=2', '--keep_checkpoints=5')
    whole, cut = str(tmp_path / 'whole'), str(tmp_path / 'cut')
    log = run(whole, args + ['--max_iters=4'])
    assert sorted(losses(log)) == [1, 2, 3, 4] and 'bad samples' not in log, log
    run(cut, args + ['--max_iters=2'])
    log = run(cut, args + ['--max_iters=4', '--init_from=resume'])
    assert f'resumed from {cut}/ckpt/step_00000002' in log and sorted(losses(log)) == [3, 4]
    assert saved_steps(cut) == [2, 4]
    assert_same_tensors(checkpoint_tensors(f'{whole}/ckpt/step_00000004', tmp_path),
                        checkpoint_tensors(f'{cut}/ckpt/step_00000004', tmp_path))
    a, b = load_file(f'{whole}/jedi.safetensors'), load_file(f'{cut}/jedi.safetensors')
    assert_same_tensors(a, b)
    base = load_sd_unet(xl)
    assert not torch.equal(a['unet.out.2.weight'], base['out.2.weight'])  # it trained


def test_eval_py_runs_on_the_jedi_xl_export(xl_run, mini_dataset, weights, tmp_path):
    """eval.py with the export as --ckpt and no other model flag: it generates (sample.load_model, generate) and
    scores every image."""
    import eval as jeval

    _, out = xl_run
    argv = ["--dataset", str(mini_dataset), "--out", str(tmp_path / "eval"), "--ckpt", f"{out}/jedi.safetensors",
            "--num_refs", "1", "--num_prompts", "1", "--images_per_prompt", "1", "--steps", "2",
            "--clip_model", weights["clip_cfg"], "--clip_weights", weights["clip_bin"], "--dino", weights["dino"],
            "--no_masked", "--device", "cpu"]
    assert jeval.main(argv) == 0
    images = sorted((tmp_path / "eval/images").glob("*/*.png"))
    assert len(images) == 2 and all(Image.open(p).size == (RES, RES) for p in images)
    res = json.loads((tmp_path / "eval/results.json").read_text())
    assert res["overall"]["CLIP-I"]["n"] == 2 and res["settings"]["checkpoint"] == f"{out}/jedi.safetensors"


def load_sd_unet(xl):
    from model.loading import load_sd
    return load_sd(xl).unet.state_dict()


def test_torchrun_two_processes_sdxl_with_activation_checkpointing(xl, tmp_path):
    """FSDP2 per-block sharding of the SDXL block list (label_emb in the UNet's own unit) and activation
    checkpointing, bf16 compute, 2 processes (gloo); the checkpoint resharded to 1 process exports the same EMA."""
    out = str(tmp_path / 'run')
    log = run(out, xl_args(xl, '--max_iters=2', '--activation_checkpointing=True', '--dtype=bfloat16',
                           '--images_per_batch=4'), nproc=2)
    assert sorted(losses(log)) == [1, 2] and json.load(open(f'{out}/ckpt/step_00000002/meta.json'))['world_size'] == 2
    run(out, xl_args(xl, '--init_from=resume', '--export_only=True', f'--export_path={tmp_path}/w1.safetensors'))
    assert_same_tensors(load_file(f'{out}/jedi.safetensors'), load_file(f'{tmp_path}/w1.safetensors'))


def test_sdxl_text_encoder_is_not_trained(xl, tmp_path):
    p = subprocess.run([sys.executable, 'train.py', 'config/tiny.py', f'--out_dir={tmp_path}/run',
                        *xl_args(xl, '--train_text_encoder=True')], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0 and 'train_text_encoder=True is for SD-1.x' in p.stderr.strip().splitlines()[-1]
    assert not os.path.exists(f'{tmp_path}/run/ckpt') or not os.listdir(f'{tmp_path}/run/ckpt')
