"""One typed configuration for every stage, loaded from YAML with command-line overrides.

Importing this module has no side effects: it creates no folders and touches no tracking
server. ``Config`` is saved as ``config.yaml`` next to every artifact it produced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    image_size: int = Field(128, ge=32, le=1024, description="side of the square network input, px")
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="used only when the data has no Testing folder")
    near_duplicate_distance: int = Field(
        40, ge=0, le=128,
        description="Hamming distance between 256-bit pHashes at or below which two images are near duplicates",
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the split")
    cache_dir: Path | None = Field(None, description="decoded-image cache; default <output_dir>/cache")


class ModelConfig(_Section):
    arch: Literal["compact_cnn", "plain_cnn", "resnet18", "resnet34", "efficientnet_b0", "mobilenet_v3_small"] = "compact_cnn"
    width: int = Field(32, ge=8, le=256, description="base channel count of compact_cnn")
    depth: int = Field(1, ge=1, le=4, description="residual blocks per stage of compact_cnn")
    dropout: float = Field(0.2, ge=0, lt=1)
    pretrained: bool = Field(False, description="torchvision ImageNet weights (needs the internet)")
    init_weights: Path | None = Field(None, description="offline weights: a state_dict .pt file")

    @model_validator(mode="after")
    def _weights_exist(self) -> "ModelConfig":
        if self.pretrained:  # checked here too so the CLI says so before it scans any data
            from btc.models import OWN_ARCHS  # imports torch: only when pretrained weights are asked for

            if self.arch in OWN_ARCHS:
                raise ValueError(f"{self.arch} has no pretrained weights (it trains from scratch); pretrained needs a "
                                 "torchvision architecture (resnet18, ...) or pass init_weights / --init-weights PATH")
        return self


class TrainConfig(_Section):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.05, ge=0, lt=1)
    balance: Literal["weights", "sampler", "none"] = "weights"
    patience: int = Field(6, ge=1, description="epochs without a better validation macro-F1 before stopping")
    min_epochs: int | None = Field(
        None, ge=0,
        description="no early stop before this epoch; default half of epochs (the one-cycle learning rate is still high)",
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of initialisation, batch order and augmentation")
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    amp: bool = Field(True, description="mixed precision (float16 autocast + grad scaling) on CUDA")
    threads: int | None = Field(None, ge=1, le=1024,
                                 description="torch CPU threads; default all cores (more than the cores are not used)")
    rotation_degrees: float = Field(10.0, ge=0, le=45)
    hflip: bool = True
    intensity_jitter: float = Field(0.15, ge=0, le=1, description="brightness and contrast jitter amplitude")
    gamma_jitter: float = Field(0.2, ge=0, le=1)
    scale_jitter: float = Field(0.08, ge=0, le=0.5)
    translate: float = Field(0.05, ge=0, le=0.5, description="random shift, as a share of half the image side")


class EvalConfig(_Section):
    ece_bins: int = Field(15, ge=2, le=1000)
    gradcam_per_class: int = Field(4, ge=0)


class GatesConfig(_Section):
    min_macro_f1: float = Field(0.80, ge=0, le=1)
    min_tumour_recall: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: {"glioma": 0.75, "meningioma": 0.75, "pituitary": 0.75},
        description="recall floor per tumour class: a missed tumour is the costly error",
    )
    min_margin_over_champion: float = Field(0.0, ge=-1, le=1, description="challenger macro-F1 - champion macro-F1")
    max_ece: float = Field(0.10, ge=0, le=1)
    max_flip_change: float = Field(0.10, ge=0, le=1, description="share of predictions allowed to change under horizontal flip")
    max_intensity_change: float = Field(0.10, ge=0, le=1, description="share allowed to change under a +-5% intensity shift")

    @field_validator("min_tumour_recall")
    @classmethod
    def _known_classes(cls, floors: dict[str, float]) -> dict[str, float]:
        from btc.labels import CLASSES

        unknown = sorted(set(floors) - set(CLASSES))
        if unknown:
            raise ValueError(f"unknown class(es) {', '.join(unknown)}; expected some of {', '.join(CLASSES)}")
        return floors


class RegistryConfig(_Section):
    model_name: str = "btc-classifier"
    experiment: str = "btc"
    gates: GatesConfig = Field(default_factory=GatesConfig)


class ServingConfig(_Section):
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(40_000_000, ge=1024, description="width*height refused above this, before decoding")
    max_batch_images: int = Field(32, ge=1)
    ood_min_confidence: float = Field(0.5, ge=0, le=1)
    log_images: bool = False


class MonitoringConfig(_Section):
    drift_share_threshold: float = Field(0.3, gt=0, le=1, description="share of drifted columns that means drift")
    min_predictions: int = Field(30, ge=1)
    window_hours: float = Field(24.0, gt=0)
    pca_components: int = Field(8, ge=1, le=64, description="embedding PCA columns (emb_pc1..K) in the drift reference")
    reference_dir: Path | None = Field(None, description="monitoring reference folder; default $BTC_HOME/monitoring/reference")
    workspace: Path | None = Field(None, description="Evidently workspace for the dashboard; default $BTC_HOME/evidently")


def _loader_modes() -> list[str]:
    from btc.data.images import SUPPORTED_MODES  # one source of truth: the modes decode_gray handles

    return list(SUPPORTED_MODES)


class ValidationConfig(_Section):
    min_class_share: float = Field(0.10, ge=0, le=0.25,
                                   description="smallest share of the training images any class may have")
    min_side_px: int = Field(64, ge=1, description="smallest width and height accepted")
    max_side_px: int = Field(4096, ge=1, description="largest width and height accepted")
    allowed_modes: list[str] = Field(default_factory=_loader_modes, description="PIL modes accepted (those the loader decodes)")
    stats_mostly: float = Field(
        0.95, gt=0, le=1, description="share of images whose statistics must lie within the reference ranges"
    )
    reference: Path | None = Field(None, description="statistics reference JSON; default expectations/reference_stats.json")
    warn_only: list[str] = Field(
        default_factory=lambda: ["no_exact_duplicates_within_source_split", "given_test_has_no_near_copies_of_training",
                                 "no_label_conflicts"],
        description="expectations reported as warnings, not failures (the splitter drops exact copies and copies "
                    "filed under two classes itself, and marks the dataset's own test images that have a near "
                    "copy in training)",
    )

    @model_validator(mode="after")
    def _sides_in_order(self) -> "ValidationConfig":
        if self.min_side_px > self.max_side_px:
            raise ValueError(f"min_side_px={self.min_side_px} is above max_side_px={self.max_side_px}; "
                             "expected min <= max")
        return self


class Config(_Section):
    output_dir: Path = Path("runs")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)

    def save(self, path: Path) -> Path:
        """Write this config as YAML (the form :func:`load_config` reads)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))
        return path


def flatten_config(cfg: BaseModel) -> dict[str, str]:
    """``{"section.key": "value"}`` for every leaf of a config or one of its sections (lists as JSON)."""
    out: dict[str, str] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            out[prefix] = json.dumps(node) if isinstance(node, list) else str(node)

    walk("", cfg.model_dump(mode="json"))
    return out


class ConfigError(ValueError):
    """The config file or an override is invalid."""


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.epochs=5)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(err).splitlines()[0]})") from None
    if isinstance(value, (bool, int, float)):
        # The text as written: the field's type converts it ("5" to 5 for an int, "no" to False for a bool),
        # while a text field keeps "no" or "2026" instead of YAML's False or 2026.
        value = raw.strip()
    return key.strip().split("."), value


def _sections(model: type[BaseModel] | None = None, prefix: str = "") -> set[str]:
    """Dotted names of the config's sections (``train``, ``registry.gates``, ...), not of dict-valued settings."""
    found = set()
    for name, info in (model or Config).model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            found |= {f"{prefix}{name}"} | _sections(kind, f"{prefix}{name}.")
    return found


def _merge(into: dict, update: dict) -> dict:
    for key, value in update.items():
        into[key] = _merge(dict(into[key]), value) if isinstance(value, dict) and isinstance(into.get(key), dict) \
            else value
    return into


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``section.key=value`` overrides (values parsed as YAML) into a nested dict.

    A mapping given for a whole section (``-s 'train={epochs: 3}'``) is merged into it: the
    section's other settings stay as the file set them. A dict-valued setting (such as
    ``registry.gates.min_tumour_recall``) is replaced whole.
    """
    sections = _sections()
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
        if ".".join(keys) in sections and isinstance(value, dict) and isinstance(node.get(keys[-1]), dict):
            value = _merge(dict(node[keys[-1]]), value)
        node[keys[-1]] = value
    return data


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a config from YAML (or the defaults) and apply ``section.key=value`` overrides.

    Raises:
        ConfigError: the file is missing or malformed, or a value is out of range.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML ({err})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    apply_overrides(data, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})" for e in err.errors())
        raise ConfigError(f"invalid config: {problems}") from None
