"""Finding the images of a dataset folder as Kaggle ships it, with canonical labels.

Layouts understood:

* ``Training|Testing/<glioma|meningioma|notumor|pituitary>/*`` (Brain Tumor MRI Dataset);
* ``Training|Testing/<glioma_tumor|meningioma_tumor|no_tumor|pituitary_tumor>/*``
  (Brain Tumor Classification (MRI));
* a flat ``<class>/*`` folder with no split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from btc.labels import canonical_label

SPLIT_FOLDERS = {"training": "train", "train": "train", "testing": "test", "test": "test"}


class DatasetLayoutError(ValueError):
    """The folder does not have a layout btc understands; the message says what is wrong."""


@dataclass(frozen=True)
class FoundImage:
    """One file found in a class folder (not yet decoded)."""

    path: Path
    label: str
    source_split: str  # "train", "test" or "" when the dataset has no split folders


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p))


def _files_of_class(class_dir: Path, source_split: str) -> list[FoundImage]:
    label = canonical_label(class_dir.name)
    files = sorted(p for p in class_dir.rglob("*") if p.is_file() and _visible(p))
    if not files:
        raise DatasetLayoutError(f"class folder {str(class_dir)!r} is empty: every class folder needs images")
    return [FoundImage(p, label, source_split) for p in files]


def find_images(root: Path) -> list[FoundImage]:
    """List every file under the class folders of ``root``, with its canonical label.

    Files are not decoded here: unreadable ones are reported by the manifest, never dropped.

    Raises:
        DatasetLayoutError: ``root`` is missing, has no class folders, or a class folder is empty.
        ValueError: a class folder has an unknown name.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"data folder {str(root)!r} does not exist or is not a folder")
    top = _class_dirs(root)
    split_dirs = [d for d in top if d.name.lower() in SPLIT_FOLDERS]
    found: list[FoundImage] = []
    if split_dirs:
        for split_dir in split_dirs:
            for class_dir in _class_dirs(split_dir):
                found += _files_of_class(class_dir, SPLIT_FOLDERS[split_dir.name.lower()])
    else:
        for class_dir in top:
            found += _files_of_class(class_dir, "")
    if not found:
        raise DatasetLayoutError(
            f"no class folders in {str(root)!r}; expected Training/<class>/ and Testing/<class>/, or <class>/ folders"
        )
    return found
