"""What bench_sampling.py and bench_training.py share: sizes (SD-1.4 and, with --xl, JeDi-XL), the CPU refusal, random
weights, the diffusers baseline UNet, the report header, and a markdown table that is rewritten after every row (a
step cut short by the suite's timeout keeps its rows)."""
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

# --tiny: the UNet of tests/test_unet.py (two levels, attention at both) on 16x16 latents; for CI rot checks only.
TINY_UNET = dict(model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2), num_res_blocks=1, num_heads=2,
                 context_dim=16)
FULL_HW, TINY_HW = 64, 16  # latent side: 512 px / 8, and the tiny size
# --xl: JeDi-XL, the SDXL base UNet (model.flavours) with JeDi's 9 input channels, at the resolution JeDi-XL trains
# and samples at (config/jedi_sdxl.py: 512 px, 64x64 latents; a test keeps the two equal), the SDXL text
# conditioner and VAE. --xl --tiny: an SDXL-shaped tiny UNet (three levels, attention at
# factors 2 and 4, per-level depth, linear proj, label_emb over pooled text + size features) and tiny encoders.
FULL_HW_XL = 64
TINY_XL_POOLED = 16  # bigG's pooled width (1280 at full size)
TINY_XL_UNET = dict(model_channels=32, channel_mult=(1, 2, 4), attention_resolutions=(2, 4), num_res_blocks=1,
                    num_head_channels=16, transformer_depth=(0, 1, 2), context_dim=16 + 32, use_linear_proj=True,
                    adm_in_channels=TINY_XL_POOLED + 6 * 256)
TINY_XL_TEXT = dict(clip_l=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
                    bigg=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              projection_dim=TINY_XL_POOLED))


def unet_config(tiny: bool, xl: bool = False):
    """The benchmarked JeDi UNet: SD-1.4 sized (default) or JeDi-XL (xl), 9 input channels; tiny for CPU checks."""
    import dataclasses

    from model.unet import JEDI_IN_CHANNELS, UNetConfig
    if xl:
        from model.flavours import FLAVOURS
        base = UNetConfig(**TINY_XL_UNET) if tiny else FLAVOURS["sdxl"].unet  # the base: 4 input channels
        return dataclasses.replace(base, in_channels=JEDI_IN_CHANNELS)
    return UNetConfig(**TINY_UNET) if tiny else UNetConfig()  # default: SD-1.4 sized, 9 input channels


def latent_hw(tiny: bool, xl: bool = False) -> int:
    return TINY_HW if tiny else (FULL_HW_XL if xl else FULL_HW)


def refuse_full_size_without_cuda(prog: str, tiny: bool) -> None:
    """The full size on CPU would run for hours and measure nothing useful: stop with a clear message (exit 2)."""
    if not tiny and not torch.cuda.is_available():
        print(f"{prog}: error: the full-size benchmark (SD-1.4-sized JeDi UNet at 512 px, or JeDi-XL at 512 px with "
              f"--xl; bf16) needs a CUDA GPU, and torch.cuda.is_available() is False. On CPU run the tiny rot check "
              f"instead: python bench/{prog}.py --tiny", file=sys.stderr)
        raise SystemExit(2)


# ----------------------------------------------------------------------------------------------------------
# The diffusers baseline UNet (bench_sampling's rows, bench_training's diffusers rows)
# ----------------------------------------------------------------------------------------------------------
def diffusers_unet(cfg, sample_size):
    """UNet2DConditionModel with the same architecture as our UNetConfig (SD-1.4's or SDXL's), on meta. diffusers
    calls the head count `attention_head_dim`; SDXL adds the text_time vector input (pooled text + six size numbers
    through its own 256-wide sinusoids)."""
    from diffusers import UNet2DConditionModel

    from model.layout_diffusers import diffusers_unet_kwargs

    kw = diffusers_unet_kwargs(cfg, sample_size)
    with torch.device("meta"):  # weights come from ours (load_state_dict(assign=True)): skip diffusers' own init
        return UNet2DConditionModel(**kw)


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
    """Our UNet's call signature on top of diffusers' UNet, so the same sampling loop and training step drive both.
    SDXL (time_ids given): the conditioning is our Cond; diffusers gets its context, the pooled text (y's first
    part) and the six size numbers `time_ids` (original h, w, crop top, left, target h, w), which it embeds itself,
    as StableDiffusionXLPipeline passes them. `blocks`: its down, middle and up blocks, train.parallelize's units."""

    def __init__(self, unet, time_ids=None):
        super().__init__()
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.unet, self.joint = unet, JointSelfAttnProcessor()
        unet.set_attn_processor({name: self.joint if name.endswith("attn1.processor") else AttnProcessor2_0()
                                 for name in unet.attn_processors})
        self.register_buffer("time_ids", time_ids, persistent=False)

    @property
    def blocks(self):
        return [*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks]

    def forward(self, x, t, context, set_size=1):
        from model.conditioning import MICRO_FEATURES, Cond

        self.joint.set_size = set_size
        if not isinstance(context, Cond):
            return self.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]
        pooled = context.y[:, :context.y.shape[1] - 6 * MICRO_FEATURES]  # y = [pooled, size features]
        time_ids = self.time_ids.to(pooled.dtype).expand(len(x), -1)  # (6,) -> (B, 6)
        return self.unet(x, t, encoder_hidden_states=context.context, return_dict=False,
                         added_cond_kwargs=dict(text_embeds=pooled, time_ids=time_ids))[0]


def diffusers_from_ours(ours, sample_size, image_size=None):
    """The baseline with our weights (diffusers' own SD/SDXL converter), in our dtype and device. image_size: the
    pixels per side of the images (SDXL: its size numbers, original = target = that, crop 0, as sample.py)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    net = diffusers_unet(ours.config, sample_size)
    ldm = {"model.diffusion_model." + k: v.detach().clone() for k, v in ours.state_dict().items()}
    net.load_state_dict(convert_ldm_unet_checkpoint(ldm, dict(net.config)), strict=True, assign=True)
    left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"diffusers UNet: not loaded from our weights: {left[:3]}")
    time_ids = None
    if ours.config.adm_in_channels is not None:
        if image_size is None:
            raise ValueError("an SDXL baseline needs the image size (its size conditioning)")
        device = next(ours.parameters()).device
        time_ids = torch.tensor([image_size, image_size, 0, 0, image_size, image_size], dtype=torch.float32,
                                device=device)
    return DiffusersJeDi(net.eval().requires_grad_(False), time_ids)


@torch.no_grad()
def redraw_zero_layers(module: nn.Module) -> nn.Module:
    """Random weights for timing: keep PyTorch's default init, but re-draw the layers the UNet zero-initialises
    (every residual branch's last conv, proj_out, the output conv). All-zero operands would make the output and
    most gradients exactly zero, and matmuls on zeros can run faster than on real data."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not m.weight.any():
            m.reset_parameters()
    return module


def use_dispatch_dir(path) -> str:
    """--dispatch-dir: "auto" attention reads its per-card tables from `path` instead of kernels/dispatch/ (e.g. the
    one bench/kernel_sweep.py just wrote, to measure what the card gets once it is committed). The card's table is
    validated here (a malformed one stops the script). -> the report line saying which table "auto" uses."""
    import kernels.dispatch as kd
    if path is not None:
        if not Path(path).is_dir():
            raise SystemExit(f"--dispatch-dir: {path} is not a directory")
        kd.TABLE_DIR = Path(path)
        kd.table_for.cache_clear()
    if not torch.cuda.is_available():
        return "- attention: auto is SDPA for CPU tensors (no dispatch table is read)"
    name = torch.cuda.get_device_name()
    table = kd.TABLE_DIR / f"{kd.card_slug(name)}.json"
    if kd.table_for(name) is None:
        return f"- attention: auto is SDPA everywhere: no dispatch table for {name} in {kd.TABLE_DIR}"
    return f"- attention: auto per shape from the dispatch table {table}"


def versions() -> str:
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    if torch.version.cuda:
        parts.append(f"CUDA {torch.version.cuda}")
    for name in ("triton", "diffusers"):
        try:
            parts.append(f"{name} {__import__(name).__version__}")
        except Exception:  # noqa: BLE001 - any import failure means "not usable here"
            parts.append(f"{name} not importable")
    return ", ".join(parts)


def card() -> str:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs)"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def header(title: str) -> list[str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001 - not a git checkout (the device machine's copy may lack .git)
        commit = ""
    return [f"# {title}", "",
            f"- card: {card()}",
            f"- versions: {versions()}",
            f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
            f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`" + (f" (git {commit})" * bool(commit))]


class Report:
    """Markdown report: header + notes + one table, rewritten to `out` (and kept in memory) after every row."""

    def __init__(self, out, lines, columns):
        self.out, self.lines, self.columns, self.rows, self.footer = out, list(lines), columns, [], []

    def add(self, row: dict):
        self.rows.append(row)
        self.write()

    def text(self) -> str:
        table = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        table += ["| " + " | ".join(str(r.get(c, "")) for c in self.columns) + " |" for r in self.rows]
        return "\n".join(self.lines + [""] + table + ([""] + self.footer if self.footer else [])) + "\n"

    def write(self):
        if self.out is not None:
            Path(self.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.out).write_text(self.text())


class Budget:
    """--max-seconds: a row starts only if it should finish inside the budget, judged by the longest row of its kind
    so far (compile rows / the rest), or by the initial guesses before any. The first row always runs."""

    def __init__(self, max_seconds: float, guess: float, compile_guess: float):
        self.max_seconds, self.start, self.rows = max_seconds, time.perf_counter(), 0
        self.longest = {False: guess, True: compile_guess}
        self.seen = {False: False, True: False}

    def skip_note(self, variant: str):
        elapsed, kind = time.perf_counter() - self.start, "compile" in variant
        if self.rows and elapsed + self.longest[kind] > self.max_seconds:
            return (f"skipped: {elapsed:.0f} s + ~{self.longest[kind]:.0f} s for this row would pass "
                    f"--max-seconds {self.max_seconds:g}")
        return None

    def done(self, variant: str, seconds: float):
        kind = "compile" in variant
        self.longest[kind] = max(seconds, self.longest[kind]) if self.seen[kind] else seconds
        self.seen[kind] = True
        self.rows += 1


def fmt(x, digits=3):
    """Numbers for the table: 3 significant digits, '' for None."""
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"
    return str(x)


def compile_note() -> str:
    """What torch.compile made of the row: compiled graphs and graph breaks (dynamo's counters, cleared per row)."""
    from torch._dynamo.utils import counters
    return (f"{counters['stats'].get('unique_graphs', 0)} compiled graph(s), "
            f"{sum(counters['graph_break'].values())} graph break(s)")


def first_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:160] if msg else ''}".replace("|", "/")


class RowFailed(Exception):
    """A row that ran but whose result is wrong: `row` (its note says why) goes into the table, the status is 1."""

    def __init__(self, row: dict):
        super().__init__(row.get("note", "failed"))
        self.row = row


def run_rows(variants, run_row, report, budget, on_cuda: bool, after_row=None) -> int:
    """One table row per variant. A failing row is reported and the others still run; the suite's timeout (SIGINT)
    keeps what was measured. after_row(variant, row) may add columns. Returns 0, 1 (a row failed) or 130."""
    import gc
    import time
    import traceback

    status = 0
    try:
        for variant in variants:
            skip = budget.skip_note(variant)
            if skip:
                report.add({"variant": variant, "note": skip})
                continue
            print(f"== {variant}", flush=True)
            t_row = time.perf_counter()
            try:
                row = run_row(variant)
            except RowFailed as e:
                row, status = e.row, 1
            except Exception as e:  # noqa: BLE001 - one failing option must not hide the other rows
                traceback.print_exc()
                row, status = {"note": f"failed: {first_line(e)}"}, 1
            finally:
                os.environ.pop("JEDI_ATTN", None)
                gc.collect()
                if on_cuda:
                    torch.cuda.empty_cache()
                if "compile" in variant:
                    torch._dynamo.reset()
                budget.done(variant, time.perf_counter() - t_row)
            if after_row is not None:
                after_row(variant, row)
            report.add({"variant": variant, **row})
            print(report.text().splitlines()[-1], flush=True)
    except KeyboardInterrupt:
        report.footer.append("Interrupted (timeout): later rows were not run.")
        report.write()
        status = 130
    return status
