"""How the near-duplicate threshold shapes the clusters the splitter keeps together.

For each threshold (bits of the 256-bit pHash) prints a markdown table: clusters, largest
cluster, singletons, clusters that mix classes (a sign that different patients are being
chained together) and the share of images with a neighbour within the threshold. With
``--pairs PNG`` it also draws, per distance band, a few images beside their nearest
neighbour, so a person can see up to which distance the pairs are the same patient::

    .venv/bin/python benchmarks/split_threshold.py ../shared/data/brain-tumor-mri --pairs /tmp/pairs.png

Exact duplicates are dropped first, as the splitter does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from btc.data.manifest import build_manifest, phash_words
from btc.data.split import near_duplicate_clusters, nearest

BANDS = ((0, 12), (16, 22), (26, 30), (32, 35), (36, 40), (41, 45), (48, 54))


def threshold_table(rows: pd.DataFrame, thresholds: list[int], nn_dist: np.ndarray) -> pd.DataFrame:
    out = []
    for t in thresholds:
        clusters = near_duplicate_clusters(rows["phash"], t)
        sizes = np.bincount(clusters)
        classes = pd.Series(rows["label"].to_numpy()).groupby(clusters).nunique()
        out.append({"bits": t, "clusters": len(sizes), "largest": int(sizes.max()), "singletons": int((sizes == 1).sum()),
                    "mixed-class clusters": int((classes > 1).sum()),
                    "images with a neighbour within": f"{(nn_dist <= t).mean():.1%}"})
    return pd.DataFrame(out)


def draw_pairs(rows: pd.DataFrame, nn_idx: np.ndarray, nn_dist: np.ndarray, out: Path, per_band: int = 5,
               side: int = 112, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    canvas = Image.new("L", (per_band * (2 * side + 12), len(BANDS) * (side + 14)), 255)
    draw = ImageDraw.Draw(canvas)
    paths, labels = rows["path"].to_numpy(), rows["label"].to_numpy()
    for r, (lo, hi) in enumerate(BANDS):
        members = np.nonzero((nn_dist >= lo) & (nn_dist <= hi))[0]
        for c, i in enumerate(rng.choice(members, size=min(per_band, len(members)), replace=False)):
            x0, y0 = c * (2 * side + 12), r * (side + 14)
            for k, idx in enumerate((i, nn_idx[i])):
                with Image.open(paths[idx]) as img:
                    canvas.paste(img.convert("L").resize((side, side)), (x0 + k * side, y0 + 12))
            draw.text((x0 + 2, y0), f"d={nn_dist[i]} {labels[i]}/{labels[nn_idx[i]]}", fill=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path, help="dataset folder")
    parser.add_argument("--thresholds", type=int, nargs="+", default=[24, 32, 40, 44, 48, 52, 56])
    parser.add_argument("--pairs", type=Path, help="write a PNG of nearest-neighbour pairs per distance band")
    args = parser.parse_args()

    manifest = build_manifest(args.data, progress=False)
    rows = manifest[manifest["readable"]].drop_duplicates("sha256").reset_index(drop=True)
    words = phash_words(rows["phash"])
    nn_idx, nn_dist = nearest(words, words, exclude_self=True)
    print(f"{len(rows)} distinct readable images; nearest-neighbour distance quartiles (bits): "
          f"{', '.join(str(int(q)) for q in np.percentile(nn_dist, [25, 50, 75]))}\n")
    table = threshold_table(rows, args.thresholds, nn_dist)
    print("| " + " | ".join(table.columns) + " |")
    print("|" + "---:|" * len(table.columns))
    for row in table.itertuples(index=False):
        print("| " + " | ".join(map(str, row)) + " |")
    if args.pairs:
        print(f"\nnearest-neighbour pairs per distance band -> {draw_pairs(rows, nn_idx, nn_dist, args.pairs)}")


if __name__ == "__main__":
    main()
