"""The one atomic file writer (checkpoints, images, JSON records): what a killed or failed run leaves behind is
either the previous file or the new one, never a truncated file that a rerun would take as done. No heavy imports:
eval.py, vision.py and s3.py use it without loading the model stack."""
import contextlib
import os


@contextlib.contextmanager
def atomic_path(path):
    """`with atomic_path(p) as tmp: write(tmp)`: write to a hidden temporary name beside `p` (same filesystem), then
    rename it to `p` in one step when the block succeeds; on an error the temporary file is removed. Creates the
    folder."""
    folder, name = os.path.split(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
