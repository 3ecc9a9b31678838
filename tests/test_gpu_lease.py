"""bench/gpu_lease.sh, the one command a GPU lease runs, and the pieces it shares with the older GPU scripts: the list
of what the GPU image lacks (bench/gpu_wheels.txt), the carried wheels, the simulated image of --cpu-smoke, the
kernel sweep's report of a warp-specialize fallback. The wheels are built here from the installed packages (a wheel
is a zip of a distribution's files), so no test downloads anything."""
import importlib.metadata
import os
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _carried():
    """bench/gpu_wheels.txt -> [(distribution, module)]."""
    lines = (ROOT / "bench" / "gpu_wheels.txt").read_text().splitlines()
    return [tuple(ln.split()[:2]) for ln in lines if ln.strip() and not ln.startswith("#")]


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _image():
    lines = (ROOT / "bench" / "gpu_image_packages.txt").read_text().splitlines()
    return {_norm(ln.split()[0]) for ln in lines if ln.strip() and not ln.startswith("#")}


def _wheel(dist, dest):
    """A wheel of the installed distribution `dist` in dest/ (what `pip download` would give, at this version)."""
    d = importlib.metadata.distribution(dist)
    base = Path(d.locate_file(""))
    path = dest / f"{d.metadata['Name'].replace('-', '_')}-{d.version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for f in d.files:
            if not str(f).startswith("..") and "__pycache__" not in f.parts:
                z.write(base / f, str(f))
    return path


def carried_wheels(dest):
    """The wheels of bench/gpu_wheels.txt, built in dest/ from the installed packages: {distribution: path}. For
    the --cpu-smoke runs (toy/gpu_train.sh's test too): GPU_WHEELS_DIR=dest."""
    dest.mkdir(parents=True, exist_ok=True)
    return {dist: _wheel(dist, dest) for dist, _ in _carried()}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    return carried_wheels(tmp_path_factory.mktemp("wheels"))


def _image_env(**extra):
    """The simulated GPU image (bench/gpu_image_sim), as --cpu-smoke sets it up."""
    return _env(PYTHONPATH=f"{ROOT / 'bench' / 'gpu_image_sim'}:{ROOT}",
                JEDI_GPU_IMAGE=str(ROOT / "bench" / "gpu_image_packages.txt"), **extra)


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    for k in ("PYTHONPATH", "JEDI_ATTN", "TRITON_INTERPRET", "GPU_ENV_READY", "JEDI_GPU_IMAGE", "GPU_WHEELS_DIR"):
        env.pop(k, None)
    return {**env, **extra}


def test_carried_list_covers_what_the_image_lacks():
    """Every requirement of a carried package (as installed: the locked versions) and every runtime requirement of
    the project is on the GPU image or carried, so --cpu-smoke's simulated image is the GPU's."""
    from packaging.requirements import Requirement

    carried = {_norm(d) for d, _ in _carried()}
    image = _image()
    assert {"open-clip-torch", "ftfy", "wcwidth", "diffusers", "torch", "triton", "transformers", "einops"} <= \
        carried | image and not carried & image and len(image) > 150
    # diffusers lists importlib_metadata unconditionally but imports it on Python < 3.8 only
    import diffusers.utils.import_utils as iu
    assert "if sys.version_info < (3, 8):\n    import importlib_metadata" in Path(iu.__file__).read_text()
    unused = {"importlib-metadata"}
    py312 = {"python_version": "3.12", "python_full_version": "3.12.3", "extra": ""}  # the image's python
    for dist, _ in _carried():
        for r in importlib.metadata.requires(dist) or []:
            req = Requirement(r)
            if (req.marker is None or req.marker.evaluate(py312)) and _norm(req.name) not in unused:
                assert _norm(req.name) in image | carried, f"{dist} needs {req.name}: carry it (bench/gpu_wheels.txt)"
    lazy = {"webdataset": "data.py imports it for .tar shards only", "pytest": "the tests"}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        name = re.split(r"[\s=<>!~\[;#]", line.strip(), maxsplit=1)[0]
        if name and not line.startswith(("#", "-")) and name not in lazy:
            assert _norm(name) in image | carried, f"requirements.txt's {name} is not on the GPU image: carry it"


def test_sweep_reports_a_warp_specialize_fallback(tmp_path, monkeypatch):
    """flash_attn._WS_FAILED holds (D, dtype, ALIGNED, TMA); the sweep's report lists them (it unpacked 3 and
    raised in write(), so neither kernel_sweep.md nor the dispatch table was written)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import argparse

    import kernel_sweep
    from kernels import flash_attn

    monkeypatch.setattr(flash_attn, "_WS_FAILED", {(40, torch.bfloat16, True, True), (80, torch.float16, True, False)})
    args = argparse.Namespace(out=tmp_path)
    kernel_sweep.write(args, ["# sweep", ""], [], [], [], "Test Card", ["bf16"], {"measure": 1.0}, done=True)
    text = (tmp_path / "kernel_sweep.md").read_text()
    assert "- D 40 bfloat16 aligned True TMA True" in text and "- D 80 float16 aligned True TMA False" in text
    assert (tmp_path / "dispatch" / "test-card.json").is_file()


def test_lease_kernel_step_measures_jedi_xl_at_its_resolution():
    """The kernel step's sweep, on the GPU and in --cpu-smoke alike, measures SD-1.x and SDXL at the resolution
    JeDi-XL trains at (config/jedi_sdxl.py), so the table it writes holds the D 64 buckets JeDi-XL looks up; the
    cut's shapes are test_kernels.py's (test_kernel_sweep_shapes_are_the_models_own)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import kernel_sweep

    script = (ROOT / "bench" / "gpu_lease.sh").read_text()
    [models] = re.findall(r"^MODELS=(\S+)$", script, re.M)
    sweeps = re.findall(r"^  SWEEP=\((.*?)\)$", script, re.M | re.S)
    assert len(sweeps) == 2 and all("--models $MODELS" in s for s in sweeps), sweeps  # smoke and GPU
    parsed = dict(kernel_sweep.parse_models(models))
    config = ROOT / "config" / "jedi_sdxl.py"
    scope = {}
    exec(config.read_text(), scope)
    assert parsed == {"sd1": 512, "sdxl": scope["resolution"]}, (models, scope["resolution"])


def test_gpu_train_refuses_without_the_tokenizer_packages(tmp_path, wheels):
    """toy/gpu_train.sh needs open_clip (model/text.py's tokenizer), which the GPU image lacks; it carried only ftfy
    and wcwidth. On the simulated image with only those two wheels it must stop before training (exit 2, naming
    open_clip, nothing written); with the listed wheels the tokenizer imports from them."""
    few = tmp_path / "few"
    few.mkdir()
    for dist in ("ftfy", "wcwidth"):
        (few / wheels[dist].name).symlink_to(wheels[dist])
    t = time.time()
    r = subprocess.run(["bash", "toy/gpu_train.sh", str(tmp_path / "out"), "--cpu-smoke"], cwd=ROOT,
                       env=_image_env(GPU_WHEELS_DIR=str(few)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "open_clip" in r.stderr and "fetch_wheels.sh" in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "out").exists() and time.time() - t < 60

    check = ('source bench/gpu_env.sh && require_carried && "$PY" -c "'
             'import open_clip, ftfy, wcwidth, diffusers; from model.text import Tokenizer; '
             'print(Tokenizer()([\'a dog\'])[0, :3].tolist(), open_clip.__file__, diffusers.__file__)"')
    r = subprocess.run(["bash", "-c", check], cwd=ROOT, env=_env(GPU_CPU_SMOKE="1",
                       GPU_WHEELS_DIR=str(next(iter(wheels.values())).parent)), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[49406, 320, 1929]" in r.stdout and r.stdout.count("/gpu_site.") == 2, r.stdout  # from the wheels
    assert r.stdout.split("packages:")[1].splitlines()[0].count("(carried)") == len(_carried()), r.stdout


def test_simulated_image_hides_what_it_lacks():
    """--cpu-smoke's pythons import only the image's packages (and what they require as installed here)."""
    code = ("import importlib.util as u; import torch, numpy, PIL, transformers; "
            "print([m for m in ('open_clip', 'ftfy', 'wcwidth', 'diffusers', 'webdataset', 'av') if u.find_spec(m)])")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_image_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert "'open_clip'" in r.stdout, r.stdout + r.stderr  # without it they are installed here


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_gpu_lease_refuses_without_cuda_or_with_bad_usage(tmp_path):
    for args in ([], [str(tmp_path / "out"), "--gpu"], ["--cpu-smoke"]):
        r = subprocess.run(["bash", "bench/gpu_lease.sh", *args], cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and "usage:" in r.stderr, r.stderr
    r = subprocess.run(["bash", "bench/gpu_lease.sh", str(tmp_path / "out")], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no CUDA device" in r.stderr and not (tmp_path / "out").exists(), r.stderr


@pytest.mark.slow
def test_gpu_lease_cpu_smoke(tmp_path, wheels):
    """The whole lease at tiny size on CPU, the same code paths as the GPU run: the carried wheels unpacked onto the
    simulated image, the toy in two stages and its benchmark, the sweep with a warp-specialize fallback and its
    dispatch table, the training and sampling rows on that table; at most 8 files of <= 16 MB come back.
    9 min on 2 loaded cores (2026-12-05: toy 296 s, kernel 44 s, training 14 s, sampling 152 s, the compile row 121)."""
    out = tmp_path / "OUT"
    r = subprocess.run(["bash", "bench/gpu_lease.sh", str(out), "--cpu-smoke"], cwd=ROOT,
                       env=_env(GPU_WHEELS_DIR=str(next(iter(wheels.values())).parent)), capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert files[0] == "SUMMARY.md" and files[1:] and all(f.startswith("results.tgz.part") for f in files[1:])
    assert len(files) <= 8 and all(p.stat().st_size <= 16 * 2**20 for p in out.iterdir())
    summary = (out / "SUMMARY.md").read_text()
    steps = dict(re.findall(r"^\| (toy|kernel|training|sampling) \| (\S+) \|", summary, re.M))
    assert steps == {"toy": "0", "kernel": "0", "training": "0", "sampling": "0"}, summary
    assert summary.count("(carried)") == len(_carried()) and "- git: " in summary and "- total: " in summary

    parts = b"".join((out / f).read_bytes() for f in files[1:])
    (tmp_path / "r.tgz").write_bytes(parts)
    with tarfile.open(tmp_path / "r.tgz") as t:
        t.extractall(tmp_path / "res", filter="data")
    [res] = (tmp_path / "res").iterdir()
    assert res.name.endswith("-cpu-smoke-lease") and not (res / "toy" / "run").exists()
    assert "| JeDi, 1 reference |" in (res / "toy" / "toy_benchmark.md").read_text()
    assert (res / "toy" / "jedi_toy_gpu.safetensors").is_file()
    sweep = (res / "kernel" / "kernel_sweep.md").read_text()
    assert "triton-ws fell back to the plain loop" in sweep and "aligned True TMA" in sweep
    assert "| self | 1 | 2 | 32 | 32 | 64 | sdxl@" in sweep  # JeDi-XL's head dim (bench/gpu_lease.sh's MODELS)
    from kernels import dispatch
    _, entries = dispatch.load(res / "kernel" / "dispatch" / "cpu-interpreter-smoke.json")
    assert {k[1] for k in entries} == {40, 64}, entries
    training = (res / "bench_training.md").read_text()
    assert re.search(r"^\| auto \| [0-9.]+ \|", training, re.M), training
    sampling = (res / "bench_sampling.md").read_text()
    for row in ("diffusers", "ours", "ours\\+compile"):
        assert re.search(rf"^\| {row} \| [0-9.]+ \|", sampling, re.M), sampling
