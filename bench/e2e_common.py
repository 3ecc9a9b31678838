"""What bench_sampling.py and bench_training.py share: sizes, the CPU refusal, random weights, the report header,
and a markdown table that is rewritten after every row (a step cut short by the suite's timeout keeps its rows)."""
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

ROOT = Path(__file__).resolve().parents[1]

# --tiny: the UNet of tests/test_unet.py (two levels, attention at both) on 16x16 latents; for CI rot checks only.
TINY_UNET = dict(model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2), num_res_blocks=1, num_heads=2,
                 context_dim=16)
FULL_HW, TINY_HW = 64, 16  # latent side: 512 px / 8, and the tiny size


def unet_config(tiny: bool):
    from model.unet import UNetConfig
    return UNetConfig(**TINY_UNET) if tiny else UNetConfig()  # default: SD-1.4 sized, 9 input channels


def refuse_full_size_without_cuda(prog: str, tiny: bool) -> None:
    """The full size on CPU would run for hours and measure nothing useful: stop with a clear message (exit 2)."""
    if not tiny and not torch.cuda.is_available():
        print(f"{prog}: error: the full-size benchmark (SD-1.4-sized JeDi UNet, 512 px, bf16) needs a CUDA GPU, "
              f"and torch.cuda.is_available() is False. On CPU run the tiny rot check instead: "
              f"python bench/{prog}.py --tiny", file=sys.stderr)
        raise SystemExit(2)


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
