"""Attribute classifier for the toy benchmark: reads the procedural generator's ground truth back off an image.

    python toy/classifier.py              # print the cached classifier's held-out accuracy (trains if missing)
    python toy/classifier.py --retrain    # train again from scratch (~3.5 min on 1 core) and overwrite

A small CNN on 32x32 RGB in [-1, 1] with one head per attribute: shape, color, pattern, pattern_color (the
subject: what JeDi must copy from the references) and background, position (the context: what the prompt asks
for). It is trained on renders of TRAINING subjects only, in random contexts and poses, mirrored at random and
lightly degraded (noise, blur, small colour shifts) so that it still reads imperfect generated images, and it is
validated on HELD-OUT subjects -- the ones the benchmark evaluates -- rendered in every context.

The weights are cached in assets/toy_classifier.safetensors with the training seed and held-out accuracies
as metadata. Training is deterministic given the seed (on one thread; see `train`).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data_procedural as dp  # noqa: E402

WEIGHTS = ROOT / "assets" / "toy_classifier.safetensors"
RESOLUTION = 32
HEADS = {**{k: tuple(v) for k, v in dp.ATTRIBUTES.items()},
         "background": tuple(dp.BACKGROUNDS), "position": tuple(dp.POSITIONS)}
SUBJECT_HEADS = tuple(dp.ATTRIBUTES)  # shape, color, pattern, pattern_color


class AttributeNet(nn.Module):
    """Conv trunk 32 -> 16 -> 8 -> 4, then the flattened 4x4 map (position needs to know *where*, so no global
    pooling) into one linear head per attribute. ~0.2M parameters, ~12M multiply-adds per image."""

    def __init__(self, widths=(32, 64, 80)):
        super().__init__()
        a, b, c = widths

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.trunk = nn.Sequential(
            *block(3, a), nn.MaxPool2d(2),  # 16x16: a 3x3 conv at full resolution first, so 1-2 px dots survive
            *block(a, b), nn.MaxPool2d(2),  # 8x8
            *block(b, c), *block(c, c), nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(c, 32, 1), nn.ReLU(inplace=True), nn.Flatten(),
            nn.Linear(32 * 16, 128), nn.ReLU(inplace=True),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(128, len(v)) for k, v in HEADS.items()})

    def forward(self, x):
        h = self.trunk(x)
        return {k: head(h) for k, head in self.heads.items()}


# ----------------------------------------------------------------------------- data

def labels_of(info: dict) -> list[int]:
    """Ground-truth attrs of a render (or a subject + context dict) -> class index per head, in HEADS order."""
    return [HEADS[k].index(info[k]) for k in HEADS]


def to_tensor(images) -> torch.Tensor:
    """uint8 (n, H, W, 3) array or list of arrays / PIL images -> float (n, 3, H, W) in [-1, 1]."""
    a = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1


def render_dataset(subject_list, n: int, rng: np.random.Generator):
    """n renders of random subjects from subject_list in random contexts and poses -> (images, labels)."""
    images, labels = [], []
    for i in rng.integers(len(subject_list), size=n):
        im, info = dp.render(subject_list[i], dp.CONTEXTS[rng.integers(len(dp.CONTEXTS))],
                             resolution=RESOLUTION, rng=rng)
        images.append(im)
        labels.append(labels_of(info))
    return to_tensor(images), torch.tensor(labels)


def heldout_dataset(poses: int = 2, seed: int = 1):
    """Every held-out subject in every context, `poses` random poses each (34 x 24 x 2 = 1632 images)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for s in dp.subjects("heldout"):
        for ctx in dp.CONTEXTS:
            for _ in range(poses):
                im, info = dp.render(s, ctx, resolution=RESOLUTION, rng=rng)
                images.append(im)
                labels.append(labels_of(info))
    return to_tensor(images), torch.tensor(labels)


def degrade(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """What a small diffusion model gets slightly wrong: blur, grain, small per-channel colour and brightness
    shifts. Deliberately light: strong colour jitter would blur orange into yellow or red."""
    n = x.shape[0]
    rand = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    sigma = rand(n) * 0.9 + 0.2  # blur, in pixels; applied to half of the batch
    k = torch.arange(-2, 3, dtype=torch.float32)
    kern = torch.exp(-k[None] ** 2 / (2 * sigma[:, None] ** 2))
    kern = kern / kern.sum(1, keepdim=True)  # (n, 5) separable gaussian per image
    blurred = x.reshape(1, n * 3, *x.shape[2:])
    kx = kern.repeat_interleave(3, 0)
    blurred = F.conv2d(F.pad(blurred, (2, 2, 0, 0), mode="replicate"), kx[:, None, None, :], groups=n * 3)
    blurred = F.conv2d(F.pad(blurred, (0, 0, 2, 2), mode="replicate"), kx[:, None, :, None], groups=n * 3)
    x = torch.where(rand(n, 1, 1, 1) < 0.5, blurred.reshape_as(x), x)
    x = x * (1 + (rand(n, 3, 1, 1) - 0.5) * 0.08) + (rand(n, 3, 1, 1) - 0.5) * 0.08  # ±4% gain, ±0.04 offset
    x = x + torch.randn(x.shape, generator=g) * rand(n, 1, 1, 1) * 0.08  # grain, sd up to 0.08 (~10/255)
    return x.clamp(-1, 1)


def mirror(x: torch.Tensor, y: torch.Tensor, g: torch.Generator):
    """Flip half the images left-right, swapping 'left' and 'right' labels. Every shape, pattern, background
    and pose distribution of the generator is mirror-symmetric, so this doubles the data for free."""
    flip = torch.rand(len(x), generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pos = list(HEADS).index("position")
    mirrored = {"left": "right", "middle": "middle", "right": "left"}
    swap = torch.tensor([HEADS["position"].index(mirrored[p]) for p in HEADS["position"]])
    y = y.clone()
    y[flip, pos] = swap[y[flip, pos]]
    return x, y


# ----------------------------------------------------------------------------- train / evaluate

@torch.no_grad()
def predict(model: AttributeNet, x: torch.Tensor, batch: int = 512) -> dict[str, torch.Tensor]:
    """(n, 3, 32, 32) in [-1, 1] -> {head: (n,) predicted class index}."""
    model.eval()
    out = {k: [] for k in HEADS}
    for i in range(0, len(x), batch):
        for k, v in model(x[i : i + batch]).items():
            out[k].append(v.argmax(1))
    return {k: torch.cat(v) for k, v in out.items()}


def accuracy(model, x, labels) -> dict[str, float]:
    pred = predict(model, x)
    return {k: round((pred[k] == labels[:, i]).float().mean().item(), 4) for i, k in enumerate(HEADS)}


def train(seed: int = 0, n_train: int = 24000, steps: int = 1500, batch: int = 128, lr: float = 3e-3,
          log=print) -> tuple[AttributeNet, dict]:
    """Train from scratch; returns the model and its metadata (seed, settings, held-out accuracy per head).
    Single-threaded so that the same seed gives the same weights on any machine with the same torch build."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.time()
        rng = np.random.default_rng(seed)
        # A fixed pool (rendering costs ~1 ms an image) reused across epochs; the degradations make each
        # pass differ. 24k images of 308 subjects x 24 contexts x random poses: no pose is seen twice.
        x, y = render_dataset(dp.subjects("train"), n_train, rng)
        log(f"rendered {n_train} training images in {time.time() - t0:.0f}s")
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        model = AttributeNet()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
        model.train()
        for step in range(steps):
            idx = torch.randint(n_train, (batch,), generator=g)
            xb, yb = mirror(x[idx], y[idx], g)
            logits = model(degrade(xb, g))
            loss = sum(F.cross_entropy(logits[k], yb[:, i]) for i, k in enumerate(HEADS))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 250 == 0 or step == steps - 1:
                log(f"step {step:5d}  loss {loss.item():.4f}  ({time.time() - t0:.0f}s)")
        xv, yv = heldout_dataset()
        acc = accuracy(model, xv, yv)
        gd = torch.Generator().manual_seed(seed + 1)  # the same held-out images through degrade(): robustness
        acc_degraded = accuracy(model, degrade(xv, gd), yv)
        meta = dict(seed=seed, n_train=n_train, steps=steps, batch=batch, lr=lr, resolution=RESOLUTION,
                    heads={k: list(v) for k, v in HEADS.items()}, heldout_accuracy=acc,
                    heldout_accuracy_degraded=acc_degraded, heldout_images=len(xv),
                    train_seconds=round(time.time() - t0, 1), torch=torch.__version__)
        log(f"held-out accuracy: {acc}\n  degraded: {acc_degraded}  ({meta['train_seconds']}s)")
        return model.eval(), meta
    finally:
        torch.set_num_threads(threads)


def save(model: AttributeNet, meta: dict, path=WEIGHTS) -> None:
    from safetensors.torch import save_file

    from model.files import atomic_path

    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:  # a concurrent reader never sees half a file
        save_file(tensors, tmp, metadata={"toy_classifier": json.dumps(meta)})


def load(path=WEIGHTS, retrain: bool = False, seed: int = 0, log=print) -> tuple[AttributeNet, dict]:
    """The cached classifier; trained (and cached) only when the file is missing or retrain=True."""
    from safetensors import safe_open

    if retrain or not os.path.exists(path):
        log(f"training the attribute classifier (seed {seed}) -> {path}")
        model, meta = train(seed=seed, log=log)
        save(model, meta, path)
        return model, meta
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["toy_classifier"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta["heads"] != {k: list(v) for k, v in HEADS.items()}:
        raise RuntimeError(f"{path} was trained for other attribute values than data_procedural's; run with --retrain")
    model = AttributeNet()
    model.load_state_dict(state)
    return model.eval(), meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--retrain", action="store_true", help="train from scratch even if the weights file exists")
    p.add_argument("--seed", type=int, default=0, help="training seed (used only when training)")
    p.add_argument("--weights", default=str(WEIGHTS), help="where the weights are cached")
    args = p.parse_args(argv)
    _, meta = load(args.weights, retrain=args.retrain, seed=args.seed)
    print(f"{args.weights}: seed {meta['seed']}, {meta['steps']} steps, trained in {meta['train_seconds']}s")
    print(f"held-out accuracy ({meta['heldout_images']} renders of {len(dp.subjects('heldout'))} held-out subjects):")
    for k, v in meta["heldout_accuracy"].items():
        print(f"  {k:14s} {v:.4f}   degraded {meta['heldout_accuracy_degraded'][k]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
