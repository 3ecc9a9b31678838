"""Checkpoints that lie (issue 26): the shipped toy's tensors with edited metadata, and damaged files.

Each is refused by every loader with one line naming the file and what is wrong, a non-zero exit from the
entry points, no files written, and no allocation sized by the lie (configs are built on the meta device and
compared with the tensors first).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.loading import CheckpointError, check_jedi, load_jedi, load_sd
from test_eval import mini_dataset  # noqa: F401  (a fixture: the two-subject DreamBench folder)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "assets", "jedi_toy.safetensors")


def _toy():
    with safe_open(TOY, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["jedi"])


def _write(tmp_path, name, tensors, raw_meta) -> str:
    path = str(tmp_path / name)
    save_file(tensors, path, metadata=None if raw_meta is None else {"jedi": raw_meta})
    return path


def _edited(tmp_path, edit, name="lie.safetensors") -> str:
    tensors, meta = _toy()
    edit(meta)
    return _write(tmp_path, name, tensors, json.dumps(meta))


LIES = {
    "malformed JSON": (lambda t, m: _write(t, "lie.safetensors", _toy()[0], json.dumps(m)[:-7]),
                       "not valid JSON"),
    "unknown UNet key": (lambda t, m: _edited(t, lambda d: d["unet"].update(attention_flavour="fast")),
                         "unexpected keyword argument 'attention_flavour'"),
    "negative resolution": (lambda t, m: _edited(t, lambda d: d.update(resolution=-5)), "resolution = -5"),
    "config wider than its tensors": (lambda t, m: _edited(t, lambda d: d["unet"].update(model_channels=8192)),
                                      "wrong shape"),
    "steps out of range": (lambda t, m: _edited(t, lambda d: d.update(steps=10 ** 9)), "steps = 1000000000"),
    "set size out of range": (lambda t, m: _edited(t, lambda d: d.update(set_sizes=[2, 0])), "set_sizes = 0"),
    "unknown sampler": (lambda t, m: _edited(t, lambda d: d.update(sampler="euler_z")), "sampler = 'euler_z'"),
    "huge schedule": (lambda t, m: _edited(t, lambda d: d["diffusion"].update(num_timesteps=10 ** 12)),
                      "num_timesteps"),
    "absurd depth": (lambda t, m: _edited(t, lambda d: d["unet"].update(num_res_blocks=10 ** 6)), "num_res_blocks"),
    "text config wider than its tensors": (lambda t, m: _edited(t, lambda d: d["text"].update(hidden_size=4096)),
                                           "text encoder: checkpoint does not match"),
    "metadata not an object": (lambda t, m: _write(t, "lie.safetensors", _toy()[0], "[1, 2]"), "not an object"),
}


@pytest.mark.parametrize("case", sorted(LIES))
def test_lying_checkpoint_is_one_line_error_naming_the_file(tmp_path, case):
    make, expected = LIES[case]
    path = make(tmp_path, _toy()[1])
    for load in (load_jedi, check_jedi):
        with pytest.raises(CheckpointError) as e:
            load(path)
        msg = str(e.value)
        assert msg.startswith(path) and expected in msg, msg
        if "wrong shape" not in expected and "does not match" not in expected:
            assert "\n" not in msg, msg


def test_the_true_metadata_still_loads(tmp_path):
    path = _edited(tmp_path, lambda d: None, name="true.safetensors")
    assert check_jedi(path)["resolution"] == load_jedi(path).resolution


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in kilobytes on Linux only")
def test_wider_config_allocates_nothing_it_claims(tmp_path):
    """Before the fix, model_channels 8192 grew the process to 24 GB. Now the check on the meta device refuses it;
    the process stays far below what the lie would have cost."""
    path = _edited(tmp_path, lambda d: d["unet"].update(model_channels=8192))
    code = ("import resource, sys\nfrom model.loading import load_jedi, CheckpointError\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"try:\n    load_jedi({path!r})\nexcept CheckpointError:\n    pass\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    grown_kb = int(r.stdout.strip().splitlines()[-1])
    assert grown_kb < 512 * 1024, f"loading a lying checkpoint grew the process by {grown_kb / 1024:.0f} MB"


@pytest.mark.parametrize("damage", ["truncated", "not a checkpoint"])
def test_damaged_files_are_one_line_errors_in_every_loader(tmp_path, damage):
    data = open(TOY, "rb").read()
    bad = data[: len(data) // 2] if damage == "truncated" else b"hello, I am a text file\n" * 10
    for name in ("bad.safetensors", "bad.ckpt"):
        path = tmp_path / name
        path.write_bytes(bad)
        loaders = [load_sd] + ([load_jedi] if name.endswith(".safetensors") else [])
        for load in loaders:
            with pytest.raises(CheckpointError) as e:
                load(str(path))
            assert str(e.value).startswith(str(path)) and "\n" not in str(e.value), str(e.value)


def test_sd_loader_names_the_file_on_wrong_layout(tmp_path):
    path = str(tmp_path / "wrong.safetensors")
    save_file({"model.diffusion_model.foo.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError) as e:
        load_sd(path)
    assert str(e.value).startswith(path), str(e.value)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("case", ["malformed JSON", "config wider than its tensors", "negative resolution"])
def test_sample_py_refuses_in_one_line_and_writes_nothing(tmp_path, case):
    path = LIES[case][0](tmp_path, _toy()[1])
    out = tmp_path / "out"
    r = _cli(os.path.join(ROOT, "sample.py"), "--ckpt", path, "--prompt", "a toy", "--out", str(out), cwd=tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and path in lines[0] and LIES[case][1] in lines[0], r.stderr
    assert not out.exists()


def test_eval_py_refuses_before_writing(tmp_path, mini_dataset):
    """eval.py checks the checkpoint (check_jedi: no tensor read) with its other inputs, before it writes its
    results folder; every problem is reported at once."""
    path = LIES["config wider than its tensors"][0](tmp_path, _toy()[1])
    out = tmp_path / "results"
    r = _cli(os.path.join(ROOT, "eval.py"), "--dataset", str(mini_dataset), "--ckpt", path, "--out", str(out),
             "--clip_weights", str(tmp_path / "ViT-B-32.pt"), "--dino", str(tmp_path / "dino"), "--no_masked",
             cwd=tmp_path)
    assert r.returncode != 0
    assert path in r.stderr and "wrong shape" in r.stderr and "ViT-B-32.pt" in r.stderr, r.stderr
    assert not out.exists()
