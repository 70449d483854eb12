"""Learn the image-statistics reference that `btc data validate` checks images against.

The shipped ``expectations/reference_stats.json`` was produced, from the project root, by::

    .venv/bin/python expectations/make_reference.py --synthetic 100 \\
        --out expectations/reference_stats.json ../shared/data/brain-tumor-mri

that is: the ranges learned from 400 generated demo MRI slices (seed 1, 128 px; the tests
use other seeds and sizes) merged with those learned from the real Kaggle Training folder,
so both pass while photos and CT-like images do not. Each source's range of each statistic
is its 0.5-99.5 percentile interval widened by 5% of its width; the merged range is the
union over sources (each source is learned alone so the small synthetic set is not
drowned by the larger real one).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from btc.data.discover import find_images
from btc.data.stats import learn_reference, merge_references, save_reference, statistics_frame
from btc.data.synth import generate_synthetic_dataset

SYNTHETIC_SEED = 1
SYNTHETIC_SIZE = 128


def reference_of_folder(folder: Path, *, source: str, workers: int) -> dict:
    """The reference learned from every image under a dataset folder."""
    paths = [item.path for item in find_images(folder)]
    return learn_reference(statistics_frame(paths, workers=workers), source=source)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", type=Path, help="dataset folders of known-good MRI")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="also learn from N generated images per class (0: none)")
    parser.add_argument("--out", type=Path, required=True, help="reference JSON to write")
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)
    if not args.folders and args.synthetic <= 0:
        parser.error("give at least one folder or --synthetic N")
    references = [reference_of_folder(f, source=str(f), workers=args.workers) for f in args.folders]
    if args.synthetic > 0:
        with tempfile.TemporaryDirectory() as tmp:
            generate_synthetic_dataset(Path(tmp), per_class=args.synthetic, seed=SYNTHETIC_SEED, size=SYNTHETIC_SIZE)
            source = f"btc.data.synth per_class={args.synthetic} seed={SYNTHETIC_SEED} size={SYNTHETIC_SIZE}"
            references.append(reference_of_folder(Path(tmp), source=source, workers=args.workers))
    reference = merge_references(references)
    save_reference(reference, args.out)
    for name, (lo, hi) in reference["ranges"].items():
        print(f"{name:20s} {lo:8.4f} {hi:8.4f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
