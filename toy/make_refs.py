"""Render the reference images shipped in assets/refs/: held-out subjects (never seen in training) at 128 px.

    python toy/make_refs.py            # writes assets/refs/<subject>_<k>.png, deterministic

Each subject gets three close-ups (subject large and centred, as in the subject-centric photos users give and as the
toy benchmark's references) on different backgrounds, so `sample.py --refs` can be tried with 1 or 3 references;
their caption is e.g. "a toy close up, on a table" (`--ref_prompt`).
"""
import os
import sys

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data_procedural as P  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "refs")
CONTEXTS = [("table", P.CLOSE_UP), ("grass", P.CLOSE_UP), ("night", P.CLOSE_UP)]


def main(num_subjects: int = 6):
    os.makedirs(OUT, exist_ok=True)
    held = P.subjects("heldout")
    step = max(1, len(held) // num_subjects)
    for i, subject in enumerate(held[::step][:num_subjects]):
        for k, ctx in enumerate(CONTEXTS):
            img, _ = P.render(subject, ctx, resolution=128, rng=1000 * i + k)
            path = os.path.join(OUT, f"{subject.id}_{k}.png")
            Image.fromarray(img).save(path)
            print(path)


if __name__ == "__main__":
    main()
