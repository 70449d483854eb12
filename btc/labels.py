"""The four canonical classes and the folder names that map onto them."""

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")

# Folder names used by the two Kaggle datasets (and common spellings) -> canonical class.
ALIASES = {
    "glioma": "glioma",
    "glioma_tumor": "glioma",
    "meningioma": "meningioma",
    "meningioma_tumor": "meningioma",
    "notumor": "notumor",
    "no_tumor": "notumor",
    "no_tumour": "notumor",
    "normal": "notumor",
    "pituitary": "pituitary",
    "pituitary_tumor": "pituitary",
}

TUMOUR_CLASSES = ("glioma", "meningioma", "pituitary")


def canonical_label(folder_name: str) -> str:
    """Map a class folder name onto one of :data:`CLASSES`.

    Raises:
        ValueError: the name is not a known class folder.
    """
    key = folder_name.strip().lower().replace("-", "_").replace(" ", "_")
    if key not in ALIASES:
        raise ValueError(
            f"unknown class folder {folder_name!r}; expected one of {', '.join(CLASSES)} "
            f"(or the Kaggle spellings {', '.join(k for k in ALIASES if '_' in k)})"
        )
    return ALIASES[key]
