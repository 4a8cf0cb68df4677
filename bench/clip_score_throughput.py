"""clip_score stage vs a plain open_clip loop, one pair at a time (target >= 3x on CPU).

Both paths score the same pairs with the same model and threads: real photos
(scikit-image's, cycled) as 256 px JPEGs (the size img2dataset writes by
default) with real LAION captions. The baseline is what a user would write:

    with torch.no_grad():
        for image_bytes, caption in pairs:
            x = preprocess(Image.open(io.BytesIO(image_bytes)).convert("RGB"))[None]
            t = tokenizer([caption])
            score = cos(model.encode_image(x), model.encode_text(t))

The stage (`ClipScore.compute`) decodes through curation.core.imageio, batches
images and distinct captions, and runs under inference_mode. Rounds alternate
baseline and stage; the ratio is taken per round, and the scores of the two
paths are compared (max |difference|).

    python bench/clip_score_throughput.py                      # ViT-B-32 (random weights) and curate-tiny
    python bench/clip_score_throughput.py --models ViT-B-32 --pairs 512 --rounds 3
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_pairs(n: int) -> tuple[list[bytes], list[str]]:
    import numpy as np
    import pyarrow.parquet as pq
    import skimage.data as data
    from PIL import Image

    from tests.helpers import LAION_10K

    photos = []
    for name in (
        "astronaut",
        "coffee",
        "chelsea",
        "rocket",
        "camera",
        "coins",
        "horse",
        "retina",
        "immunohistochemistry",
    ):
        a = getattr(data, name)()
        img = Image.fromarray(a if a.dtype == np.uint8 else (255 * a).astype(np.uint8)).convert("RGB")
        img.thumbnail((256, 256))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95)
        photos.append(buf.getvalue())
    captions = [c for c in pq.read_table(LAION_10K, columns=["TEXT"]).column("TEXT").to_pylist() if c][:n]
    return [photos[i % len(photos)] for i in range(n)], captions


def baseline(built, images, captions):
    import torch
    from PIL import Image

    scores = []
    with torch.no_grad():
        for data, caption in zip(images, captions):
            x = built.preprocess_val(Image.open(io.BytesIO(data)).convert("RGB"))[None]
            i = torch.nn.functional.normalize(built.model.encode_image(x), dim=-1)
            t = torch.nn.functional.normalize(built.model.encode_text(built.tokenizer([caption])), dim=-1)
            scores.append(float((i * t).sum()))
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="ViT-B-32,curate-tiny")
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()

    import numpy as np
    import pyarrow as pa
    import torch

    from curation.models.clip import build_model
    from curation.stages import StageContext
    from curation.stages.clip_score import ClipScore, ClipScoreParams

    torch.set_num_threads(args.threads)
    images, captions = make_pairs(args.pairs)
    print(f"load average: {Path('/proc/loadavg').read_text().strip()}; torch threads {args.threads}")
    for name in args.models.split(","):
        built = build_model(name)
        built.model.eval()
        with tempfile.TemporaryDirectory() as tmp:
            ck = os.path.join(tmp, "ck.pt")
            torch.save({"model_name": name, "state_dict": built.model.state_dict()}, ck)
            params = ClipScoreParams(
                checkpoint=ck,
                device="cpu",
                cpus=args.threads,
                batch_size=args.batch_size,
                precision=args.precision,
            )
            stage = ClipScore(params, StageContext(Path(tmp)))
            stage.setup()
        table = pa.table({"image": pa.array(images, pa.binary()), "caption": pa.array(captions)})
        stage.compute(table.slice(0, 8))  # warm-up both paths
        baseline(built, images[:8], captions[:8])
        ratios, base_rates, stage_rates = [], [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            ref = baseline(built, images, captions)
            base_rates.append(len(images) / (time.perf_counter() - start))
            start = time.perf_counter()
            out = stage.compute(table)
            stage_rates.append(len(images) / (time.perf_counter() - start))
            ratios.append(stage_rates[-1] / base_rates[-1])
        diff = float(np.max(np.abs(np.asarray(ref) - out.column("clip_score").to_numpy())))
        print(
            f"{name}: plain loop {statistics.median(base_rates):.1f} pairs/s, stage {statistics.median(stage_rates):.1f} "
            f"pairs/s, ratio {statistics.median(ratios):.2f}x (rounds: {', '.join(f'{r:.2f}' for r in ratios)}); "
            f"max |score difference| {diff:.2e} ({args.precision})"
        )
    print(f"load average: {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    main()
