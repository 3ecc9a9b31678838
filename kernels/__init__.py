"""The one attention entry point used by every attention layer of the model.

``attention(q, k, v, scale=None, backend=None)``
    q: (B, Lq, H, D), k and v: (B, Lk, H, D)  ->  (B, Lq, H, D), non-causal softmax attention, differentiable.

Backends:
    "triton":    the fused flash-attention kernel in ``kernels/flash_attn.py`` (fp16/bf16/fp32, D <= 256).
    "triton-tma": the same with the forward's K/V tiles loaded through TMA descriptors (Hopper and later).
    "triton-ws": TMA plus the forward's key loop warp-specialized (Triton's Hopper pass; falls back without).
    "triton-atomic": the backward as one kernel adding dQ with fp32 atomics (FlashAttention-2 style).
    "sdpa":      PyTorch's ``scaled_dot_product_attention`` (never materialises Lq x Lk on its fused paths).
    "auto" (default): per call, the backend measured fastest on this card for (dtype, head dim, Lq bucket,
        Lk bucket, direction) in ``kernels/dispatch/<card>.json`` (written by bench/gpu_kernel_sweep.sh).
        Direction "train" (some input requires grad) compares forward + backward, and the op runs both on
        that backend; "fwd" compares the forward. A card without a table, an unmeasured shape, fp32 and every
        CPU tensor get "sdpa".
The ``backend`` argument wins over the environment variable ``JEDI_ATTN`` (any of BACKENDS).
Forcing "triton" on CPU tensors needs ``TRITON_INTERPRET=1`` (that is how the tests run it).

Beside the Hugging Face hub's ``kernels`` distribution (transformers >= 5.25 requires it; earlier 5.x import it
when installed): with the repository root on ``sys.path`` our package owns the name ``kernels``, so
``from kernels import CUDAProperties`` in transformers would find us. ``_beside_hub_kernels`` makes this one
module serve both: the hub package's folder joins ``__path__`` (its submodules resolve to its files) and its public
names are looked up lazily, on the first name we do not define. A hub release that adds a submodule or name we
also have is refused at import with one line naming the clash and the fix.

``record_backends()``: a context manager yielding a Counter of ``BackendUse(backend, head_dim, lq, lk,
direction)`` (lq, lk: power-of-two buckets) over the eager calls made inside it, for benchmarks to report
which backend ran. Calls traced by torch.compile are not counted (the choice is made once at trace time, from
the same table: record an eager warm-up call to see what a compiled graph runs). ``backend_summary(counts)``
formats it for a table cell.
"""
import collections
import contextlib
import importlib.metadata
import os
import pathlib

import torch
import torch.nn.functional as F

from . import dispatch

BACKENDS = ("auto", "triton", "triton-tma", "triton-ws", "triton-atomic", "sdpa")
TRITON_OPTIONS = {"triton": {}, "triton-tma": dict(tma=True), "triton-ws": dict(tma=True, warp_specialize=True),
                  "triton-atomic": dict(atomic_dq=True)}
BackendUse = collections.namedtuple("BackendUse", "backend head_dim lq lk direction")
_RECORDERS = []  # Counters of the active record_backends() contexts


def sdpa_attention(q, k, v, scale=None):
    # SDPA wants (B, H, L, D); transposes are views, SDPA handles the strides.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)  # (B, Lq, H, D)


@torch.compiler.assume_constant_result  # Dynamo runs it once at trace time and bakes the string in
def _auto(device_type: str, device_index: int, dtype: str, head_dim: int, lq: int, lk: int, direction: str) -> str:
    if device_type != "cuda" or dtype not in dispatch.DTYPES.values():
        return "sdpa"
    card = torch.cuda.get_device_name(device_index)
    return dispatch.lookup(card, {v: k for k, v in dispatch.DTYPES.items()}[dtype], head_dim, lq, lk, direction)


def _direction(q, k, v):
    return "train" if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad) else "fwd"


def resolve_backend(q, k, v, backend=None) -> str:
    """The backend ``attention`` would use for these tensors: "sdpa" or one of the "triton" variants."""
    backend = (backend or os.environ.get("JEDI_ATTN") or "auto").lower()
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS} (JEDI_ATTN / backend=)")
    if backend != "auto":
        return backend
    return _auto(q.device.type, q.device.index or 0, str(q.dtype), q.shape[-1], q.shape[1], k.shape[1],
                 _direction(q, k, v))


@contextlib.contextmanager
def record_backends():
    counts = collections.Counter()
    _RECORDERS.append(counts)
    try:
        yield counts
    finally:
        _RECORDERS.remove(counts)


def backend_summary(counts) -> str:
    """record_backends()' Counter as one table cell: 'sdpa fwd D40×4 D80×4 D160×6' per backend and direction;
    '' when nothing was recorded (every call compiled)."""
    groups = collections.defaultdict(collections.Counter)  # (backend, direction) -> {head dim: calls}
    for use, n in counts.items():
        groups[(use.backend, use.direction)][use.head_dim] += n
    return "; ".join(f"{b} {d} " + " ".join(f"D{h}×{n}" for h, n in sorted(dims.items()))
                     for (b, d), dims in sorted(groups.items()))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              backend: str | None = None) -> torch.Tensor:
    chosen = resolve_backend(q, k, v, backend)
    if _RECORDERS and not torch.compiler.is_compiling():
        use = BackendUse(chosen, q.shape[-1], dispatch.bucket(q.shape[1]), dispatch.bucket(k.shape[1]),
                         _direction(q, k, v))
        for counts in _RECORDERS:
            counts[use] += 1
    if chosen in TRITON_OPTIONS:
        from . import flash_attn  # imported lazily: triton.jit fixes interpreter vs compiler at import time
        return flash_attn.flash_attention(q, k, v, scale, **TRITON_OPTIONS[chosen])
    return sdpa_attention(q, k, v, scale)


# ----------------------------------------------------------------------------- the hub's `kernels`, beside ours

_OURS = pathlib.Path(__file__).resolve().parent
_HUB = None  # the hub package's folder when its distribution is installed, else None
_hub_names = None  # its __init__'s public names, loaded on first use


class HubKernelsClash(ImportError):
    pass


def _find_hub_kernels() -> pathlib.Path | None:
    """The folder of an installed `kernels` distribution other than this one (the hub's), or None."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    init = pathlib.Path(dist.locate_file("kernels/__init__.py"))
    if not init.is_file() or init.resolve().parent == _OURS:
        return None
    return init.resolve().parent


def _clash(what: str, version: str) -> HubKernelsClash:
    return HubKernelsClash(
        f"the Hugging Face hub's `kernels` {version} ({_HUB}) has {what}, which this project's kernels/ package "
        f"also has, so both cannot share the name: install the version the lock pins (pip install -r "
        f"requirements-lock.txt) or `pip uninstall kernels` if nothing else you use needs it")


def _beside_hub_kernels() -> None:
    """Let the hub's submodules (kernels._internals, kernels._rust, ...) resolve to its files, if it is installed."""
    global _HUB
    _HUB = _find_hub_kernels()
    if _HUB is None:
        return
    ours = {p.stem for p in _OURS.iterdir() if not p.name.startswith("_")}
    theirs = {p.stem.split(".")[0] for p in _HUB.iterdir() if not p.name.startswith("__")}
    if ours & theirs:
        raise _clash(f"the submodule(s) {sorted(ours & theirs)}", importlib.metadata.version("kernels"))
    __path__.append(str(_HUB))  # after ours: our submodules win, theirs are found too


def _load_hub_names() -> dict:
    """Run the hub package's __init__ in a namespace of its own (its `from kernels.x import y` lines resolve through
    our __path__) and keep its public names; a name we define too is a clash."""
    global _hub_names
    if _hub_names is None:
        init = _HUB / "__init__.py"
        ns = {"__name__": __name__, "__file__": str(init), "__path__": __path__, "__package__": __name__}
        exec(compile(init.read_text(), str(init), "exec"), ns)
        names = {k: v for k, v in ns.items() if not k.startswith("__") or k == "__version__"}
        both = sorted(k for k in names if k in globals() and globals()[k] is not names[k])
        if both:
            raise _clash(f"the name(s) {both}", importlib.metadata.version("kernels"))
        _hub_names = names
    return _hub_names


def __getattr__(name: str):
    """Names this module does not define: the hub package's, when it is installed (PEP 562)."""
    if _HUB is not None and not (name.startswith("__") and name != "__version__"):
        hub = _load_hub_names()
        if name in hub:
            return hub[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_beside_hub_kernels()
