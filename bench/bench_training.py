"""JeDi training throughput on one GPU: sets/s, images/s, peak memory and model FLOPs utilisation of train.py's step.

    python bench/bench_training.py --out bench/results/<date>-<card>/bench_training.md --compile --channels_last
    python bench/bench_training.py --tiny --out /tmp/t.md           # CPU rot check (numbers mean nothing)

The step is train.py's own, imported, not copied: the SD-1.4-sized JeDi UNet inside train.Trainee (the JeDi loss
with train.py's default settings), wrapped by train.parallelize (torch.compile and activation checkpointing per
block, every block in `unet.blocks` an FSDP2 `fully_shard` unit, then the UNet, then the root; bf16 params with fp32
master weights, AdamW state and gradient reduction on GPU), train.build_optimizer (fused AdamW, EMA), then per step
train.forward_backward, train.clip_gradients and train.optimizer_step, and one host sync to read the loss and grad
norm, as train.py's logging does. World size 1: train.setup_distributed without torchrun, the same code path.
Only the weights differ: random, made on the device (train.py builds on meta and loads a full state dict).

Rows (a variant is "+"-joined tokens: attention backend, then options):
    auto | triton | sdpa attention backend (kernels.attention, JEDI_ATTN; auto = the card's dispatch table,
                         kernels/dispatch/ or --dispatch-dir; SDPA without one)
    +ac                  activation checkpointing of every block (train.py's activation_checkpointing=True)
    +compile             torch.compile of every block (train.py's compile=True)
    +channels_last       NHWC activations from the first convolution on (train.py's channels_last=True)
    +data                the real data path in front of the step: data.py's loader on a folder of JPEG sets this
                         script writes (RES·1.5 × RES·1.25 px: decode, resize and crop all run), then train.prepare:
                         the frozen VAE encodes the images (at RES = 512 px full size) and the frozen text encoder the
                         captions, as train.py does every step. Its "load ms" is the wait for the loader's next batch
                         (num_workers as train.py's default on GPU, 0 with --tiny), "encode ms" the VAE + text encoder.
                         The other rows feed random latents (B·N, 4, 64, 64) and text states (B·N, 77, 768) instead.
    diffusers            the baseline: diffusers' UNet2DConditionModel with our weights (diffusers' converter) and the
                         set-regrouping attn1 processor (bench_sampling's), in the same train.py step: Trainee, FSDP2
                         per down/middle/up block, +ac/+compile per block as ours
Default: each backend plain, the first with +ac and with +data; --channels_last adds a row on top of the first
backend, --compile the rows +ac+compile and +compile, last (the slowest to set up). config/jedi_sd14.py's setting
is +ac.

--xl: JeDi-XL, the SDXL base UNet (2.57B) with JeDi's 9 input channels, at 512 px (64x64 latents: config/jedi_sdxl.py's), random text
conditioning of SDXL's shapes (context (B·N, 77, 2048), y (B·N, 2816): pooled text + size features); default 2
sets of 4 per step (config/jedi_sdxl.py's images_per_batch; the fp32 master weights, gradients, AdamW state and EMA of 2.6B parameters take ~48 GiB on one
device), rows diffusers+ac then each backend +ac (+ac+compile rows with --compile). No +data rows: train.py's SDXL
data path (the SDXL conditioner in train.prepare) is not in this branch.
    python bench/bench_training.py --xl --out bench/results/<date>-<card>/bench_training_xl.md --compile

MFU = model FLOPs per step / step time / the card's dense bf16 peak (flops.py, the one FLOP counter: H100 SXM 989
TFLOP/s). Model FLOPs per step = 3 × the UNet forward on the batch (flops.unet_flops: FlopCounterMode for every op
but attention, 4·B·H·Lq·Lk·D for attention, the same for both backends); checkpoint recompute is not counted, nor
the VAE and text encoder of +data rows (train.py's MFU does not count them either).
Step time: median of --steps timed steps after --warmup steps. "first step s" is the first warm-up step alone
(compile rows compile there), "setup s" the build and all warm-up. Peak memory: torch.cuda.max_memory_allocated
over the timed steps.

Budget (--max-seconds): a row starts only if it should end inside the budget (Budget in e2e_common), and a row that
is still running when the budget runs out (a compile that takes too long) is stopped there and reported as "not
finished in budget" with how far it got, instead of being killed with the rest of the table (SIGALRM; it lands
when the main thread next runs Python, so a backward in progress, where the backward graphs compile, ends first).
Exit status: 0, 1 if a row failed, 2 without CUDA at full size, 130 if interrupted.
"""
import argparse
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from kernels import backend_summary, record_backends  # noqa: E402
from e2e_common import (Budget, Report, compile_note, diffusers_from_ours, fmt, header, latent_hw,  # noqa: E402
                        redraw_zero_layers, refuse_full_size_without_cuda, run_rows, unet_config, use_dispatch_dir)

BACKENDS = ("auto", "triton", "sdpa", "diffusers")
OPTIONS = ("ac", "compile", "channels_last", "data")
CONTEXT_LEN = 77


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="markdown report (also printed)")
    p.add_argument("--tiny", action="store_true", help="tiny UNet, 16x16 latents: runs on CPU (CI rot check)")
    p.add_argument("--xl", action="store_true", help="JeDi-XL rows (SDXL base, 512 px) beside a diffusers SDXL "
                   "baseline (see above)")
    p.add_argument("--sets", type=int, default=None, help="sets per step (default 4, --xl 2; tiny 2)")
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
                        "kind so far, else ~20 s, ~60 s with compile), and a row still running when it runs out is "
                        "stopped and reported as not finished; skipped rows are listed")
    p.add_argument("--dispatch-dir", default=None,
                   help="read the attention dispatch tables from here instead of kernels/dispatch/ (a sweep's output)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-args", action="store_true", help="parse, print the rows, exit (tests the suite's flags)")
    a = p.parse_args(argv)
    a.sets = a.sets or (2 if a.tiny or a.xl else 4)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 3)
    a.steps = a.steps or (2 if a.tiny else 10)
    a.variants = parse_variants(a.variants.split(","), a.xl) if a.variants else default_variants(a)
    return a


def parse_variants(names, xl=False):
    out = []
    for name in names:
        backend, *opts = name.strip().split("+")
        if backend not in BACKENDS or any(o not in OPTIONS for o in opts) or len(set(opts)) != len(opts):
            raise SystemExit(f"bad variant {name!r}: a backend of {BACKENDS} then options of {OPTIONS}, '+'-joined")
        if backend == "diffusers" and {"channels_last", "data"} & set(opts):
            raise SystemExit(f"bad variant {name!r}: the diffusers baseline takes +ac and +compile only")
        if xl and "data" in opts:
            raise SystemExit(f"bad variant {name!r}: no +data rows with --xl (train.py's SDXL data path is not here)")
        out.append(name.strip())
    return out


def default_variants(a):
    backends = (a.backends or ("triton,sdpa" if torch.cuda.is_available() else "sdpa")).split(",")
    main = backends[0]
    if a.xl:  # 2.6B parameters: activation checkpointing always (config/jedi_sd14.py's setting too)
        rows = ["diffusers+ac", f"{main}+ac", *(f"{b}+ac" for b in backends[1:])]
        if a.channels_last:
            rows.append(f"{main}+ac+channels_last")
        if a.compile:
            rows += ["diffusers+ac+compile", f"{main}+ac+compile"]
        return parse_variants(rows, xl=True)
    rows = [main, f"{main}+ac", f"{main}+data", *backends[1:]]
    if a.channels_last:
        rows.append(f"{main}+channels_last")
    if a.compile:
        rows += [f"{main}+ac+compile", f"{main}+compile"]
    return parse_variants(rows)


def build(cfg, opts, rt, seed, backend="sdpa", hw=None):
    """train.py's trained model, AdamW and EMA around a UNet with random weights made on the device: ours, or the
    same weights in diffusers' UNet (backend "diffusers")."""
    import train
    from model.unet import UNet

    torch.manual_seed(seed)
    with torch.device(rt.dev):
        unet = redraw_zero_layers(UNet(cfg))
    if backend == "diffusers":  # images of hw·8 px: SDXL's size numbers (the synthetic y's are random anyway)
        ours, unet = unet, diffusers_from_ours(unet, hw, image_size=8 * hw)
        del ours
        unet.unet.train().requires_grad_(True)
    if "channels_last" in opts:
        train.use_channels_last(unet)
    model = train.parallelize(train.Trainee(unet, **train.loss_settings()), rt.mesh, rt.compute_dtype,
                              "compile" in opts, "ac" in opts)
    params, optimizer, ema = train.build_optimizer(model)
    return model, params, optimizer, ema


def write_jpeg_sets(root, num_sets, set_size, resolution, seed):
    """`num_sets` folders of `set_size` JPEGs (1.5 × 1.25 × resolution: smooth colour fields plus grain, so they
    decode like photos, not like flat colour) and a caption.txt each: data.py's "sets" folder layout."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = round(1.5 * resolution), round(1.25 * resolution)
    for s in range(num_sets):
        d = Path(root) / f"set{s:03d}"
        d.mkdir(parents=True, exist_ok=True)  # a row stopped half-way may have begun it
        (d / "caption.txt").write_text(f"a photo of object {s} on a table")
        for i in range(set_size):
            coarse = rng.uniform(0, 255, (h // 32 + 1, w // 32 + 1, 3)).astype(np.uint8)  # (h/32, w/32, 3)
            img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)  # (h, w, 3)
            img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i}.jpg", quality=90)


class DataPath:
    """train.py's data path for +data rows: the loader on the JPEG folder, the frozen VAE and text encoder (random
    weights, SD-1.4 sizes at full size), train.prepare. Built once, on the first +data row."""

    def __init__(self, args, cfg, hw, rt, workdir):
        import data
        import train
        from model.text import Tokenizer, build_text_encoder, encode, sd14_text_config
        from model.vae import AutoencoderKL, VAEConfig

        torch.manual_seed(args.seed)
        vae_cfg = VAEConfig(ch=32, num_res_blocks=1) if args.tiny else VAEConfig()
        self.vae = train.freeze(AutoencoderKL(vae_cfg), rt.dev, rt.compute_dtype)
        text_cfg = sd14_text_config(hidden_size=cfg.context_dim, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=2 * cfg.context_dim) if args.tiny else sd14_text_config()
        self.text_encoder = train.freeze(build_text_encoder(text_cfg), rt.dev, rt.compute_dtype)
        tokenizer = Tokenizer()
        self.tokenize = train.caption_tokenizer(tokenizer)
        self.null_context = encode(self.text_encoder, tokenizer([""]).to(rt.dev))  # (1, 77, D) for ""
        self.resolution = hw * self.vae.downsample_factor  # 512 px at full size
        self.num_workers = 0 if args.tiny else train.num_workers
        B, N = args.sets, args.set_size
        write_jpeg_sets(workdir, 4 * B, N, self.resolution, args.seed)
        self.loader = data.build_loader(f"sets:{workdir}", resolution=self.resolution, images_per_batch=B * N,
                                        seed=args.seed, set_sizes=(N,), num_workers=self.num_workers,
                                        pin_memory=rt.dev.startswith("cuda"))
        self.rt = rt

    def inputs(self, generator):
        """-> (model inputs, seconds waiting for the batch, seconds in the VAE and text encoder)."""
        import train

        t0 = time.perf_counter()
        batch = next(self.loader)
        t1 = time.perf_counter()
        x0, ids, context = train.prepare(batch, generator, self.vae, self.text_encoder, self.tokenize, self.rt.dev,
                                         self.rt.compute_dtype)
        if self.rt.dev.startswith("cuda"):
            torch.cuda.synchronize()
        return dict(x0=x0, context=context, null_context=self.null_context, ids=ids), t1 - t0, time.perf_counter() - t1


class OverBudget(BaseException):
    """Raised by SIGALRM when --max-seconds runs out inside a row. A BaseException, like KeyboardInterrupt, so that
    no `except Exception` on the way (dynamo's and inductor's compile error handling) turns it into something else."""


def _over_budget(signum, frame):
    raise OverBudget()


def main(argv=None):
    args = parse_args(argv)
    if args.check_args:
        print("rows:", ", ".join(args.variants))
        return 0
    refuse_full_size_without_cuda("bench_training", args.tiny)

    import train
    from flops import peak_bf16_flops, unet_flops
    from model.diffusion import Diffusion

    rt = train.setup_distributed()  # a world of one (no torchrun), cuda:0 or CPU, train.py's dtype='auto'
    dev, on_cuda = torch.device(rt.dev), rt.dev.startswith("cuda")
    cfg = unet_config(args.tiny, args.xl)
    hw = latent_hw(args.tiny, args.xl)
    B, N = args.sets, args.set_size
    step_flops = unet_flops(cfg, hw, N, num_sets=B).train_step
    peak = args.peak_tflops * 1e12 if args.peak_tflops else \
        (peak_bf16_flops(torch.cuda.get_device_name(dev)) if on_cuda else 0.0)

    title = (f"{'JeDi-XL (SDXL base)' if args.xl else 'JeDi'} training throughput: "
             f"{'TINY UNet (CPU rot check, numbers mean nothing), ' if args.tiny else ''}"
             f"{hw * 8} px ({hw}x{hw} latents), {B} sets of N={N} ({B * N} images) per step, one device, "
             f"FSDP2 world size 1, {str(rt.compute_dtype).removeprefix('torch.')} compute")
    source = "--peak-tflops" if args.peak_tflops else "by card name"
    peak_note = f"peak {peak / 1e12:.0f} TFLOP/s dense bf16 ({source})" if peak else "no peak known here: no MFU"
    notes = ["", f"- model FLOPs per step: {step_flops / 1e12:.4g} TFLOP (3 × UNet forward, flops.py); {peak_note}",
             f"- step = train.py's: loss fwd+bwd, grad clip {train.grad_clip}, fused AdamW, EMA, one host sync; "
             f"median of {args.steps} steps after {args.warmup} warm-up; random latents and text states except in "
             f"+data rows (JPEG decode + resize + VAE/text encode in front of the step)",
             use_dispatch_dir(args.dispatch_dir)]
    columns = ["variant", "step ms", "sets/s", "images/s", "peak GiB", "TFLOP/s", "MFU", "load ms", "encode ms",
               "first step s", "setup s", "loss", "attention", "note"]
    report = Report(args.out, header(title) + notes, columns)

    g = torch.Generator(device=dev).manual_seed(args.seed)
    x0 = torch.randn(B * N, cfg.out_channels, hw, hw, device=dev, generator=g)  # fp32, as the VAE's latents
    context = torch.randn(B * N, CONTEXT_LEN, cfg.context_dim, device=dev, generator=g).to(rt.compute_dtype)
    null = torch.randn(1, CONTEXT_LEN, cfg.context_dim, device=dev, generator=g).to(rt.compute_dtype)
    if cfg.adm_in_channels is not None:  # SDXL: y (pooled text + size features) beside the context, one per image
        from model.conditioning import Cond
        context = Cond(context, torch.randn(B * N, cfg.adm_in_channels, device=dev, generator=g).to(rt.compute_dtype))
        null = Cond(null, torch.randn(1, cfg.adm_in_channels, device=dev, generator=g).to(rt.compute_dtype))
    synthetic = dict(x0=x0, context=context, null_context=null)
    diffusion = Diffusion()
    # H200 2026-11-27: the compile row ran > 150 s and was killed with the table. Now a row over budget is stopped
    # and reported (how far it got), so a compile row is started whenever a minute is left, not skipped unseen.
    budget = Budget(args.max_seconds, guess=20, compile_guess=60)
    workdir = tempfile.TemporaryDirectory(prefix="bench_training_jpegs_")
    data_path = None

    def run_row(variant):
        nonlocal data_path
        backend, *opts = variant.split("+")
        if backend == "triton" and not on_cuda:
            return {"note": "skipped: needs CUDA"}
        os.environ["JEDI_ATTN"] = "sdpa" if backend == "diffusers" else backend
        if "compile" in opts:
            from torch._dynamo.utils import counters
            counters.clear()  # graph breaks of this row only
        row, t0, phase = {}, time.perf_counter(), "build"
        left = budget.max_seconds - (t0 - budget.start)
        if math.isfinite(left):  # stop this row, not the table, when the budget runs out inside it
            signal.signal(signal.SIGALRM, _over_budget)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1.0))
        model = None
        try:
            if "data" in opts and data_path is None:
                phase = "writing JPEGs, building the VAE and text encoder"
                data_path = DataPath(args, cfg, hw, rt, workdir.name)
            phase = "build"
            model, params, optimizer, ema = build(cfg, opts, rt, args.seed, backend, hw)
            load_s, encode_s = [], []

            def step(i):
                gen = torch.Generator(device=dev).manual_seed(args.seed + i)
                inputs = synthetic
                if "data" in opts:
                    inputs, wait, enc = data_path.inputs(gen)
                    load_s.append(wait)
                    encode_s.append(enc)
                loss, _ = train.forward_backward(model, diffusion, [(inputs, N, gen)], accum=1)
                grad_norm = train.clip_gradients(params)
                train.optimizer_step(model, optimizer, ema)
                return loss.item(), grad_norm.item()  # the host sync train.py's logging does every step

            with record_backends() as used:  # which attention each call ran (compiled calls are not seen)
                for i in range(args.warmup):
                    phase = f"warm-up step {i + 1} of {args.warmup}" + (" (compiling)" if "compile" in opts else "")
                    t1 = time.perf_counter()
                    step(i)
                    if i == 0:
                        row["first step s"] = fmt(time.perf_counter() - t1)
            row["attention"] = ("diffusers' own" if backend == "diffusers" else
                                backend_summary(used) or "compiled: not recorded")
            row["setup s"] = fmt(time.perf_counter() - t0)
            if on_cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            times, loss = [], None
            load_s.clear(), encode_s.clear()
            for i in range(args.steps):
                phase = f"timed step {i + 1} of {args.steps}"
                t1 = time.perf_counter()
                loss, gnorm = step(args.warmup + i)  # ends with a sync: the host clock is the step time
                times.append(time.perf_counter() - t1)
            signal.setitimer(signal.ITIMER_REAL, 0)
            dt = statistics.median(times)
            row.update({"step ms": fmt(1000 * dt), "sets/s": fmt(B / dt), "images/s": fmt(B * N / dt),
                        "TFLOP/s": fmt(step_flops / dt / 1e12), "loss": fmt(loss)})
            if load_s:
                row.update({"load ms": fmt(1000 * statistics.median(load_s)),
                            "encode ms": fmt(1000 * statistics.median(encode_s))})
                row["note"] = f"{data_path.resolution} px JPEGs, {data_path.num_workers} loader workers"
            if peak:
                row["MFU"] = f"{100 * step_flops / dt / peak:.1f}%"
            if on_cuda:
                row["peak GiB"] = fmt(torch.cuda.max_memory_allocated(dev) / 2**30)
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                row["note"] = (row.get("note", "") + f"; non-finite loss {loss} / grad norm {gnorm}").lstrip("; ")
        except OverBudget:
            row = {"note": f"not finished in budget: stopped at {phase}, {time.perf_counter() - t0:.0f} s into the "
                           f"row, when --max-seconds {args.max_seconds:g} ran out", **row}
        except torch.OutOfMemoryError:
            row = {"note": f"out of memory at {B} sets of {N} (try --sets {max(1, B // 2)})"}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            del model
        if "compile" in opts:
            row["note"] = (row.get("note", "") + "; " + compile_note()).lstrip("; ")
        return row

    try:
        status = run_rows(args.variants, run_row, report, budget, on_cuda)
    finally:
        if data_path is not None:
            del data_path.loader  # its workers, before the folder goes
        workdir.cleanup()
        dist.destroy_process_group()
    print(report.text())
    return status


if __name__ == "__main__":
    sys.exit(main())
