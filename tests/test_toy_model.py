"""The shipped toy checkpoint: sample.py's default works on a fresh machine, with the right shapes, deterministically."""
import os

import numpy as np
from PIL import Image

import sample

REF = os.path.join(os.path.dirname(sample.DEFAULT_CKPT), "refs", "diamond-blue-dots-yellow_0.png")


def test_shipped_checkpoint_is_small_and_loads():
    assert os.path.getsize(sample.DEFAULT_CKPT) <= 20 * 2**20
    m = sample.load_model(None)
    assert m.vae is None and m.resolution == 32 and m.unet.config.in_channels == 7
    assert m.meta["sampler"] in ("ddim", "dpmpp_2m") and m.meta["steps"] > 0


def test_default_command_samples_deterministically(tmp_path, capsys):
    args = ["--refs", REF, "--prompt", "a toy on the beach, on the left", "a toy in the snow, on the right",
            "--steps", "3"]
    assert sample.main(args + ["--out", str(tmp_path / "a")]) == 0
    assert sample.main(args + ["--out", str(tmp_path / "b")]) == 0
    for name in ("set0_prompt0.png", "set0_prompt1.png"):
        a, b = (np.asarray(Image.open(tmp_path / d / name)) for d in "ab")
        assert a.shape == (32, 32, 3) and np.array_equal(a, b)
    assert Image.open(tmp_path / "a" / "grid.png").size == (3 * 34 + 2, 36)
