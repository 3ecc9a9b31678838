"""JeDi training throughput on one GPU: sets/s, images/s, peak memory and model FLOPs utilisation of train.py's step.

    python bench/bench_training.py --out bench/results/<date>-<card>/bench_training.md --compile --channels_last
    python bench/bench_training.py --tiny --out /tmp/t.md           # CPU rot check (numbers mean nothing)

The step is train.py's, mirrored here because train.py builds it inside main() (no function to import):
the SD-1.4-sized JeDi UNet with every block in `unet.blocks` an FSDP2 `fully_shard` unit, then the UNet, then a
root module holding the JeDi loss (`model.diffusion.jedi_loss`); MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32) on GPU (fp32 master weights, AdamW state and gradient reduction); world size 1 (a
single-process group: the same code path as train.py without torchrun); activation checkpointing and
torch.compile of each block's forward (static shapes, recompile limit raised for the blocks' shared code), wrapped
by the checkpoint, before sharding, as train.py applies them. One step = forward + backward of the loss, grad-norm clipping, AdamW (fused, as train.py)
and the EMA update, with one host sync to read the loss
and grad norm, as train.py's logging does. Inputs are random latents (B·N, 4, 64, 64) and text states
(B·N, 77, 768): train.py's VAE and text encoder are frozen and run outside the trained model, so they are excluded.

Rows (a variant is "+"-joined tokens: attention backend, then options):
    triton | sdpa        attention backend (kernels.attention, JEDI_ATTN)
    +ac                  activation checkpointing of every block (train.py's activation_checkpointing=True)
    +compile             torch.compile of every block (train.py's compile=True)
    +channels_last       the first convolution's input in NHWC: cuDNN runs a convolution NHWC when its input is,
                         so the activations stay NHWC as far as the ops pass it on (the weights stay NCHW: FSDP2
                         shards contiguous parameters; sampling converts the weights too)
Default: each backend plain, the first with +ac; --channels_last adds a row on top of the first backend,
--compile the rows +ac+compile and +compile, last (the slowest to set up). config/jedi_sd14.py's setting is +ac.

MFU = model FLOPs per step / step time / the card's dense bf16 peak (bench/flops.py: H100 SXM 989 TFLOP/s).
Model FLOPs per step = 3 × the UNet forward on the batch (bench/flops.py: FlopCounterMode for every op but
attention, 4·B·H·Lq·Lk·D for attention, the same for both backends); checkpoint recompute is not counted.
Step time: median of --steps timed steps after --warmup steps. Peak memory: torch.cuda.max_memory_allocated over
the timed steps. Exit status: 0, 1 if a row failed, 2 without CUDA at full size, 130 if interrupted.
"""
import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

from e2e_common import (FULL_HW, TINY_HW, Budget, Report, compile_note, fmt, header,  # noqa: E402
                        redraw_zero_layers, refuse_full_size_without_cuda, run_rows, unet_config)

BACKENDS = ("triton", "sdpa")
OPTIONS = ("ac", "compile", "channels_last")
CONTEXT_LEN = 77
# train.py's defaults for what the step does besides the UNet (they do not change its cost)
LR, BETAS, WEIGHT_DECAY, GRAD_CLIP, EMA_DECAY = 5e-5, (0.9, 0.999), 1e-2, 1.0, 0.9999


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="markdown report (also printed)")
    p.add_argument("--tiny", action="store_true", help="tiny UNet, 16x16 latents: runs on CPU (CI rot check)")
    p.add_argument("--sets", type=int, default=None, help="sets per step (default 4; tiny 2)")
    p.add_argument("--set-size", type=int, default=4, help="images per set, N")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row, median reported (default 10; tiny 2)")
    p.add_argument("--backends", default=None, help="plain rows (default triton,sdpa on CUDA, sdpa on CPU)")
    for opt in ("compile", "channels_last"):
        p.add_argument(f"--{opt}", action="store_true", help=f"add a row with {opt} (see above)")
    p.add_argument("--variants", default=None, help="explicit comma-separated rows, e.g. triton,triton+ac+compile")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card (default: by name)")
    p.add_argument("--max-seconds", type=float, default=float("inf"),
                   help="time budget: a row starts only if it should end inside it (judged by the longest row of its "
                        "kind so far, else ~20 s, ~120 s with compile); skipped rows are listed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-args", action="store_true", help="parse, print the rows, exit (tests the suite's flags)")
    a = p.parse_args(argv)
    a.sets = a.sets or (2 if a.tiny else 4)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 3)
    a.steps = a.steps or (2 if a.tiny else 10)
    a.variants = parse_variants(a.variants.split(",")) if a.variants else default_variants(a)
    return a


def parse_variants(names):
    out = []
    for name in names:
        backend, *opts = name.strip().split("+")
        if backend not in BACKENDS or any(o not in OPTIONS for o in opts) or len(set(opts)) != len(opts):
            raise SystemExit(f"bad variant {name!r}: a backend of {BACKENDS} then options of {OPTIONS}, '+'-joined")
        out.append(name.strip())
    return out


def default_variants(a):
    backends = (a.backends or ("triton,sdpa" if torch.cuda.is_available() else "sdpa")).split(",")
    main = backends[0]
    rows = [main, f"{main}+ac", *backends[1:]]
    if a.channels_last:
        rows.append(f"{main}+channels_last")
    if a.compile:
        rows += [f"{main}+ac+compile", f"{main}+compile"]
    return parse_variants(rows)


class LossRoot(nn.Module):
    """train.py's `Trainee` without the trainable-text-encoder branch: the FSDP root, forward() = the JeDi loss."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x0, context, null_context, set_size, generator, diffusion):
        from model.diffusion import jedi_loss
        return jedi_loss(self.unet, diffusion, x0, context, null_context, set_size, generator=generator)


def build(cfg, opts, dev, mesh, compute_dtype, seed):
    """train.py's model set-up (see its main(): AC / compile per block -> fully_shard blocks, UNet, root)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from model.unet import UNet
    from train import parallelize_unet

    torch.manual_seed(seed)
    # train.py builds on meta and loads a full state dict; random weights made on the device time the same
    with torch.device(dev):
        unet = redraw_zero_layers(UNet(cfg))
    if "channels_last" in opts:  # jedi_input's cat (with the broadcast mask) returns NCHW: convert at the first conv
        unet.input_blocks[0][0].register_forward_pre_hook(
            lambda mod, args: (args[0].contiguous(memory_format=torch.channels_last), *args[1:]))
    parallelize_unet(unet, mesh, compute_dtype, "compile" in opts, "ac" in opts)  # exactly as train.py wraps
    model = LossRoot(unet)
    root_mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    fully_shard(model, mesh=mesh, mp_policy=root_mp, reshard_after_forward=False)  # x0 and noise stay fp32
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, fused=True)
    with torch.no_grad():
        ema = [p.detach().clone() for p in model.parameters()]
    return model, params, optimizer, ema


def main(argv=None):
    args = parse_args(argv)
    if args.check_args:
        print("rows:", ", ".join(args.variants))
        return 0
    refuse_full_size_without_cuda("bench_training", args.tiny)

    from torch.distributed.device_mesh import init_device_mesh

    from flops import peak_bf16_flops, unet_flops
    from model.diffusion import Diffusion

    on_cuda = torch.cuda.is_available()
    dev = torch.device("cuda", 0) if on_cuda else torch.device("cpu")
    if on_cuda:
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py
    compute_dtype = torch.bfloat16 if on_cuda else torch.float32  # train.py's dtype='auto'
    # a world of one, as train.py without torchrun
    dist.init_process_group("nccl" if on_cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(dev.type, (1,))

    cfg = unet_config(args.tiny)
    hw = TINY_HW if args.tiny else FULL_HW
    B, N = args.sets, args.set_size
    step_flops = unet_flops(cfg, hw, N, num_sets=B).train_step
    peak = (args.peak_tflops * 1e12 if args.peak_tflops else peak_bf16_flops(torch.cuda.get_device_name(dev))) \
        if on_cuda else 0.0

    title = (f"JeDi training throughput: {'TINY UNet (CPU rot check, numbers mean nothing), ' if args.tiny else ''}"
             f"{hw * 8} px ({hw}x{hw} latents), {B} sets of N={N} ({B * N} images) per step, one device, "
             f"FSDP2 world size 1, {str(compute_dtype).removeprefix('torch.')} compute")
    source = "--peak-tflops" if args.peak_tflops else "by card name"
    peak_note = f"peak {peak / 1e12:.0f} TFLOP/s dense bf16 ({source})" if peak else "no peak known here: no MFU"
    notes = ["", f"- model FLOPs per step: {step_flops / 1e12:.4g} TFLOP (3 × forward, bench/flops.py); {peak_note}",
             f"- step = loss fwd+bwd, grad clip {GRAD_CLIP}, AdamW, EMA, one host sync; median of {args.steps} steps "
             f"after {args.warmup} warm-up; random latents and text states (frozen VAE / text encoder excluded)"]
    columns = ["variant", "step ms", "sets/s", "images/s", "peak GiB", "TFLOP/s", "MFU", "setup s", "loss", "note"]
    report = Report(args.out, header(title) + notes, columns)

    g = torch.Generator(device=dev).manual_seed(args.seed)
    x0 = torch.randn(B * N, cfg.out_channels, hw, hw, device=dev, generator=g)  # fp32, as the VAE's latents
    context = torch.randn(B * N, CONTEXT_LEN, cfg.context_dim, device=dev, generator=g).to(compute_dtype)
    null = torch.randn(1, CONTEXT_LEN, cfg.context_dim, device=dev, generator=g).to(compute_dtype)
    diffusion = Diffusion()

    def run_row(variant):
        backend, *opts = variant.split("+")
        if backend == "triton" and not on_cuda:
            return {"note": "skipped: needs CUDA"}
        os.environ["JEDI_ATTN"] = backend
        if "compile" in opts:
            from torch._dynamo.utils import counters
            counters.clear()  # graph breaks of this row only
        row, t0 = {}, time.perf_counter()
        model, params, optimizer, ema = build(cfg, opts, dev, mesh, compute_dtype, args.seed)

        def step(i):
            gen = torch.Generator(device=dev).manual_seed(args.seed + i)
            loss = model(x0, context, null, N, gen, diffusion)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():  # train.py's EMA on the local shards
                torch._foreach_lerp_([e.to_local() for e in ema], [p.detach().to_local() for p in model.parameters()],
                                     1 - EMA_DECAY)
            gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
            return loss.item(), gnorm.item()  # the host sync train.py's logging does every step

        try:
            for i in range(args.warmup):
                step(i)
            row["setup s"] = fmt(time.perf_counter() - t0)
            if on_cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            times, loss = [], None
            for i in range(args.steps):
                t1 = time.perf_counter()
                loss, gnorm = step(args.warmup + i)  # ends with a sync: the host clock is the step time
                times.append(time.perf_counter() - t1)
            dt = statistics.median(times)
            row.update({"step ms": fmt(1000 * dt), "sets/s": fmt(B / dt), "images/s": fmt(B * N / dt),
                        "TFLOP/s": fmt(step_flops / dt / 1e12), "loss": fmt(loss)})
            if peak:
                row["MFU"] = f"{100 * step_flops / dt / peak:.1f}%"
            if on_cuda:
                row["peak GiB"] = fmt(torch.cuda.max_memory_allocated(dev) / 2**30)
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                row["note"] = f"non-finite loss {loss} / grad norm {gnorm}"
            if "compile" in opts:
                row["note"] = (row.get("note", "") + " " + compile_note()).strip()
        except torch.OutOfMemoryError:
            row = {"note": f"out of memory at {B} sets of {N} (try --sets {max(1, B // 2)})"}
        finally:
            del model, params, optimizer, ema
        return row

    budget = Budget(args.max_seconds, guess=20, compile_guess=150)  # H200 2026-11-27: the compile row ran > 150 s
    try:
        status = run_rows(args.variants, run_row, report, budget, on_cuda)
    finally:
        dist.destroy_process_group()
    print(report.text())
    return status


if __name__ == "__main__":
    sys.exit(main())
