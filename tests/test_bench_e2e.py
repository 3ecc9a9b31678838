"""The end-to-end benchmarks must not rot: tiny CPU runs of bench/bench_sampling.py and bench/bench_training.py
(diffusers baseline included), the refusal of the full size without a GPU, the baseline computing JeDi's function,
the FLOP count, and the flags the GPU suite passes."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("JEDI_ATTN", None)
    return env


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _table(md: str) -> dict:
    """The report's table as {variant: {column: cell}}."""
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    cols = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(cols, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[1:]]
    return {r["variant"]: r for r in rows}


def test_sampling_tiny_cpu(tmp_path):
    out = tmp_path / "sampling.md"
    r = _run("bench/bench_sampling.py", "--tiny", "--channels_last", "--gn_fp32", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    rows = _table(out.read_text())
    assert list(rows) == ["diffusers", "ours", "sdpa", "sdpa+channels_last", "sdpa+gn_fp32"]
    for name, row in rows.items():
        assert float(row["s/set"]) > 0 and float(row["it/s"]) > 0 and float(row["UNet ms"]) > 0, name
        # every row computes the same function (fp32 on CPU): the same final 8-bit images, to a fraction of a level
        assert float(row["Δ vs ours"]) < 0.1 and "FAILED" not in row["note"], name
    assert rows["ours"]["× baseline"].endswith("×") and float(rows["ours"]["Δ vs ours"]) == 0
    # which attention ran: on CPU "auto" (the ours row) is SDPA for every call; the baseline uses diffusers' own
    assert rows["ours"]["attention"].startswith("sdpa fwd D") and "triton" not in rows["ours"]["attention"]
    assert rows["diffusers"]["attention"] == "diffusers' own"


def test_sampling_ours_row_is_the_users_call(monkeypatch, tmp_path):
    """The "ours" rows time sample.generate on a model from sample.prepare_model (what load_model does): if the
    benchmark stopped calling them (a private loop, a hand-tuned copy), the counts below would change."""
    import bench_sampling as bs
    import sample

    prepared, timed = [], []
    real_prepare, real_generate = sample.prepare_model, sample.generate

    def prepare(*a, **kw):
        prepared.append(real_prepare(*a, **kw))
        return prepared[-1]

    def generate(model, *a, **kw):
        timed.append((model, kw["steps"]))
        return real_generate(model, *a, **kw)

    monkeypatch.setattr(sample, "prepare_model", prepare)
    monkeypatch.setattr(sample, "generate", generate)
    out = tmp_path / "s.md"
    assert bs.main(["--tiny", "--variants", "ours", "--repeats", "2", "--out", str(out)]) == 0
    row = _table(out.read_text())["ours"]
    assert float(row["s/set"]) > 0 and "FAILED" not in row["note"]
    # the Δ reference, the fp32 noise scale, 1 warm-up, 2 timed: every one a generate() of a prepared model
    assert len(timed) == 5 and all(any(m is p for p in prepared) for m, _ in timed)
    assert len({id(m) for m, _ in timed}) == 3  # reference, fp32 and the row's own model
    assert all(steps == 2 for _, steps in timed)


def test_sampling_wrong_row_is_failed_without_a_speed(monkeypatch, tmp_path):
    """A row whose images differ beyond bf16 noise is FAILED, its speed left out, and the exit status is 1."""
    import bench_sampling as bs

    real = bs.diffusers_from_ours
    monkeypatch.setattr(bs, "diffusers_from_ours", lambda ours, hw: (lambda x, t, c, set_size=1: -real(ours, hw)(
        x, t, c, set_size=set_size)))  # a wrong UNet: the sign of its prediction flipped
    out = tmp_path / "s.md"
    assert bs.main(["--tiny", "--variants", "diffusers,ours", "--out", str(out)]) == 1
    rows = _table(out.read_text())
    assert rows["diffusers"]["note"].startswith("FAILED: Δ") and rows["diffusers"]["s/set"] == ""
    assert float(rows["ours"]["s/set"]) > 0 and rows["ours"]["× baseline"] == ""


def test_training_tiny_cpu(tmp_path):
    out = tmp_path / "training.md"
    r = _run("bench/bench_training.py", "--tiny", "--channels_last", "--peak-tflops", "1", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    rows = _table(out.read_text())
    assert list(rows) == ["sdpa", "sdpa+ac", "sdpa+data", "sdpa+channels_last"]
    for name, row in rows.items():
        assert float(row["sets/s"]) > 0 and float(row["images/s"]) == pytest.approx(4 * float(row["sets/s"]), rel=0.01)
        assert math.isfinite(float(row["loss"])) and row["MFU"].endswith("%"), name
        assert float(row["first step s"]) > 0 and float(row["setup s"]) >= float(row["first step s"]), name
    data = rows.pop("sdpa+data")  # the real data path: JPEGs decoded, resized, VAE-encoded (128 px, tiny VAE)
    assert float(data["load ms"]) > 0 and float(data["encode ms"]) > 0 and "128 px JPEGs" in data["note"], data
    assert all(not row["note"] and not row["load ms"] for row in rows.values()), rows
    assert len({float(row["loss"]) for row in rows.values()}) == 1  # same seed and step: AC and layout change nothing
    assert all(row["attention"].startswith("sdpa train D") for row in rows.values()), rows  # what each call ran


def test_training_row_over_budget_is_reported_not_hung(tmp_path):
    """A row still running when --max-seconds runs out (here: compiling) is stopped and reported; the table is
    written and the later rows are listed as skipped."""
    out = tmp_path / "training.md"
    r = _run("bench/bench_training.py", "--tiny", "--variants", "sdpa+compile,sdpa", "--max-seconds", "1",
             "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    rows = _table(out.read_text())
    assert rows["sdpa+compile"]["note"].startswith("not finished in budget: stopped at "), rows
    assert rows["sdpa"]["note"].startswith("skipped: "), rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
@pytest.mark.parametrize("script", ["bench_sampling", "bench_training"])
def test_full_size_refused_without_cuda(script):
    r = _run(f"bench/{script}.py", "--out", "/dev/null", timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "needs a CUDA GPU" in r.stderr and "--tiny" in r.stderr


def test_diffusers_baseline_is_jedi():
    """The baseline (diffusers UNet + the set-regrouping attn1 processor) with our weights = our UNet, coupled."""
    import diffusers  # noqa: F401 - in requirements-test.txt; the baseline must run in CI
    import bench_sampling as bs
    from e2e_common import TINY_UNET, redraw_zero_layers

    from model.unet import UNet, UNetConfig

    torch.manual_seed(0)
    cfg = UNetConfig(**TINY_UNET)
    ours = redraw_zero_layers(UNet(cfg)).eval()
    with torch.no_grad():  # norms and biases off their 1/0 init too, so no mix-up of them can hide
        for name, p in ours.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    base = bs.diffusers_from_ours(ours, 16)
    joint = [n for n, p in base.unet.attn_processors.items() if p is base.joint]
    assert joint and all(n.endswith("attn1.processor") for n in joint)
    x, t, ctx = torch.randn(8, 9, 16, 16), torch.randint(0, 1000, (8,)), torch.randn(8, 77, cfg.context_dim)
    with torch.no_grad():
        want = ours(x, t, ctx, set_size=4)
        got = base(x, t, ctx, set_size=4)
        uncoupled = base(x, t, ctx, set_size=1)
    assert bs.rel_diff(got, want) < 1e-5
    assert bs.rel_diff(uncoupled, want) > 1e-3  # the regrouping matters: the test would see a no-op processor


def test_sampling_xl_tiny_cpu(tmp_path):
    """--xl: JeDi-XL (an SDXL-shaped tiny UNet with label_emb, the SDXL conditioner and VAE) through sample.generate,
    against diffusers' SDXL UNet with the same weights: the same images, so the pooled text and the size numbers
    reach diffusers' text_time input as they reach ours."""
    out = tmp_path / "sampling_xl.md"
    r = _run("bench/bench_sampling.py", "--tiny", "--xl", "--variants", "diffusers,ours,sdpa+channels_last",
             "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    text = out.read_text()
    assert text.startswith("# JeDi-XL (SDXL base) sampling speed") and "SDXL text conditioner" in text
    rows = _table(text)
    assert list(rows) == ["diffusers", "ours", "sdpa+channels_last"]
    for name, row in rows.items():
        assert float(row["s/set"]) > 0 and float(row["Δ vs ours"]) < 0.1 and "FAILED" not in row["note"], name
    assert rows["ours"]["× baseline"].endswith("×") and rows["diffusers"]["attention"] == "diffusers' own"
    import bench_sampling as bs

    a = bs.parse_args(["--xl"])
    assert a.steps == 30 and a.variants[:2] == ["diffusers", "ours"]  # issue 27's set of 4, 30 steps


def test_training_xl_tiny_cpu(tmp_path):
    """--xl: train.py's step on the tiny SDXL-shaped JeDi UNet with SDXL-shaped conditioning (a Cond with y), beside
    the diffusers baseline with the same weights in the same step: the same first loss (same seed, same function)."""
    out = tmp_path / "training_xl.md"
    r = _run("bench/bench_training.py", "--tiny", "--xl", "--peak-tflops", "1", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    text = out.read_text()
    assert text.startswith("# JeDi-XL (SDXL base) training throughput")
    rows = _table(text)
    assert list(rows) == ["diffusers+ac", "sdpa+ac"]
    for name, row in rows.items():
        assert float(row["sets/s"]) > 0 and math.isfinite(float(row["loss"])) and row["MFU"].endswith("%"), name
        assert not row["note"], row
    assert float(rows["diffusers+ac"]["loss"]) == pytest.approx(float(rows["sdpa+ac"]["loss"]), rel=2e-3)
    assert rows["diffusers+ac"]["attention"] == "diffusers' own" and rows["sdpa+ac"]["attention"].startswith("sdpa")
    import bench_training as bt

    with pytest.raises(SystemExit, match="no \\+data rows with --xl"):
        bt.parse_args(["--xl", "--variants", "sdpa+data"])
    a = bt.parse_args(["--xl", "--compile"])
    assert a.sets == 2 and a.variants[0] == "diffusers+ac" and "diffusers+ac+compile" in a.variants


def test_xl_rows_run_at_jedi_xl_resolution():
    """The --xl rows measure JeDi-XL where it trains and samples: config/jedi_sdxl.py's resolution (and the sets of
    its images_per_batch), through the SDXL VAE's 8x downsampling; the lease's dispatch table covers that size."""
    import e2e_common

    scope = {}
    exec(open(os.path.join(ROOT, "config", "jedi_sdxl.py")).read(), scope)
    assert e2e_common.latent_hw(tiny=False, xl=True) * 8 == scope["resolution"]
    import bench_training as bt

    assert bt.parse_args(["--xl"]).sets * max(scope["set_sizes"]) == scope["images_per_batch"]


def test_diffusers_sdxl_baseline_is_jedi_xl():
    """The SDXL baseline (diffusers' text_time UNet + the set-regrouping attn1 processor) with our weights = our
    JeDi-XL UNet on Cond(context, [pooled, micro_conditioning(R, R, 0, 0, R, R)]); another image size differs."""
    import bench_sampling as bs
    from e2e_common import redraw_zero_layers, unet_config

    from model.conditioning import Cond, micro_conditioning
    from model.unet import UNet

    torch.manual_seed(0)
    cfg = unet_config(tiny=True, xl=True)
    ours = redraw_zero_layers(UNet(cfg)).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    x, t = torch.randn(8, 9, 16, 16), torch.randint(0, 1000, (8,))
    pooled = torch.randn(8, cfg.adm_in_channels - 6 * 256)
    cond = Cond(torch.randn(8, 77, cfg.context_dim),
                torch.cat([pooled, micro_conditioning((32, 32), (0, 0), (32, 32)).expand(8, -1)], 1))
    with torch.no_grad():
        want = ours(x, t, cond, set_size=4)
        got = bs.diffusers_from_ours(ours, 16, image_size=32)(x, t, cond, set_size=4)
        other = bs.diffusers_from_ours(ours, 16, image_size=64)(x, t, cond, set_size=4)
    assert bs.rel_diff(got, want) < 1e-5
    assert bs.rel_diff(other, want) > 1e-3  # the size numbers reach diffusers' own embedding
    with pytest.raises(ValueError, match="needs the image size"):
        bs.diffusers_from_ours(ours, 16)


def test_flops_analytic_attention_matches_flop_counter():
    from flops import counted_sdpa_flops, peak_bf16_flops, unet_flops
    from e2e_common import TINY_UNET

    from model.unet import UNetConfig

    for cfg, hw in ((UNetConfig(**TINY_UNET), 16), (UNetConfig(), 64)):  # meta device: the full size costs nothing
        f = unet_flops(cfg, hw, set_size=4, num_sets=2)
        assert f.attention > 0 and f.other > 0
        assert f.forward == counted_sdpa_flops(cfg, hw, set_size=4, num_sets=2)
    # the vendors' dense bf16 numbers; the most specific name wins
    for name, peak in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
                       ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
                       ("NVIDIA H20", 148e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12),
                       ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12), ("NVIDIA A10", 125e12),
                       ("NVIDIA A10G", 0.0), ("some unknown card", 0.0)):
        assert peak_bf16_flops(name) == peak, name


def test_gpu_suite_commands_parse():
    """The flags the suite passes are the scripts' flags (a typo would only show on the GPU)."""
    suite = (ROOT / "bench" / "gpu_suite.sh").read_text()
    steps = dict(re.findall(r'^\s*"(bench_sampling|bench_training)\|\d+\|(.*)"\s*$', suite, re.M))
    assert set(steps) == {"bench_sampling", "bench_training"}
    for name, cmd in steps.items():
        cmd = cmd.replace("$PY", sys.executable).replace("$OUT", "/tmp").replace("\\$", "$")
        r = subprocess.run(["bash", "-c", cmd + " --check-args"], cwd=ROOT, env=dict(_env(), STEP_LIMIT="100"),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "rows:" in r.stdout, r.stdout + r.stderr
        assert "+compile" in r.stdout
        assert ("diffusers" in r.stdout) == (name == "bench_sampling")


def test_profile_unet_tiny_cpu(tmp_path):
    out = tmp_path / "profile.md"
    r = _run("bench/profile_unet.py", "--tiny", "--calls", "2", "--variants", "diffusers,sdpa", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    rows = _table(out.read_text())
    assert list(rows) == ["diffusers", "sdpa"]
    for name, row in rows.items():
        assert float(row["wall ms"]) > 0 and float(row["GPU-busy ms"]) > 0 and float(row["launches"]) > 100, name
    r = _run("bench/profile_unet.py")  # the full size needs CUDA
    assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr, r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_gpu_e2e_refuses_without_cuda_and_its_commands_parse(tmp_path):
    """bench/gpu_e2e.sh: exit 2 and nothing written without CUDA; the rows it asks for are the scripts' rows, with
    the user's path (ours, compiled, CUDA-graphed) beside the diffusers baseline and SDPA-only."""
    r = subprocess.run(["bash", "bench/gpu_e2e.sh", str(tmp_path / "out")], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no CUDA device" in r.stderr and not (tmp_path / "out").exists(), r.stderr
    script = (ROOT / "bench" / "gpu_e2e.sh").read_text()
    found = re.findall(r'^\s*"(bench_sampling|bench_training)\|(\d+)\|(.*)"\s*$', script, re.M)
    steps = {name: cmd for name, _, cmd in found}
    assert set(steps) == {"bench_sampling", "bench_training"}
    assert sum(int(limit) for _, limit, _ in found) < 300  # the steps' limits: under 5 minutes
    rows = {}
    for name, cmd in steps.items():
        cmd = cmd.replace("$PY", sys.executable).replace("$OUT", str(tmp_path)).replace("\\$", "$")
        r = subprocess.run(["bash", "-c", cmd + " --check-args"], cwd=ROOT, env=dict(_env(), STEP_LIMIT="100"),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "rows:" in r.stdout, r.stdout + r.stderr
        rows[name] = r.stdout.split("rows:")[1].strip().split(", ")
    # "ours" (auto dispatch) beside "sdpa" (SDPA forced): shows whether the card's kernel table pays, once one is
    # committed to kernels/dispatch/ (none yet: both run SDPA)
    assert rows["bench_sampling"] == ["diffusers", "ours", "sdpa", "ours+compile", "ours+compile+cuda_graphs"]
    assert any("compile" in v for v in rows["bench_training"])
