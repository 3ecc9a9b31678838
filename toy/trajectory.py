"""Where does a sample decide its subject? The model's clean-image prediction x0 at each sampling step.

    python toy/trajectory.py                                  # the shipped toy model, text only
    python toy/trajectory.py --ckpt out/toy/jedi.safetensors --out /tmp/traj.png --guidance 3

One row per prompt (text only, sets of 1, DDIM from one seeded noise), one column per step from high noise to
low: the x0 the model predicts there (clipped to [-1, 1]). A model that makes coherent subjects shows one
blurred subject colour at the first steps that sharpens; a patchwork that appears within the first steps means
the colour is decided from local noise, before the model has aggregated the evidence over the subject
(docs/toy.md).
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.diffusion import guide, jedi_input, sample  # noqa: E402

PROMPTS = ("a toy on the beach, in the middle", "a toy on the grass, on the left", "a toy in the snow, in the middle",
           "a toy at night, on the right")


@torch.no_grad()
def trajectory(model, prompts, *, steps=20, guidance=1.0, seed=1):
    """-> [(t, x0 (P, C, h, w))] for every sampling step, high t first; text guidance λ (1 = none)."""
    P, C, R = len(prompts), model.channels, model.resolution // model.down
    ctx = model.encode_text(list(prompts))  # (P, 77, D)
    null = model.encode_text([""]).expand_as(ctx)
    zeros, mask = torch.zeros(P, C, R, R, device=model.device), torch.zeros(P, device=model.device)
    record = []

    def model_fn(x, t):
        tt = torch.full((P,), t, dtype=torch.long, device=model.device)
        inp = jedi_input(x, zeros, mask)  # no references: [x_t, 0, 0]
        cond, uncond = model.unet(torch.cat([inp, inp]), torch.cat([tt, tt]), torch.cat([ctx, null]),
                                  set_size=1).chunk(2)
        eps, x0 = model.diffusion.to_eps_x0(x, tt, guide(cond, uncond, guidance))
        record.append((t, x0))
        return eps, x0

    sample(model_fn, model.diffusion, (P, C, R, R), steps=steps, sampler="ddim", device=model.device,
           generator=torch.Generator(model.device).manual_seed(seed))
    return record


def main(argv=None):
    import sample as sample_cli

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None, help="JeDi checkpoint (default: the shipped toy model)")
    p.add_argument("--prompt", nargs="+", default=list(PROMPTS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--every", type=int, default=2, help="show every k-th step")
    p.add_argument("--guidance", type=float, default=1.0, help="text guidance λ (1: none)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--scale", type=int, default=3, help="pixel zoom of the saved grid")
    p.add_argument("--out", default="toy_trajectory.png")
    args = p.parse_args(argv)
    model = sample_cli.load_model(args.ckpt)
    record = trajectory(model, args.prompt, steps=args.steps, guidance=args.guidance, seed=args.seed)[::args.every]
    shown = [model.to_pixels(x0) for _, x0 in record]  # each (P, 3, H, W) in [-1, 1]
    grid = torch.cat([torch.cat(list(x), dim=2) for x in zip(*shown)], dim=1)  # rows: prompts, columns: steps
    img = ((grid.permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    Image.fromarray(img).resize((img.shape[1] * args.scale, img.shape[0] * args.scale), Image.NEAREST).save(args.out)
    print(f"{args.out}: rows = prompts, columns = x0 predicted at t = {[t for t, _ in record]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
