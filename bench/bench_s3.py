"""Throughput of the S³ data engine (s3.py) per stage on one GPU, random weights at SD-1.x size.

    python bench/bench_s3.py --out bench/results/<date>-<card>/bench_s3.md     # CUDA: SD-1.x sizes, 512 px, bf16
    python bench/bench_s3.py --tiny                                            # CPU: tiny models (plumbing only)

What runs: s3.py's own stages over a fresh manifest folder, `--prompts` prompts through collages -> instances ->
filter -> backgrounds -> stylize -> write, exactly as `python s3.py all` runs them. Full size: three SD-1.x UNets
(4, 9 and 8 input channels), the SD VAE and CLIP text encoder, Grounding-DINO (its default config: Swin-T, as
grounding-dino-tiny), SAM ViT-B and open_clip ViT-L/14, all with random weights, built in memory or written to a
temporary folder and loaded by s3 (loading is not timed). Random detectors find and score noise, so the
instance and filter thresholds are opened (every collage gives one set of `max_set_size` instances) and
stylize_p = 1 (every set restyled: with the default p = 0.5 that stage costs half). Each stage's time is its
batch loop only (s3.run_items), so per-stage rates add up to the end-to-end rate.
Columns: items/s of each stage; "collages/s" = the collages stage; "sets/s" = sets written / the summed stage
times (per GPU: under torchrun each rank does its share). Exit 2 without CUDA at full size.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from e2e_common import redraw_zero_layers, refuse_full_size_without_cuda  # noqa: E402

OPEN = dict(box_threshold=0.0, text_threshold=0.0, min_area=0.0, max_area=1.0, border=-1, max_overlap=1.0,
            min_similarity=-1.0, stylize_p=1.0)


def full_size_models(folder, device):
    """Random SD-1.x bundles in memory (s3's rt.models keys), Grounding-DINO / SAM / CLIP written to `folder`."""
    import open_clip
    from transformers import (BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SamConfig, SamImageProcessor,
                              SamModel, SamProcessor)

    from model.loading import JeDi
    from model.conditioner import as_text_conditioner
    from model.text import build_text_encoder, sd14_text_config
    from model.unet import UNet, UNetConfig
    from model.vae import AutoencoderKL, VAEConfig

    bundles = {}
    for key, channels in (("sd", 4), ("inpaint", 9), ("ip2p", 8)):
        unet = redraw_zero_layers(UNet(UNetConfig(in_channels=channels)))
        vae, text = AutoencoderKL(VAEConfig()), build_text_encoder(sd14_text_config())
        unet, vae, text = (m.to(device).eval() for m in (unet, vae, text))
        bundles[key] = JeDi(unet, vae, as_text_conditioner(text), dict(resolution=512, diffusion={}, space="latent"))
    gd, sam = os.path.join(folder, "grounding-dino"), os.path.join(folder, "sam")
    os.makedirs(gd)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "of", "photo"] + [f"w{i}" for i in range(200)]
    with open(os.path.join(gd, "vocab.txt"), "w") as f:  # the real BERT vocabulary is not needed for timing
        f.write("\n".join(vocab) + "\n")
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(),
                           tokenizer=BertTokenizer(os.path.join(gd, "vocab.txt"))).save_pretrained(gd)
    GroundingDinoForObjectDetection(GroundingDinoConfig()).save_pretrained(gd)
    SamModel(SamConfig()).save_pretrained(sam)
    SamProcessor(image_processor=SamImageProcessor()).save_pretrained(sam)
    clip = os.path.join(folder, "clip-vit-l-14.bin")
    torch.save(open_clip.create_model("ViT-L-14-quickgelu", pretrained=None).state_dict(), clip)
    return bundles, dict(grounding_dino=gd, sam=sam, clip_model="ViT-L-14-quickgelu", clip_weights=clip,
                         sd="in-memory", inpaint="in-memory", ip2p="in-memory")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random models on CPU (checks the plumbing)")
    p.add_argument("--prompts", type=int, default=None, help="collages to make (default 16 full size, 8 tiny)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="sampling steps of every stage (default: s3.py's)")
    p.add_argument("--out", default=None, help="also write the table to this .md file")
    a = p.parse_args(argv)
    refuse_full_size_without_cuda("bench_s3", a.tiny)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import s3

    n = a.prompts or (8 if a.tiny else 16)
    tmp = tempfile.mkdtemp(prefix="bench_s3_")
    settings = dict(OPEN, manifest=os.path.join(tmp, "m"), num_objects=n, prompts_per_object=1,
                    batch_size=a.batch_size, max_instances=s3.max_set_size)
    if a.tiny:
        import tiny_weights

        settings.update(tiny_weights.all_weights(os.path.join(tmp, "w")), num_heads=2, collage_resolution=32,
                        canvas=32, device="cpu")
        steps = a.steps or 2
        injected = {}
    else:
        injected, paths = full_size_models(os.path.join(tmp, "w"), torch.device("cuda"))
        settings.update(paths, device="cuda")
        steps = a.steps
    if steps:
        settings.update(collage_steps=steps, inpaint_steps=steps, ip2p_steps=steps)
    s3.configure([f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in settings.items()])
    rt = s3.Runtime()
    rt.models.update(injected)
    rows, total = [], 0.0
    for stage in s3.STAGES:
        t0 = time.perf_counter()
        made, dt = s3.RUN[stage](rt)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        rows.append((stage, made, dt, time.perf_counter() - t0))
        total += dt
    sets = s3.stats()["write"]["sets"]
    card = torch.cuda.get_device_name() if rt.device.type == "cuda" else "CPU"
    lines = [f"# S³ engine throughput ({'tiny models' if a.tiny else 'SD-1.x sizes, random weights'}, {card})",
             "", f"- {n} prompts, batch_size {a.batch_size}, collage {s3.collage_resolution} px, canvas "
             f"{s3.canvas} px, steps {s3.collage_steps}/{s3.inpaint_steps}/{s3.ip2p_steps} (collage/inpaint/ip2p), "
             f"sampler {s3.sampler}, {'bf16 autocast' if rt.autocast else 'fp32'}, threads "
             f"{torch.get_num_threads()}", "", "| stage | items | s (batch loop) | items/s | s (with model set-up) |",
             "|---|---|---|---|---|"]
    lines += [f"| {st} | {m} | {dt:.2f} | {m / dt:.2f} | {wall:.2f} |" for st, m, dt, wall in rows]
    collage = next(r for r in rows if r[0] == "collages")
    lines += ["", f"collages/s per {'GPU' if rt.device.type == 'cuda' else 'process'}: {collage[1] / collage[2]:.3f}; "
              f"sets/s (all stages): {sets / total:.3f} ({sets} sets of {s3.max_set_size} in {total:.1f} s)", ""]
    md = "\n".join(lines)
    print(md)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
