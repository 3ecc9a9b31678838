"""Measured dispatch tables: which attention backend is fastest on a card, per shape.

One JSON file per card in this folder, named by ``card_slug(torch.cuda.get_device_name())`` (``NVIDIA H200`` ->
``nvidia-h200.json``), written by ``bench/kernel_sweep.py`` on that card (``bench/gpu_lease.sh``, or
``bench/gpu_kernel_sweep.sh``) and committed. None is committed yet: until one is, every card gets "sdpa". Schema 1:

    {"schema": 1, "card": "NVIDIA H200",
     "measured": {"date": ..., "git": ..., "torch": ..., "triton": ..., "cudnn": ..., "command": ...},
     "entries": [{"dtype": "bf16", "head_dim": 40, "lq": 8192, "lk": 8192, "direction": "fwd",
                  "backend": "triton", "ms": {"triton": 0.91, "sdpa": 1.20}}, ...]}

- dtype "fp16" | "bf16"; head_dim 1..256; lq, lk: power-of-two length buckets (next_power_of_2 of the lengths);
- direction "fwd" (inference: fastest forward) or "train" (fastest forward + backward: the op runs both on one
  backend, since our backward needs our forward's logsumexp and SDPA's backward its own saved state);
- backend "triton" | "triton-tma" | "triton-ws" | "triton-atomic" (kernels/flash_attn.py; TMA loads; TMA +
  warp-specialized forward; one-kernel backward with atomic dQ) | "sdpa";
- ms: optional, the measured times behind the choice (milliseconds per call, by backend), for humans.
A shape with no entry, a card with no file, and every CPU tensor get "sdpa". A malformed file raises one
ValueError naming the file and the bad entry.
"""
import functools
import json
import re
from pathlib import Path

TABLE_DIR = Path(__file__).resolve().parent
SCHEMA = 1
DTYPES = {"fp16": "torch.float16", "bf16": "torch.bfloat16"}
DIRECTIONS = ("fwd", "train")
TABLE_BACKENDS = ("triton", "triton-tma", "triton-ws", "triton-atomic", "sdpa")


def card_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def bucket(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()  # next power of two, the kernel's autotune bucket too


def _pow2(x):
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and x & (x - 1) == 0


def validate(table, where="dispatch table"):
    """-> {(dtype, head_dim, lq, lk, direction): backend}; ValueError (one line, naming `where`) if malformed."""
    def bad(msg):
        raise ValueError(f"{where}: {msg}")

    if not isinstance(table, dict):
        bad(f"top level must be an object, got {type(table).__name__}")
    if table.get("schema") != SCHEMA:
        bad(f"'schema' must be {SCHEMA}, got {table.get('schema')!r}")
    if not isinstance(table.get("card"), str) or not table["card"]:
        bad("'card' must be the card's name (torch.cuda.get_device_name())")
    if not isinstance(table.get("entries"), list):
        bad("'entries' must be a list")
    out = {}
    for i, e in enumerate(table["entries"]):
        def bad_entry(msg):
            bad(f"entries[{i}] {json.dumps(e)[:160]}: {msg}")
        if not isinstance(e, dict):
            bad_entry("must be an object")
        missing = {"dtype", "head_dim", "lq", "lk", "direction", "backend"} - set(e)
        extra = set(e) - {"dtype", "head_dim", "lq", "lk", "direction", "backend", "ms"}
        if missing or extra:
            bad_entry(f"missing {sorted(missing)}" if missing else f"unknown keys {sorted(extra)}")
        if e["dtype"] not in DTYPES:
            bad_entry(f"dtype must be one of {list(DTYPES)}")
        if not (isinstance(e["head_dim"], int) and not isinstance(e["head_dim"], bool) and 1 <= e["head_dim"] <= 256):
            bad_entry("head_dim must be an integer 1..256")
        if not (_pow2(e["lq"]) and _pow2(e["lk"])):
            bad_entry("lq and lk must be power-of-two length buckets")
        if e["direction"] not in DIRECTIONS:
            bad_entry(f"direction must be one of {list(DIRECTIONS)}")
        if e["backend"] not in TABLE_BACKENDS:
            bad_entry(f"backend must be one of {list(TABLE_BACKENDS)}")
        ms = e.get("ms", {})
        if not (isinstance(ms, dict) and all(isinstance(k, str) and isinstance(v, (int, float))
                                              and not isinstance(v, bool) and v > 0 for k, v in ms.items())):
            bad_entry("ms must map backend names to positive milliseconds")
        key = (e["dtype"], e["head_dim"], e["lq"], e["lk"], e["direction"])
        if key in out:
            bad_entry("duplicate (dtype, head_dim, lq, lk, direction)")
        out[key] = e["backend"]
    return out


def load(path):
    """Read and validate one table file -> (card name, {key: backend})."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON dispatch table ({e})") from None
    return table.get("card") if isinstance(table, dict) else None, validate(table, str(path))


@functools.lru_cache(maxsize=None)
def table_for(card: str):
    """{key: backend} for this card name, or None without a committed table. Read once per process."""
    path = TABLE_DIR / f"{card_slug(card)}.json"
    if not path.exists():
        return None
    name, entries = load(path)
    if name != card:
        raise ValueError(f"{path}: 'card' is {name!r} but the file is looked up for {card!r}")
    return entries


def lookup(card: str, dtype: str, head_dim: int, lq: int, lk: int, direction: str) -> str:
    """The measured-fastest backend on `card` for this shape, "sdpa" where nothing was measured."""
    entries = table_for(card)
    if entries is None:
        return "sdpa"
    return entries.get((dtype, head_dim, bucket(lq), bucket(lk), direction), "sdpa")
