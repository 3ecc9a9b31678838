"""Reading checkpoint files safely, and loading tensors into modules strictly: the part every layout reader and
loader shares. A file that lies (a config wider than its tensors, a damaged file) is one CheckpointError naming it,
raised before anything is allocated (modules are built on the meta device and compared first)."""
import os
import pickle

import torch
import torch.nn as nn


class CheckpointError(RuntimeError):
    pass


def _safetensors(path: str, shapes_only: bool = False) -> dict:
    """All tensors of a .safetensors file, or (shapes_only) meta-device tensors of their shapes: the header alone."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        if not shapes_only:
            return load_file(path)
        with safe_open(path, framework="pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except Exception as e:  # safetensors' own error types: truncated file, bad header, not safetensors
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def read_state_dict(path: str, shapes_only: bool = False) -> dict:
    """Tensors of an original `.ckpt` (Lightning dict) or `.safetensors`. Never unpickles code.
    shapes_only: read no tensor data (safetensors: meta tensors from the header; .ckpt: memory-mapped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        return _safetensors(path, shapes_only)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=shapes_only)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain tensor checkpoint (it would need to run pickled code). "
            f"Convert it to .safetensors in a trusted environment. ({_first_line(e)})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # truncated zip, not a torch file at all
        raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(e)})") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (optionally under 'state_dict')")
    return obj


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [e.__class__.__name__])[0]


def check_state_dict(own: dict, sd: dict, what: str) -> None:
    """Compare a module's state dict (real or on the meta device) with checkpoint tensors (or their shapes), key by
    key and shape by shape; one CheckpointError lists every missing, unexpected and wrongly shaped key."""
    shape = lambda v: tuple(getattr(v, "shape", v))  # noqa: E731  (a tensor, or just its shape)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: checkpoint {shape(sd[k])} vs model {shape(own[k])}"
              for k in own if k in sd and shape(sd[k]) != shape(own[k])]
    if missing or unexpected or shapes:
        lines = [f"{what}: checkpoint does not match the model"]
        for name, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if items:
                lines.append(f"  {name} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(lines))


def strict_load(module: nn.Module, sd: dict, what: str) -> None:
    """load_state_dict(strict=True), but listing every missing, unexpected and wrongly shaped key at once."""
    check_state_dict(module.state_dict(), sd, what)
    module.load_state_dict(sd, strict=True)


def _meta_build(factory, what: str) -> nn.Module:
    try:
        with torch.device("meta"):
            return factory()
    except (TypeError, ValueError, ZeroDivisionError, RuntimeError, AssertionError) as e:
        raise CheckpointError(f"{what}: its config cannot be built ({_first_line(e)})") from None


def build_checked(factory, sd: dict, what: str) -> nn.Module:
    """factory() loaded strictly with `sd`, where the config behind factory may come from a file that lies: the
    module is first built on the meta device (no memory) and every key and shape compared with the tensors, so a
    config wider than its weights is an error before anything is allocated. Then it is materialised: `to_empty`
    when every buffer is in the state dict, else (non-persistent buffers such as CLIP's position_ids need their
    constructor's values) a real build, now known to be the tensors' size."""
    module = _meta_build(factory, what)
    own = module.state_dict()
    check_state_dict(own, sd, what)
    if {n for n, _ in module.named_buffers()} - set(own):
        module = factory()
    else:
        module = module.to_empty(device="cpu")
    module.load_state_dict(sd, strict=True)
    return module


def strip_prefix(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
