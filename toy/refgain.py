"""Does a toy JeDi checkpoint use its reference? The reference gain per timestep, split into subject and scene pixels.

    python toy/refgain.py                                   # the shipped toy model
    python toy/refgain.py --ckpt out/toy/jedi.safetensors --sets 96

Held-out procedural sets of 2 (image 0 the reference, image 1 generated, random contexts as in training). At each t,
with one fixed noise draw, the denoising loss of image 1 is measured twice: with its own set's reference and with
another set's (model.diffusion.reference_errors, as train.py's --eval_interval does), and each is split by the
generator's ground-truth subject mask of image 1. The subject's pixels are what a reference can tell; the scene
comes from the prompt.
A model that ignores its reference has gain 0 everywhere; copying the subject shows as a positive subject gain.
train.py's --eval_interval logs the whole-image gain only (real data have no subject masks).
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data_procedural as dp  # noqa: E402
from model.diffusion import Diffusion, reference_errors  # noqa: E402
from model.loading import load_jedi  # noqa: E402

DEFAULT_CKPT = ROOT / "assets" / "jedi_toy.safetensors"


def subject_mask(subject, info, resolution):
    """(H, W) bool: the pixels that change when only the subject's colour changes (body, pattern, outline blend)."""
    other = dp.Subject(subject.shape, "green" if subject.color != "green" else "red", "solid")
    pose = {k: info[k] for k in ("angle", "radius", "x", "y")}
    ctx = (info["background"], info["position"])
    a, _ = dp.render(subject, ctx, resolution=resolution, rng=0, pose=pose)
    b, _ = dp.render(other, ctx, resolution=resolution, rng=0, pose=pose)
    return np.abs(a.astype(int) - b).sum(-1) > 0


def held_out_pairs(num_sets, resolution, seed):
    """x0 (S·2, 3, H, W) in [-1, 1], captions (S·2), subject masks of the generated images (S, 1, H, W)."""
    rng, held = np.random.default_rng(seed), dp.subjects("heldout")
    images, captions, masks = [], [], []
    for i in range(num_sets):
        subject = held[i % len(held)]
        ims, caps, infos = dp.render_set(subject, 2, resolution=resolution, rng=rng)
        images += ims
        captions += caps
        masks.append(subject_mask(subject, infos[1], resolution))
    x0 = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (S·2, H, W, 3) -> (S·2, 3, H, W)
    return x0, captions, torch.tensor(np.stack(masks))[:, None].float()


@torch.no_grad()
def refgain_table(model, num_sets=48, timesteps=(300, 500, 700, 800, 900, 950), seed=5):
    """-> list of dict rows (t, subject share of pixels and of the loss, losses own/other, gains)."""
    if model.vae is not None:
        raise NotImplementedError("subject masks are in pixels: this diagnostic is for pixel-space toy models")
    res = model.meta["resolution"]
    x0, captions, subj = held_out_pairs(num_sets, res, seed)
    context = model.encode_text(captions)  # (n, 77, D)
    diffusion = Diffusion(**model.meta["diffusion"])
    g, rows = torch.Generator().manual_seed(seed), []
    for tv in timesteps:
        noise = torch.randn(x0.shape, generator=g)
        parts = []
        for err in reference_errors(model.unet, diffusion, x0, context, tv, noise):  # own, other: (S, 3, H, W)
            err = err.mean(1, keepdim=True)  # (S, 3, H, W) -> (S, 1, H, W): mean over channels
            parts.append(((err * subj).sum() / subj.sum(), (err * (1 - subj)).sum() / (1 - subj).sum()))
        (s_own, b_own), (s_other, b_other) = [(s.item(), b.item()) for s, b in parts]
        share = subj.mean().item()
        own, other = share * s_own + (1 - share) * b_own, share * s_other + (1 - share) * b_other
        rows.append(dict(t=tv, subject_pixels=share, subject_loss_share=share * s_own / own,
                         subject_own=s_own, subject_other=s_other, scene_own=b_own, scene_other=b_other,
                         gain=1 - own / other, subject_gain=1 - s_own / s_other))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT))
    p.add_argument("--sets", type=int, default=48)
    p.add_argument("--seed", type=int, default=5)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    rows = refgain_table(load_jedi(args.ckpt), args.sets, seed=args.seed)
    print(f"{args.ckpt}: {args.sets} held-out sets of 2; loss of image 1 with its own reference / another set's")
    print("| t | subject pixels | subject share of loss | subject loss own / other | scene loss own / other "
          "| gain | subject gain |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['t']} | {r['subject_pixels']:.3f} | {r['subject_loss_share']:.2f} | {r['subject_own']:.4f} / "
              f"{r['subject_other']:.4f} | {r['scene_own']:.4f} / {r['scene_other']:.4f} | {r['gain']:+.2%} | "
              f"{r['subject_gain']:+.2%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
