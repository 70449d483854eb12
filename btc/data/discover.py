"""Finding the images of a dataset folder as Kaggle ships it, with canonical labels.

Layouts understood:

* ``Training|Testing/<glioma|meningioma|notumor|pituitary>/*`` (Brain Tumor MRI Dataset);
* ``Training|Testing/<glioma_tumor|meningioma_tumor|no_tumor|pituitary_tumor>/*``
  (Brain Tumor Classification (MRI));
* a flat ``<class>/*`` folder with no split.

Anything else in the folder (a ``Validation/`` folder beside ``Training/``, loose files, a
``__MACOSX/`` folder) is not read, and each such entry is logged as a warning that names it,
so nothing leaves the counts unannounced. A folder that cannot be read, or a file name that
is not UTF-8 (the manifest could not record it), stops the scan with a message naming it. Paths are absolute, so a manifest can be used
from any working folder.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from btc.labels import canonical_label

SPLIT_FOLDERS = {"training": "train", "train": "train", "testing": "test", "test": "test"}
# Files that sit beside the class folders by design (btc's own lesions.csv, a README): not worth a warning.
SIDECAR_SUFFIXES = {".csv", ".txt", ".md", ".json", ".yaml", ".yml", ".parquet", ".pdf", ".html"}

log = logging.getLogger(__name__)


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


def _unreadable_folder(err: OSError) -> DatasetLayoutError:
    return DatasetLayoutError(f"cannot read folder {err.filename!r}: {err.strerror or err}; its files would be "
                              "missing from the dataset (fix its permissions, or move it out of the data folder)")


def _entries(folder: Path) -> tuple[list[Path], list[Path]]:
    """The visible sub-folders and the other visible entries (files, broken links) of ``folder``."""
    try:
        entries = sorted(p for p in folder.iterdir() if _visible(p))
    except OSError as err:
        raise _unreadable_folder(err) from None
    return [p for p in entries if p.is_dir()], [p for p in entries if not p.is_dir()]


def _raise(err: OSError) -> None:
    raise _unreadable_folder(err)


def _recordable(path: Path) -> bool:
    """Whether the name can be written to the manifest (Parquet text is UTF-8)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _files_of_class(class_dir: Path, source_split: str) -> list[FoundImage]:
    try:
        label = canonical_label(class_dir.name)
    except ValueError as err:
        raise DatasetLayoutError(f"{err} (folder {str(class_dir)!r})") from None
    files: list[Path] = []
    seen: set[str] = set()
    for here, dirs, names in os.walk(class_dir, followlinks=True, onerror=_raise):
        real = os.path.realpath(here)
        if real in seen:  # a link back up the tree: read each folder once
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        # Broken links stay: the manifest lists them as unreadable rather than dropping them.
        files += [Path(here, n) for n in names if not n.startswith(".")]
    if not files:
        raise DatasetLayoutError(f"class folder {str(class_dir)!r} is empty: every class folder needs images")
    return [FoundImage(p, label, source_split) for p in sorted(files)]


def _ignore(paths: list[Path], why: str) -> None:
    for p in paths:
        if p.is_dir() or p.suffix.lower() not in SIDECAR_SUFFIXES:
            log.warning("ignored %s: %s", p, why)


def find_images(root: Path) -> list[FoundImage]:
    """List every file under the class folders of ``root``, with its canonical label.

    Files are not decoded here: unreadable ones are reported by the manifest, never dropped.
    Entries outside the layout are logged (``ignored PATH: why``) and not read.

    Raises:
        DatasetLayoutError: ``root`` is missing, has no class folders, a class folder is empty
            or has an unknown name, or there is a Testing folder but no Training folder.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise DatasetLayoutError(f"data folder {str(root)!r} does not exist or is not a folder")
    top, loose = _entries(root)
    split_dirs = [d for d in top if d.name.lower() in SPLIT_FOLDERS]
    found: list[FoundImage] = []
    if split_dirs:
        if not any(SPLIT_FOLDERS[d.name.lower()] == "train" for d in split_dirs):
            raise DatasetLayoutError(
                f"{str(root)!r} has {', '.join(d.name for d in split_dirs)}/ but no Training/ folder to train on"
            )
        _ignore([d for d in top if d not in split_dirs], "not a Training or Testing folder")
        _ignore(loose, "a file beside the Training and Testing folders, not inside a class folder")
        for split_dir in split_dirs:
            class_dirs, files = _entries(split_dir)
            _ignore(files, f"a file in {split_dir.name}/, not inside a class folder")
            for class_dir in class_dirs:
                found += _files_of_class(class_dir, SPLIT_FOLDERS[split_dir.name.lower()])
    else:
        _ignore(loose, "a file beside the class folders, not inside one")
        _ignore([d for d in top if d.name == "__MACOSX"], "macOS archive metadata, not a class folder")
        for class_dir in top:
            if class_dir.name != "__MACOSX":
                found += _files_of_class(class_dir, "")
    if not found:
        raise DatasetLayoutError(
            f"no class folders in {str(root)!r}; expected Training/<class>/ and Testing/<class>/, or <class>/ folders"
        )
    unnamed = [f.path for f in found if not _recordable(f.path)]
    if unnamed:
        shown = ", ".join(repr(os.fsencode(p))[1:] for p in unnamed[:5])
        raise DatasetLayoutError(
            f"{len(unnamed)} file name(s) are not valid UTF-8 and cannot be recorded in the manifest: {shown}"
            + (f" and {len(unnamed) - 5} more" if len(unnamed) > 5 else "") + "; rename them (e.g. with convmv)")
    return found
