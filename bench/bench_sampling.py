"""End-to-end JeDi sampling speed on one GPU: what `sample.py` does (rows "ours") against a diffusers-built
baseline, same weights, same sampling loop, same run and card.

    python bench/bench_sampling.py --out bench/results/<date>-<card>/bench_sampling.md --compile --cuda_graphs
    python bench/bench_sampling.py --tiny --out /tmp/s.md           # CPU rot check (numbers mean nothing)

What is timed: one call of `sample.generate` (the function the CLI calls) for one personalized set, 512x512
(64x64 latents), 4 images (1 reference + 3 generated), 50 DDIM steps with image guidance: the text encoder, the
VAE encode of the reference, 50 steps of ONE UNet call on 8 images (the set's conditional and null passes,
batched) with the replacement trick, and the VAE decode of the 3 new images. Random weights (timing does not
depend on them) in SD-1.4's sizes; dtype and every other sampling setting from sample.py's `sampling_settings`
(bf16 on CUDA, fp32 on CPU).

Rows (a variant is "+"-joined tokens: a backend, then options). Every row times the same `sample.generate`:
    ours                      the CLI exactly: the model bundle through `sample.prepare_model` (what
                              `sample.load_model` does after reading weights: cast once, NHWC on CUDA), then
                              `sample.generate`. Nothing added.
    ours+compile              `sample.py --compile` (torch.compile of the UNet, fullgraph, fixed shapes); its
                              "setup s" includes the compile (the warm-up a user waits for once per shape)
    ours+compile+cuda_graphs  `sample.py --compile reduce-overhead`: each step's UNet call replays a CUDA graph
                              (inductor's cudagraph trees). Not yet measured on a GPU when this was written.
    diffusers                 the baseline a diffusers user would build today: UNet2DConditionModel (SD-1.4 config,
                              in_channels 9) with an attn1 processor that regroups tokens across the set
                              (B·N, HW, C) -> (B, N·HW, C) and calls SDPA; loaded with OUR weights, eager, in the
                              same dtype; it replaces the UNet inside the same generate() call (same text encoder,
                              VAE and sampling loop), so the ratio is the UNet's.
    triton | sdpa             research rows: our UNet, unprepared (NCHW), attention backend (kernels.attention),
                              swapped into generate() like the baseline; options:
    +channels_last            weights and input in NHWC
    +cuda_graphs              the UNet call captured once with torch.cuda.CUDAGraph, replayed every step
    +compile                  torch.compile(unet), default mode
    +gn_fp32                  before/after row: GroupNorm32 with CompVis' fp32 round trip of the activations
Default rows: diffusers, ours (+ ours+compile with --compile, + ours+compile+cuda_graphs with both), then the
research rows of --backends with --channels_last/--cuda_graphs/--gn_fp32/--compile; --variants lists them explicitly.

--xl: the same rows for JeDi-XL: the SDXL base UNet (2.57B, head dim 64, label_emb) with JeDi's 9 input channels, the
SDXL text conditioner (CLIP ViT-L + OpenCLIP bigG, pooled vector, size features) and SDXL VAE (fp32 under bf16, its
own scale), 512x512 (64x64 latents: what JeDi-XL trains and samples at, config/jedi_sdxl.py), a set of 4, 30 steps by default. The diffusers row is diffusers' SDXL
UNet2DConditionModel (text_time input) with the same weights and the set-regrouping attn1 processor; it takes the
pooled text from our conditioning and embeds the six size numbers itself, as StableDiffusionXLPipeline does.
    python bench/bench_sampling.py --xl --out bench/results/<date>-<card>/bench_sampling_xl.md --compile

Numbers: "s/set" = median over --repeats calls (after --warmup calls) of generate() with --steps steps; with
--timed-steps T < steps the calls run T steps and T = 1 steps, and s/set = t(T) + (steps − T)·(t(T) − t(1))/(T − 1)
(every step is the same UNet call; the text encoder and VAE are paid once). "it/s" = steps / s/set. "UNet ms" = the
row's UNet callable alone (CUDA events over --unet-calls calls, median of 3). "TFLOP/s" = the UNet's model FLOPs per
call (flops.py) / UNet ms. "Δ vs ours" = mean |image − ours' image| in 8-bit levels, over the final images of
the same seed (ours = the eager "ours" row). "bf16 noise" = the same Δ between eager bf16 and fp32: a row with
non-finite images or Δ > 3 × bf16 noise + 1 level is FAILED, and its speed is not reported.
Exit status: 0, or 1 if a row failed, 2 without CUDA at full size, 130 if interrupted (rows so far are written).
"""
import argparse
import contextlib
import copy
import dataclasses
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

from kernels import backend_summary, record_backends  # noqa: E402
from e2e_common import (TINY_XL_TEXT, Budget, DiffusersJeDi, JointSelfAttnProcessor, Report,  # noqa: E402,F401
                        RowFailed, compile_note, diffusers_from_ours, diffusers_unet, first_line, fmt, header,
                        latent_hw, redraw_zero_layers, refuse_full_size_without_cuda, run_rows, unet_config,
                        use_dispatch_dir)
from model.diffusion import DEFAULT_GUIDANCE  # noqa: E402

BACKENDS = ("diffusers", "ours", "triton", "sdpa")
OPTIONS = ("channels_last", "cuda_graphs", "compile", "gn_fp32")
OURS = {"ours": None, "ours+compile": "default", "ours+compile+cuda_graphs": "reduce-overhead"}  # row -> --compile
NUM_REFS, NUM_NEW = 1, 3  # a set of 4: 1 reference + 3 generated
CONTEXT_LEN = 77


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="markdown report (also printed)")
    p.add_argument("--tiny", action="store_true", help="tiny UNet, 16x16 latents, 2 steps: runs on CPU (CI rot check)")
    p.add_argument("--xl", action="store_true", help="JeDi-XL rows: the SDXL base with JeDi's input, 512 px, 30 "
                   "steps, against diffusers' SDXL UNet with the same weights (see above)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps reported (default 50, --xl 30; tiny 2)")
    p.add_argument("--timed-steps", type=int, default=None,
                   help="steps actually run per timed loop, scaled to --steps (default: all of them)")
    p.add_argument("--repeats", type=int, default=None, help="timed loops per row, median reported (default 5; tiny 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed loops first (autotune, compile, cudnn picks)")
    p.add_argument("--unet-calls", type=int, default=None, help="UNet calls per UNet-only timing (default 10; tiny 2)")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--sampler", default="ddim", choices=["ddim", "dpmpp_2m"])
    p.add_argument("--backends", default=None,
                   help="research rows of our UNet (default triton,sdpa on CUDA, sdpa on CPU); the first gets the options")
    p.add_argument("--no-baseline", action="store_true", help="leave out the diffusers row")
    for opt in OPTIONS:
        p.add_argument(f"--{opt}", action="store_true", help=f"add row(s) with {opt} (see above)")
    p.add_argument("--variants", default=None, help="explicit comma-separated rows, e.g. diffusers,triton+cuda_graphs")
    p.add_argument("--max-seconds", type=float, default=float("inf"),
                   help="time budget: a row starts only if it should end inside it (judged by the longest row of its "
                        "kind so far, else ~20 s, ~60 s with compile); skipped rows are listed")
    p.add_argument("--dispatch-dir", default=None,
                   help="read the attention dispatch tables from here instead of kernels/dispatch/ (a sweep's output)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-args", action="store_true", help="parse, print the rows, exit (tests the suite's flags)")
    a = p.parse_args(argv)
    a.steps = a.steps or (2 if a.tiny else 30 if a.xl else 50)
    a.timed_steps = min(a.timed_steps or a.steps, a.steps)
    if a.timed_steps < min(2, a.steps):
        p.error("--timed-steps must be at least 2 (the per-step cost is the difference of a T- and a 1-step call)")
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
        if backend == "ours" and name.strip() not in OURS:
            raise SystemExit(f"bad variant {name!r}: ours rows are what sample.py can do: {', '.join(OURS)}")
        out.append(name.strip())
    return out


def default_variants(a):
    backends = (a.backends or ("triton,sdpa" if torch.cuda.is_available() else "sdpa")).split(",")
    main = backends[0]
    rows = ([] if a.no_baseline else ["diffusers"]) + ["ours"]
    if a.compile:
        rows += ["ours+compile"] + (["ours+compile+cuda_graphs"] if a.cuda_graphs else [])
    rows += backends
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
# Our UNet with the speed options
# ----------------------------------------------------------------------------------------------------------
class ChannelsLastInput(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context, set_size=1):
        return self.unet(x.contiguous(memory_format=torch.channels_last), t, context, set_size=set_size)


def _leaves(c) -> list:
    """The tensors of a conditioning value: a bare context, or a Cond's context and y (a registered pytree node)."""
    import torch.utils._pytree as pytree
    return [v for v in pytree.tree_leaves(c) if isinstance(v, torch.Tensor)]


def _tree(fn, c):
    import torch.utils._pytree as pytree
    return pytree.tree_map(lambda v: fn(v) if isinstance(v, torch.Tensor) else v, c)


def _shapes(c) -> list:
    return [v.shape for v in _leaves(c)]


class GraphedUNet:
    """One UNet call captured in a CUDA graph on static buffers; each call copies the inputs in and replays.
    The output buffer is reused by the next call: the sampling loop consumes it before calling again."""

    def __init__(self, fn, x, t, context, set_size, warmup=3):
        # The graph replays raw pointers: whatever it reads must outlive it. Holding `fn` keeps the module and its
        # weights alive (2026-11-27, H200: without it the row's deep-copied model was freed after build(), its
        # memory reused, and replays computed garbage: Δ ≈ 1, NaN samples with compile).
        self.fn, self.set_size = fn, set_size
        self.x, self.t, self.context = x.clone(), t.clone(), _tree(torch.clone, context)
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
        if (x.shape, t.shape, _shapes(context), set_size) != (self.x.shape, self.t.shape, _shapes(self.context),
                                                              self.set_size):
            raise ValueError("GraphedUNet: the shapes changed since the capture")
        self.x.copy_(x)
        self.t.copy_(t)
        for dst, src in zip(_leaves(self.context), _leaves(context)):  # the context, and SDXL's y
            dst.copy_(src)
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


def images_delta(a, b) -> float:
    """Mean |a − b| in 8-bit levels over two generate() results (lists of sets of PIL images)."""
    import numpy as np

    arr = lambda sets: np.stack([np.asarray(im, np.float64) for images in sets for im in images])  # noqa: E731
    return float(np.abs(arr(a) - arr(b)).mean())


def main(argv=None):
    args = parse_args(argv)
    if args.check_args:
        print("rows:", ", ".join(args.variants))
        return 0
    refuse_full_size_without_cuda("bench_sampling", args.tiny)

    import sample
    from flops import unet_flops
    from model.diffusion import jedi_input
    from model.loading import JeDi
    from model.conditioner import TextConditioner, as_text_conditioner, sdxl_text_config
    from model.conditioning import Cond
    from model.flavours import FLAVOURS
    from model.text import build_text_encoder, sd14_text_config
    from model.unet import UNet
    from model.vae import AutoencoderKL, VAEConfig

    on_cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if on_cuda else "cpu")
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions, for every row
    cfg = unet_config(args.tiny, args.xl)
    hw = latent_hw(args.tiny, args.xl)
    N = NUM_REFS + NUM_NEW
    # every sampling setting as sample.py resolves it for a checkpoint without defaults of its own
    settings = sample.sampling_settings({}, dev, steps=args.timed_steps, guidance=args.guidance, sampler=args.sampler)
    dtype = sample.DTYPES[settings["dtype"]]
    flops_call = unet_flops(cfg, hw, N, num_sets=2).forward  # the cond + null passes: 2 sets of N in one call

    title = (f"{'JeDi-XL (SDXL base)' if args.xl else 'JeDi'} sampling speed, sample.generate end to end: "
             f"{'TINY model (CPU rot check, numbers mean nothing), ' if args.tiny else ''}"
             f"latents {hw}x{hw}, sets of {N} ({NUM_REFS} reference + {NUM_NEW} generated), {args.steps} "
             f"{settings['sampler']} steps, image guidance {args.guidance}, {settings['dtype']}")
    timed = (f"{args.timed_steps}- and 1-step calls timed, extrapolated to {args.steps} steps"
             if args.timed_steps != args.steps else f"all {args.steps} steps timed")
    notes = ["", f"- one UNet call = {2 * N} images (cond + null pass of the set): {flops_call / 1e12:.3g} TFLOP "
                 f"(flops.py); s/set: median of {args.repeats} generate() calls after {args.warmup} warm-up, "
                 f"{timed}, text encoder and VAE included; UNet ms: {args.unet_calls} calls × 3 rounds; "
                 f"cudnn.benchmark on; random weights, identical in every row (the baseline's are converted from ours)"
                 + ("; SDXL text conditioner (CLIP-L + bigG, pooled) and VAE (fp32 under bf16: SDXL's overflows "
                    "fp16), size conditioning original = target = the image, crop 0" if args.xl else ""),
             "- × baseline = diffusers s/set ÷ row s/set; Δ vs ours = mean |image − ours eager image| in 8-bit levels, "
             "same seed; peak GiB = max allocated during the row, the shared weights included"]
    notes.append(use_dispatch_dir(args.dispatch_dir))
    if not on_cuda:
        notes.append("- no CUDA: Triton rows, CUDA graphs and memory figures are CUDA-only (rows say so)")
    columns = ["variant", "s/set", "it/s", "UNet ms", "UNet TFLOP/s", "× baseline", "Δ vs ours", "peak GiB",
               "setup s", "attention", "note"]
    report = Report(args.out, header(title) + notes, columns)

    # One set of random weights and inputs for every row: SD-1.4 or SDXL sizes (tiny: the tests' sizes).
    torch.manual_seed(args.seed)
    text_cfg = (sd14_text_config(hidden_size=cfg.context_dim, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32) if args.tiny else sd14_text_config())
    vae_cfg = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1) if args.tiny else VAEConfig()
    if args.xl:  # SDXL's VAE: the SD architecture, its own scale, kept fp32 under fp16 (the flavour's facts)
        fl = FLAVOURS["sdxl"]
        vae_cfg = dataclasses.replace(vae_cfg, scale_factor=fl.vae_scale, force_upcast=fl.vae_force_upcast)
    resolution = hw * 2 ** (len(vae_cfg.ch_mult) - 1)
    try:
        with torch.device(dev):
            base = redraw_zero_layers(UNet(cfg)).eval().requires_grad_(False)
            vae = AutoencoderKL(vae_cfg).eval().requires_grad_(False)
            if args.xl:  # two encoders, penultimate states, bigG's pooled vector (builds sample.py's tokenizers)
                text = TextConditioner(sdxl_text_config(**(TINY_XL_TEXT if args.tiny else {}),
                                                        resolution=resolution)).eval().requires_grad_(False)
            else:
                text = as_text_conditioner(build_text_encoder(text_cfg).eval().requires_grad_(False))
    except ImportError as e:  # the GPU image lacks open_clip_torch / ftfy: bench/README.md says how to carry them
        print(f"bench_sampling: error: sample.py's tokenizer does not import ({first_line(e)}); carry the wheels "
              f"of open_clip_torch, ftfy and wcwidth in bench/wheels/ (bench/README.md)", file=sys.stderr)
        return 2
    decoded_finite = []  # generate() returns 8-bit images: NaNs are seen where the VAE decoder outputs them
    vae.decoder.register_forward_hook(lambda m, i, out: decoded_finite.append(bool(torch.isfinite(out).all())))

    def bundle(unet):
        """The model bundle sample.load_model would return for a checkpoint with these weights (before prepare)."""
        return JeDi(unet, vae, text, dict(resolution=resolution, diffusion={}, space="latent"))

    shared = bundle(base).to(dev, dtype)  # text encoder, VAE and the research rows' UNet: cast once
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    ref_image = torch.rand(3, resolution, resolution, generator=g) * 2 - 1
    prompts = [f"a photo of a dog, view {i}" for i in range(NUM_NEW)]
    context = torch.randn(N, CONTEXT_LEN, cfg.context_dim, generator=g).to(dev, dtype)
    null = torch.randn(1, CONTEXT_LEN, cfg.context_dim, generator=g).to(dev, dtype)
    if cfg.adm_in_channels is not None:  # SDXL: the vector conditioning y beside the context
        context = Cond(context, torch.randn(N, cfg.adm_in_channels, generator=g).to(dev, dtype))
        null = Cond(null, torch.randn(1, cfg.adm_in_channels, generator=g).to(dev, dtype))
    both = Cond.cat([context, null.expand(N)]) if args.xl else torch.cat([context, null.expand_as(context)])
    # one UNet call's input, as personalize builds it (for the UNet-only timing)
    x_t = torch.randn(N, cfg.out_channels, hw, hw, generator=g).to(dev, dtype)
    ref_lat = torch.randn(NUM_REFS, cfg.out_channels, hw, hw, generator=g).to(dev, dtype)
    mask = torch.tensor([1.0] * NUM_REFS + [0.0] * NUM_NEW, device=dev)
    ref_full = torch.cat([ref_lat, torch.zeros(NUM_NEW, *ref_lat.shape[1:], device=dev, dtype=dtype)])
    unet_in = (torch.cat([jedi_input(x_t, ref_full, mask), jedi_input(x_t, torch.zeros_like(ref_full), mask)]),
               torch.full((2 * N,), 981, device=dev, dtype=torch.long), both, N)

    def generate(model, steps):
        """The user's call: sample.generate with sample.py's resolved settings, nothing added."""
        return sample.generate(model, [ref_image], prompts, ref_prompt="a photo of a dog", seed=args.seed,
                               **{**settings, "steps": steps})

    def build(variant):
        """-> the row's model bundle. ours: what sample.load_model makes of the weights; the others swap the
        row's UNet callable into the shared bundle."""
        backend, *opts = variant.split("+")
        if backend == "ours":
            return sample.prepare_model(bundle(copy.deepcopy(base)), dev, dtype=settings["dtype"],
                                        compile=OURS[variant])
        model = bundle(base)
        if backend == "diffusers":
            model.unet_fn = diffusers_from_ours(base, hw, **({"image_size": resolution} if args.xl else {}))
            return model
        m = copy.deepcopy(base)
        fn = m
        if "channels_last" in opts:
            fn = ChannelsLastInput(m.to(memory_format=torch.channels_last))
        if "compile" in opts:
            fn = torch.compile(fn)
        if "cuda_graphs" in opts:
            fn = GraphedUNet(fn, *unet_in[:3], set_size=N)
        model.unet_fn = fn
        return model

    with torch.no_grad():  # the Δ reference (ours, eager) and the bf16 noise scale (the same in fp32)
        ours_images = generate(build("ours"), args.timed_steps)
        fp32 = sample.prepare_model(JeDi(copy.deepcopy(base).float(), copy.deepcopy(vae).float(),
                                         copy.deepcopy(text).float(), shared.meta), dev, dtype="fp32")
        noise = images_delta(generate(fp32, args.timed_steps), ours_images)
        del fp32
    bound = 3 * noise + 1.0
    report.lines.append(f"- bf16 noise: Δ(eager {settings['dtype']}, eager fp32) = {noise:.2f} levels; a row beyond "
                        f"{bound:.2f} levels, or with non-finite images, is FAILED and its speed not shown")

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
            if backend in ("triton", "sdpa"):
                stack.enter_context(attention_backend(backend))
            if "gn_fp32" in opts:
                stack.enter_context(fp32_groupnorm())
            if on_cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            if "compile" in opts:
                from torch._dynamo.utils import counters
                counters.clear()  # graph breaks of this row only
            t0 = time.perf_counter()
            model = build(variant)
            with record_backends() as used:  # which attention each call ran (compiled calls are not seen)
                for _ in range(args.warmup):
                    generate(model, args.timed_steps)
                    if args.timed_steps < args.steps:
                        generate(model, 1)  # the extrapolation's 1-step calls
            sync(dev)
            row["setup s"] = fmt(time.perf_counter() - t0)
            row["attention"] = ("diffusers' own" if backend == "diffusers" else
                                backend_summary(used) or "compiled: not recorded")

            def timed_call(steps):
                sync(dev)
                t0 = time.perf_counter()
                out = generate(model, steps)
                sync(dev)
                return time.perf_counter() - t0, out

            decoded_finite.clear()
            runs = [timed_call(args.timed_steps) for _ in range(args.repeats)]
            t_T, images = statistics.median(t for t, _ in runs), runs[-1][1]
            s_set = t_T
            if args.timed_steps < args.steps:
                t_1 = statistics.median(timed_call(1)[0] for _ in range(args.repeats))
                s_set = t_T + (args.steps - args.timed_steps) * (t_T - t_1) / max(args.timed_steps - 1, 1)
            ms = unet_ms(model.unet_fn, unet_in, args.unet_calls, dev)
            delta = images_delta(images, ours_images)
            row.update({"s/set": fmt(s_set), "it/s": fmt(args.steps / s_set), "UNet ms": fmt(ms),
                        "UNet TFLOP/s": fmt(flops_call / (ms / 1000) / 1e12), "Δ vs ours": f"{delta:.2f}",
                        "_s_set": s_set})
            if on_cuda:
                row["peak GiB"] = fmt(torch.cuda.max_memory_allocated(dev) / 2**30)
            failed = "non-finite images" if not all(decoded_finite) else (
                f"Δ {delta:.2f} > {bound:.2f} levels" if delta > bound else None)
            if failed:  # a wrong answer has no speed
                for k in ("s/set", "it/s", "UNet ms", "UNet TFLOP/s", "_s_set"):
                    row.pop(k)
                row["note"] = f"FAILED: {failed}"
            if "compile" in opts:
                row["note"] = (row.get("note", "") + " " + compile_note()).strip()
            del model
        if failed:
            raise RowFailed(row)
        return row

    # guesses for an H100/H200 at full size (H200 2026-11-27: a compile row's set-up took 40-50 s)
    budget = Budget(args.max_seconds, guess=20, compile_guess=60)
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
