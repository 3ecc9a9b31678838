"""Checkpoints that lie (issue 26): the shipped toy's tensors with edited metadata, and damaged files.

Each is refused by every loader with one line naming the file and what is wrong (a key/shape mismatch is listed
per key at library level; the entry points print it on one line, or with their other up-front problems), a non-zero exit from the
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
    meta = _toy()[1]
    assert check_jedi(path)["resolution"] == load_jedi(path).resolution == meta["resolution"]
    from model.unet import UNetConfig

    assert load_jedi(path).unet.config == UNetConfig(**meta["unet"])  # the file's config, not a default


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


# ----------------------------------------------------------------------------- original SD checkpoints

def _sd_with(tmp_path, edit, name="sd.safetensors") -> str:
    import tiny_weights

    path = tiny_weights.sd_checkpoint(tmp_path / name)
    with safe_open(path, framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    edit(sd)
    save_file(sd, path)
    return path


def test_check_sd_agrees_with_load_sd(tmp_path):
    from model.loading import check_sd

    good = _sd_with(tmp_path, lambda sd: None)
    assert check_sd(good, in_channels=None) == load_sd(good, in_channels=None).unet.config
    k = "first_stage_model.decoder.conv_out.weight"
    bad = _sd_with(tmp_path, lambda sd: sd.update({k: sd[k][:, :-1].contiguous()}), name="bad.safetensors")  # one wrong shape
    for load in (load_sd, check_sd):
        with pytest.raises(CheckpointError, match="wrong shape") as e:
            load(bad)
        assert str(e.value).startswith(bad) and "decoder.conv_out.weight" in str(e.value)


def test_s3_refuses_a_bad_checkpoint_before_writing(tmp_path, monkeypatch, capsys):
    """The collages stage checks --sd (names and shapes, no tensor data) with every other path, before any work."""
    import s3

    bad = _sd_with(tmp_path, lambda sd: sd.pop("first_stage_model.encoder.conv_in.weight"), name="bad.safetensors")
    monkeypatch.chdir(tmp_path)
    assert s3.main(["prompts", "--manifest=m", "--num_objects=1", "--prompts_per_object=1"]) == 0
    before = sorted(p for p in (tmp_path / "m").rglob("*"))
    capsys.readouterr()
    assert s3.main(["collages", "--manifest=m", f"--sd={bad}", "--num_objects=1", "--prompts_per_object=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and bad in err[0] and "encoder.conv_in.weight" in err[0], err
    assert sorted(p for p in (tmp_path / "m").rglob("*")) == before


def test_train_refuses_a_bad_sd_path_before_writing(tmp_path):
    bad = _sd_with(tmp_path, lambda sd: sd.pop("model.diffusion_model.out.2.weight"), name="bad.safetensors")
    out = tmp_path / "run"
    r = _cli(os.path.join(ROOT, "train.py"), os.path.join(ROOT, "config", "tiny.py"), f"--sd_path={bad}",
             "--space=latent", f"--out_dir={out}", cwd=tmp_path)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sd_path: {bad}") and "out.2.weight" in last, r.stderr[-2000:]
    assert not out.exists()


# ----------------------------------------------------------------------------- the vision models eval.py and s3.py load

@pytest.mark.parametrize("lie", ["wider config", "malformed config"])
def test_hf_folder_whose_config_lies_is_one_line(tmp_path, lie):
    from transformers import ViTConfig, ViTModel

    import vision

    folder = tmp_path / "dino"
    ViTModel(ViTConfig(image_size=224, patch_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64), add_pooling_layer=False).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    if lie == "wider config":
        cfg.update(hidden_size=8192, intermediate_size=32768)  # ~1 GB per layer if it were allocated
        (folder / "config.json").write_text(json.dumps(cfg))
    else:
        (folder / "config.json").write_text(json.dumps(cfg)[:-9])
    with pytest.raises(vision.VisionError) as e:
        vision.DinoEmbedder(str(folder))
    msg = str(e.value)
    assert str(folder) in msg and "\n" not in msg, msg
    assert ("does not match its weights" if lie == "wider config" else "not a valid JSON") in msg, msg
