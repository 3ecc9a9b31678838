"""End-to-end JeDi sampling speed on one GPU: ours (Triton / SDPA attention, speed options) against a diffusers-built
baseline, same weights, same sampling loop, same run and card.

    python bench/bench_sampling.py --out bench/results/<date>-<card>/bench_sampling.md \
        --channels_last --cuda_graphs --compile                     # every row; see bench/README.md
    python bench/bench_sampling.py --tiny --out /tmp/s.md           # CPU rot check (numbers mean nothing)

What is timed: one personalized set, 512x512 (64x64 latents), 4 images (1 reference + 3 generated), 50 DDIM steps
with image guidance: `model.diffusion.personalize`, whose every step is ONE UNet call on 8 images (the conditional
and the null pass of the set, batched) plus the replacement trick and the DDIM update. Random weights (timing
does not depend on them), bf16. VAE and text encoder are excluded: the loop starts from latents and text states.

Rows (a variant is "+"-joined tokens: a backend, then options):
    diffusers                 the baseline a diffusers user would build today: UNet2DConditionModel (SD-1.4 config,
                              in_channels 9) with an attn1 processor that regroups tokens across the set
                              (B·N, HW, C) -> (B, N·HW, C) and calls SDPA; loaded with OUR weights, so every row
                              computes the same function (column "Δ vs ours").
    triton | sdpa             our UNet, eager, attention backend (kernels.attention, JEDI_ATTN)
    +channels_last            weights and input in NHWC (the permutes around attention become views)
    +cuda_graphs              the UNet call captured once with torch.cuda.CUDAGraph, replayed every step
    +compile                  torch.compile(unet), default mode
    +gn_fp32                  before/after row, not a model option: GroupNorm32 with CompVis' fp32 round trip
                              of the activations (ours normalises in the input dtype since 2026-11-27)
Flags --channels_last/--cuda_graphs/--gn_fp32 add one row each on top of the first backend; with --compile also
the combination channels_last+cuda_graphs+compile and compile alone; --variants gives the list explicitly.

Numbers: "s/set" = median over --repeats runs of the loop (after --warmup runs) × steps/timed_steps: with
--timed-steps T < 50 the loop runs T steps (every DDIM step costs the same: one UNet call on the same shapes) and
is scaled to 50. "it/s" = steps per second of that loop (the diffusers pipelines' it/s). "UNet ms" = one UNet
call alone (CUDA events over --unet-calls calls, median of 3), so s/set − 50 × UNet ms is the loop's own overhead.
"TFLOP/s" = the UNet's model FLOPs per call (bench/flops.py) / UNet ms. "Δ vs ours" = max|out − ours| / max|ours|
for one UNet call, ours = the sdpa row's eager model in the same dtype. cudnn.benchmark is on for every row.
Exit status: 0, or 1 if a row failed, 2 without CUDA at full size, 130 if interrupted (rows so far are written).
"""
import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from e2e_common import (FULL_HW, TINY_HW, Budget, Report, compile_note, first_line, fmt, header,  # noqa: E402
                        redraw_zero_layers, refuse_full_size_without_cuda, run_rows, unet_config)

BACKENDS = ("diffusers", "triton", "sdpa")
OPTIONS = ("channels_last", "cuda_graphs", "compile", "gn_fp32")
NUM_REFS, NUM_NEW = 1, 3  # a set of 4: 1 reference + 3 generated
CONTEXT_LEN = 77


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="markdown report (also printed)")
    p.add_argument("--tiny", action="store_true", help="tiny UNet, 16x16 latents, 2 steps: runs on CPU (CI rot check)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps reported (default 50; tiny 2)")
    p.add_argument("--timed-steps", type=int, default=None,
                   help="steps actually run per timed loop, scaled to --steps (default: all of them)")
    p.add_argument("--repeats", type=int, default=None, help="timed loops per row, median reported (default 5; tiny 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed loops first (autotune, compile, cudnn picks)")
    p.add_argument("--unet-calls", type=int, default=None, help="UNet calls per UNet-only timing (default 10; tiny 2)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--backends", default=None,
                   help="plain rows of our UNet (default triton,sdpa on CUDA, sdpa on CPU); the first gets the options")
    p.add_argument("--no-baseline", action="store_true", help="leave out the diffusers row")
    for opt in OPTIONS:
        p.add_argument(f"--{opt}", action="store_true", help=f"add row(s) with {opt} (see above)")
    p.add_argument("--variants", default=None, help="explicit comma-separated rows, e.g. diffusers,triton+cuda_graphs")
    p.add_argument("--max-seconds", type=float, default=float("inf"),
                   help="time budget: a row starts only if it should end inside it (judged by the longest row of its "
                        "kind so far, else ~15 s, ~100 s with compile); skipped rows are listed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-args", action="store_true", help="parse, print the rows, exit (tests the suite's flags)")
    a = p.parse_args(argv)
    a.steps = a.steps or (2 if a.tiny else 50)
    a.timed_steps = min(a.timed_steps or a.steps, a.steps)
    a.repeats = a.repeats or (1 if a.tiny else 5)
    a.unet_calls = a.unet_calls or (2 if a.tiny else 10)
    a.variants = parse_variants(a.variants.split(",")) if a.variants else default_variants(a)
    return a


def parse_variants(names):
    out = []
    for name in names:
        backend, *opts = name.strip().split("+")
        bad = [o for o in opts if o not in OPTIONS]
        if backend not in BACKENDS or bad or len(set(opts)) != len(opts):
            raise SystemExit(f"bad variant {name!r}: a backend of {BACKENDS} then options of {OPTIONS}, '+'-joined")
        if backend == "diffusers" and opts:
            raise SystemExit(f"bad variant {name!r}: the diffusers baseline takes no options (it is eager)")
        out.append(name.strip())
    return out


def default_variants(a):
    backends = (a.backends or ("triton,sdpa" if torch.cuda.is_available() else "sdpa")).split(",")
    main = backends[0]
    rows = ([] if a.no_baseline else ["diffusers"]) + backends
    rows += [f"{main}+{o}" for o in ("channels_last", "cuda_graphs", "gn_fp32") if getattr(a, o)]
    cheap = [o for o in ("channels_last", "cuda_graphs") if getattr(a, o)]
    if len(cheap) == 2:
        rows.append(f"{main}+channels_last+cuda_graphs")
    if a.compile:  # compile rows last: the most expensive to set up; the combination first (the best number)
        rows.append("+".join([main, *cheap, "compile"]))
        if cheap:
            rows.append(f"{main}+compile")
    return parse_variants(rows)


# ----------------------------------------------------------------------------------------------------------
# The diffusers baseline
# ----------------------------------------------------------------------------------------------------------
def diffusers_unet(cfg, sample_size):
    """UNet2DConditionModel with the same architecture as our UNetConfig (SD-1.4's by default), on meta."""
    from diffusers import UNet2DConditionModel

    L = len(cfg.channel_mult)
    attn = [2 ** i in cfg.attention_resolutions for i in range(L)]
    with torch.device("meta"):  # weights come from ours (load_state_dict(assign=True)): skip diffusers' own init
        return UNet2DConditionModel(
            sample_size=sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
            layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
            attention_head_dim=cfg.num_heads)  # diffusers' misnomer: this is the number of heads for SD-1.x


class JointSelfAttnProcessor:
    """JeDi's coupled self-attention as a diffusers attention processor, for every `attn1`: the N images of a set
    attend to each other's tokens. The same SDPA call as diffusers' AttnProcessor2_0, on regrouped tokens."""

    def __init__(self):
        self.set_size = 1  # set before each UNet call (cross_attention_kwargs would reach every processor)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("JointSelfAttnProcessor is for self-attention (attn1) without a mask")
        BN, L, C = hidden_states.shape
        N = self.set_size
        x = hidden_states.reshape(BN // N, N * L, C)  # (B·N, HW, C) -> (B, N·HW, C): images of a set consecutive
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        B, heads = x.shape[0], attn.heads
        d = k.shape[-1] // heads
        q, k, v = (t.view(B, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, H, N·HW, d)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(B, -1, heads * d)
        out = attn.to_out[1](attn.to_out[0](out))  # linear, dropout
        return out.reshape(BN, L, -1)  # back to per image


class DiffusersJeDi(nn.Module):
    """Our UNet's call signature on top of diffusers' UNet, so the same sampling loop drives both."""

    def __init__(self, unet):
        super().__init__()
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.unet, self.joint = unet, JointSelfAttnProcessor()
        unet.set_attn_processor({name: self.joint if name.endswith("attn1.processor") else AttnProcessor2_0()
                                 for name in unet.attn_processors})

    def forward(self, x, t, context, set_size=1):
        self.joint.set_size = set_size
        return self.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]


def diffusers_from_ours(ours, sample_size):
    """The baseline with our weights (diffusers' own SD converter), in our dtype and device."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    net = diffusers_unet(ours.config, sample_size)
    ldm = {"model.diffusion_model." + k: v.detach().clone() for k, v in ours.state_dict().items()}
    net.load_state_dict(convert_ldm_unet_checkpoint(ldm, dict(net.config)), strict=True, assign=True)
    left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"diffusers UNet: not loaded from our weights: {left[:3]}")
    return DiffusersJeDi(net.eval().requires_grad_(False))


# ----------------------------------------------------------------------------------------------------------
# Our UNet with the speed options
# ----------------------------------------------------------------------------------------------------------
class ChannelsLastInput(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context, set_size=1):
        return self.unet(x.contiguous(memory_format=torch.channels_last), t, context, set_size=set_size)


class GraphedUNet:
    """One UNet call captured in a CUDA graph on static buffers; each call copies the inputs in and replays.
    The output buffer is reused by the next call: the sampling loop consumes it before calling again."""

    def __init__(self, fn, x, t, context, set_size, warmup=3):
        # The graph replays raw pointers: whatever it reads must outlive it. Holding `fn` keeps the module and its
        # weights alive (2026-11-27, H200: without it the row's deep-copied model was freed after build(), its
        # memory reused, and replays computed garbage: Δ ≈ 1, NaN samples with compile).
        self.fn, self.set_size = fn, set_size
        self.x, self.t, self.context = x.clone(), t.clone(), context.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # autotuning, compilation and cuBLAS/cuDNN set-up happen outside the capture
            for _ in range(warmup):
                fn(self.x, self.t, self.context, set_size=set_size)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(self.x, self.t, self.context, set_size=set_size)

    def __call__(self, x, t, context, set_size=1):
        if (x.shape, t.shape, context.shape, set_size) != (self.x.shape, self.t.shape, self.context.shape,
                                                          self.set_size):
            raise ValueError("GraphedUNet: the shapes changed since the capture")
        self.x.copy_(x)
        self.t.copy_(t)
        self.context.copy_(context)
        self.graph.replay()
        return self.out


@contextlib.contextmanager
def fp32_groupnorm():
    """The CompVis GroupNorm (before 2026-11-27 also ours): upcast x to fp32, normalise, cast back -- two extra
    passes over every activation. A "before" row for that change; Δ vs ours says what it did to the output."""
    from model.unet import GroupNorm32

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)

    saved = GroupNorm32.forward
    GroupNorm32.forward = forward
    try:
        yield
    finally:
        GroupNorm32.forward = saved


@contextlib.contextmanager
def attention_backend(name):
    saved = os.environ.get("JEDI_ATTN")
    os.environ["JEDI_ATTN"] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("JEDI_ATTN", None)
        else:
            os.environ["JEDI_ATTN"] = saved


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------
def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def unet_ms(fn, inputs, calls, dev):
    """Median over 3 rounds of the mean time of `calls` back-to-back UNet calls (CUDA events; host clock on CPU)."""
    x, t, c, n = inputs
    rounds = []
    for _ in range(3):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn(x, t, c, set_size=n)
            end.record()
            end.synchronize()
            rounds.append(start.elapsed_time(end) / calls)
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(x, t, c, set_size=n)
            rounds.append(1000 * (time.perf_counter() - t0) / calls)
    return statistics.median(rounds)


def rel_diff(a, ref):
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def main(argv=None):
    args = parse_args(argv)
    if args.check_args:
        print("rows:", ", ".join(args.variants))
        return 0
    refuse_full_size_without_cuda("bench_sampling", args.tiny)

    from flops import unet_flops
    from model.diffusion import Diffusion, jedi_input, personalize
    from model.unet import UNet

    on_cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if on_cuda else "cpu")
    dtype = torch.bfloat16 if on_cuda else torch.float32  # bf16 on CPU is slow and not what anyone runs
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions, for every row
    cfg = unet_config(args.tiny)
    hw = TINY_HW if args.tiny else FULL_HW
    N = NUM_REFS + NUM_NEW
    flops_call = unet_flops(cfg, hw, N, num_sets=2).forward  # the cond + null passes: 2 sets of N in one call

    title = (f"JeDi sampling speed: {'TINY UNet (CPU rot check, numbers mean nothing), ' if args.tiny else ''}"
             f"{hw * 8}x{hw * 8} ({hw}x{hw} latents), sets of {N} ({NUM_REFS} reference + {NUM_NEW} generated), "
             f"{args.steps} DDIM steps, image guidance {args.guidance}, {str(dtype).removeprefix('torch.')}")
    timed = (f"{args.timed_steps} of the {args.steps} steps timed per loop, scaled ×{args.steps / args.timed_steps:g}"
             if args.timed_steps != args.steps else f"all {args.steps} steps timed")
    notes = ["", f"- one UNet call = {2 * N} images (cond + null pass of the set): {flops_call / 1e12:.3g} TFLOP "
                 f"(bench/flops.py); s/set: median of {args.repeats} loops after {args.warmup} warm-up, {timed}; "
                 f"UNet ms: {args.unet_calls} calls × 3 rounds; cudnn.benchmark on; random weights, identical in "
                 f"every row (the baseline's are converted from ours)",
             "- × baseline = diffusers s/set ÷ row s/set; Δ vs ours = max|out − ours sdpa eager| / max|ours| "
             "on one UNet call; peak GiB = max allocated during the row, the shared weights included"]
    if not on_cuda:
        notes.append("- no CUDA: Triton rows, CUDA graphs and memory figures are CUDA-only (rows say so)")
    columns = ["variant", "s/set", "it/s", "UNet ms", "UNet TFLOP/s", "× baseline", "Δ vs ours", "peak GiB",
               "setup s", "note"]
    report = Report(args.out, header(title) + notes, columns)

    # One set of random weights and inputs for every row.
    torch.manual_seed(args.seed)
    with torch.device(dev):
        base = redraw_zero_layers(UNet(cfg))
    base = base.to(dtype).eval().requires_grad_(False)
    g = torch.Generator(device=dev).manual_seed(args.seed)
    refs = torch.randn(NUM_REFS, cfg.out_channels, hw, hw, device=dev, generator=g, dtype=dtype)
    context = torch.randn(N, CONTEXT_LEN, cfg.context_dim, device=dev, generator=g, dtype=dtype)
    null = torch.randn(1, CONTEXT_LEN, cfg.context_dim, device=dev, generator=g, dtype=dtype)
    diffusion = Diffusion()
    # the first step's UNet input, as personalize builds it (for the UNet-only timing and the Δ column)
    x_t = torch.randn(N, cfg.out_channels, hw, hw, device=dev, generator=g, dtype=dtype)
    mask = torch.tensor([1.0] * NUM_REFS + [0.0] * NUM_NEW, device=dev)
    ref_full = torch.cat([refs, torch.zeros(NUM_NEW, *refs.shape[1:], device=dev, dtype=dtype)])
    unet_in = (torch.cat([jedi_input(x_t, ref_full, mask), jedi_input(x_t, torch.zeros_like(ref_full), mask)]),
               torch.full((2 * N,), 981, device=dev, dtype=torch.long), torch.cat([context, null.expand_as(context)]),
               N)
    with torch.no_grad(), attention_backend("sdpa"):
        ours_out = base(*unet_in[:3], set_size=N).clone()

    def sample_once(fn, steps, seed):
        gen = torch.Generator(device=dev).manual_seed(seed)
        return personalize(fn, diffusion, refs=refs, context=context, null_context=null, num_new=NUM_NEW,
                           steps=steps, guidance=args.guidance, generator=gen)

    def build(variant):
        """-> the UNet callable of this row: a copy of the weights with the row's options applied."""
        backend, *opts = variant.split("+")
        if backend == "diffusers":
            return diffusers_from_ours(base, hw)
        m = copy.deepcopy(base)
        fn = m
        if "channels_last" in opts:
            fn = ChannelsLastInput(m.to(memory_format=torch.channels_last))
        if "compile" in opts:
            fn = torch.compile(fn)
        if "cuda_graphs" in opts:
            fn = GraphedUNet(fn, *unet_in[:3], set_size=N)
        return fn

    def run_row(variant):
        backend, *opts = variant.split("+")
        if not on_cuda and (backend == "triton" or "cuda_graphs" in opts):
            return {"note": "skipped: needs CUDA"}
        if backend == "diffusers":
            try:
                from diffusers import UNet2DConditionModel  # noqa: F401
            except Exception as e:  # noqa: BLE001
                return {"note": f"skipped: diffusers not importable ({first_line(e)}); see bench/README.md"}
        row = {}
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if backend != "diffusers":
                stack.enter_context(attention_backend(backend))
            if "gn_fp32" in opts:
                stack.enter_context(fp32_groupnorm())
            if on_cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            if "compile" in opts:
                from torch._dynamo.utils import counters
                counters.clear()  # graph breaks of this row only
            t0 = time.perf_counter()
            fn = build(variant)
            for i in range(args.warmup):
                sample_once(fn, args.timed_steps, args.seed + i)
            sync(dev)
            row["setup s"] = fmt(time.perf_counter() - t0)
            times = []
            for i in range(args.repeats):
                sync(dev)
                t0 = time.perf_counter()
                out = sample_once(fn, args.timed_steps, args.seed + 1000 + i)
                sync(dev)
                times.append(time.perf_counter() - t0)
            s_set = statistics.median(times) * args.steps / args.timed_steps
            ms = unet_ms(fn, unet_in, args.unet_calls, dev)
            delta = rel_diff(fn(*unet_in[:3], set_size=N), ours_out)
            row.update({"s/set": fmt(s_set), "it/s": fmt(args.steps / s_set), "UNet ms": fmt(ms),
                        "UNet TFLOP/s": fmt(flops_call / (ms / 1000) / 1e12), "Δ vs ours": f"{delta:.1e}",
                        "_s_set": s_set})
            if on_cuda:
                row["peak GiB"] = fmt(torch.cuda.max_memory_allocated(dev) / 2**30)
            if not torch.isfinite(out).all():
                row["note"] = "non-finite samples"
            if "compile" in opts:
                row["note"] = (row.get("note", "") + " " + compile_note()).strip()
            del fn
        return row

    budget = Budget(args.max_seconds, guess=15, compile_guess=100)  # guesses for an H100, full size
    baseline = {}

    def speedup(variant, row):  # every row against the diffusers baseline (the first row)
        if variant == "diffusers" and "_s_set" in row:
            baseline["s"] = row["_s_set"]
        if baseline and "_s_set" in row:
            row["× baseline"] = f"{baseline['s'] / row['_s_set']:.2f}×"

    status = run_rows(args.variants, run_row, report, budget, on_cuda, after_row=speedup)
    print(report.text())
    return status


if __name__ == "__main__":
    sys.exit(main())
