"""Where one sampling UNet call spends its time: ours against the diffusers baseline, kernel by kernel.

    python bench/profile_unet.py --out OUTDIR/profile_unet.md          # CUDA, full size (SD-1.4 UNet, 512 px)
    python bench/profile_unet.py --tiny                                 # CPU rot check

The call is bench_sampling's: 8 images (the cond + null passes of a set of 4), 64x64 latents, bf16, random weights.
Per variant: wall ms per call (bench_sampling's unet_ms: CUDA events over back-to-back calls, median of 3
rounds), GPU-busy ms per call (the sum of its kernels' times from torch.profiler; on CPU the aten ops' own times),
kernel launches (CPU: ops) per call, and the top kernels by time. wall >> busy means the call is bound by the CPU
launching kernels (CUDA graphs fix that); busy says what the kernels themselves cost.
Also checks that a CUDA-graph replay of the UNet reproduces the eager output, per attention backend.
"""
import argparse
import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from bench_sampling import GraphedUNet, attention_backend, diffusers_from_ours, rel_diff, unet_ms  # noqa: E402
from e2e_common import FULL_HW, TINY_HW, header, redraw_zero_layers, refuse_full_size_without_cuda, unet_config  # noqa: E402


def profile(fn, inputs, calls, dev):
    """-> (wall ms per call, busy ms per call, launches per call, [(kernel, ms per call)])."""
    x, t, c, n = inputs
    for _ in range(3):
        fn(x, t, c, set_size=n)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(calls):
            fn(x, t, c, set_size=n)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    per = collections.Counter()
    launches = 0
    for e in prof.events():
        if dev.type == "cuda" and e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name] += e.device_time / 1000 / calls
            launches += 1
        elif dev.type == "cpu" and e.name.startswith("aten::"):  # CPU: ops' own time stands in for kernels
            per[e.name] += e.self_cpu_time_total / 1000 / calls
            launches += 1
    wall = unet_ms(fn, inputs, calls, dev)  # without the profiler's overhead: bench_sampling's timing
    return wall, sum(per.values()), launches / calls, per.most_common(12)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--variants", default="diffusers,sdpa,triton")
    a = p.parse_args()
    refuse_full_size_without_cuda("profile_unet", a.tiny)
    from model.diffusion import jedi_input
    from model.unet import UNet

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.backends.cudnn.benchmark = True
    cfg, hw, N = unet_config(a.tiny), (TINY_HW if a.tiny else FULL_HW), 4
    torch.manual_seed(0)
    with torch.device(dev):
        base = redraw_zero_layers(UNet(cfg)).to(dtype).eval().requires_grad_(False)
        x = torch.randn(N, cfg.out_channels, hw, hw, dtype=dtype)
        ref = torch.randn(N, cfg.out_channels, hw, hw, dtype=dtype)
        mask = torch.tensor([1.0, 0, 0, 0])
        inp = torch.cat([jedi_input(x, ref, mask), jedi_input(x, torch.zeros_like(ref), mask)])  # (2N, 9, hw, hw)
        ctx = torch.randn(2 * N, 77, cfg.context_dim, dtype=dtype)
        inputs = (inp, torch.full((2 * N,), 981), ctx, N)
    lines = header("UNet call profile: ours vs the diffusers baseline") + [
        "", f"- one call: {2 * N} images, {hw}x{hw} latents, {str(dtype).removeprefix('torch.')}; "
            f"ms per call over {a.calls} calls after 3 warm-up", ""]
    summary = ["| variant | wall ms | GPU-busy ms | launches | CUDA-graph replay Δ vs eager |", "|---|---|---|---|---|"]
    details = []
    with torch.no_grad():
        with attention_backend("sdpa"):
            eager_ref = base(*inputs[:3], set_size=N).clone()
        for variant in a.variants.split(","):
            if variant == "diffusers":
                fn, ctxm = diffusers_from_ours(base, hw), attention_backend("sdpa")
            else:
                fn, ctxm = base, attention_backend(variant)
            with ctxm:
                wall, busy, launches, top = profile(fn, inputs, a.calls, dev)
                graph_note = ""
                if dev.type == "cuda":
                    eager = fn(*inputs[:3], set_size=N).clone()
                    graphed = GraphedUNet(fn, *inputs[:3], set_size=N)
                    first = rel_diff(graphed(*inputs[:3], set_size=N), eager)
                    # bench_sampling saw Δ ≈ 1 for graph rows after its sampling loop, while a replay right after
                    # the capture matched: disturb as that loop does (other inputs through the graph, eager work,
                    # allocator churn), then replay the captured inputs again.
                    for _ in range(3):
                        graphed(torch.randn_like(inputs[0]), inputs[1], inputs[2], set_size=N)
                    fn(torch.randn_like(inputs[0]), *inputs[1:3], set_size=N)
                    graphed.x.new_empty(256 << 20).normal_()  # churn: 512 MiB (bf16) allocated, written, freed
                    later = rel_diff(graphed(*inputs[:3], set_size=N), eager)
                    graph_note = (f"{first:.1e} right after capture, {later:.1e} after other work "
                                  f"(eager vs ours-sdpa {rel_diff(eager, eager_ref):.1e})")
            summary.append(f"| {variant} | {wall:.2f} | {busy:.2f} | {launches:.0f} | {graph_note} |")
            details += ["", f"### {variant}: top kernels (ms per call)", ""] + \
                [f"- {ms:.3f}  {name[:110]}" for name, ms in top]
            print(summary[-1], flush=True)
    text = "\n".join(lines + summary + details) + "\n"
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)


if __name__ == "__main__":
    main()
