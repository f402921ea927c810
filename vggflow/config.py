"""The one configuration of vggflow: pydantic models, one section per pipeline step.

A config is built from (later wins): the defaults below, a YAML file (``--config``),
environment variables ``VGGFLOW__<SECTION>__<KEY>=value`` and ``--set section.key=value``
overrides. Each task receives only its own section; the whole config is logged to MLflow.

One module over ~400 lines on purpose: the whole schema (every key, default and check) in one
place, its sections in pipeline order; the parsing of override trees lives in ``config_tree.py``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vggflow.config_tree import apply_override, flatten, format_validation_error, parse_override
from vggflow.errors import ConfigError

#: VGG19's convolutional blocks, bottom to top; a stage unfreezes from one of them upwards.
VGG19_BLOCKS = ("block1", "block2", "block3", "block4", "block5")
ENV_PREFIX = "VGGFLOW__"


class Section(BaseModel):
    """Base of every section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    """Where the images are and how they are split."""

    dir: Path = Field(Path("data"), description="Folder of labelled images: DIR/<class>/<image>.")
    dvc_file: Path = Field(Path("data.dvc"), description="DVC file tracking `dir` (its md5 is the data version).")
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)

    @model_validator(mode="after")
    def _room_for_training(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 0.8:
            raise ValueError("val_fraction + test_fraction must leave at least 20% for training")
        return self


class ValidationConfig(Section):
    """Data validation: what is excluded, what is reported, what is fatal."""

    min_side: int = Field(8, ge=1, description="Images with a smaller width or height are excluded.")
    max_pixels: int = Field(
        50_000_000, ge=1, description="Images with more pixels are refused unread (decompression bombs)."
    )
    min_images_per_class: int = Field(3, ge=1, description="Classes with fewer usable images are an error...")
    drop_small_classes: bool = Field(False, description="...or are excluded (with a warning) when this is true.")
    near_duplicate_distance: int = Field(
        4, ge=0, le=64, description="Perceptual-hash Hamming distance reported as near-duplicate."
    )
    imbalance_warning_ratio: float = Field(
        10.0, ge=1, description="Warn when the largest class has more than this many times the images of the smallest."
    )
    workers: int = Field(0, ge=0, description="Decoding processes; 0 = one per CPU core, 1 = no subprocesses.")
    drift_threshold: float = Field(0.1, gt=0, description="Class-share or image-statistic change reported as drift.")


class BackboneConfig(Section):
    """The VGG19 convolutional base."""

    weights: str = Field(
        "imagenet", description="`imagenet` (Keras cache/download), a path to a .h5/.weights.h5 file, or `none`."
    )
    allow_random_init: bool = Field(
        False, description="Train on a randomly initialised base when `weights` cannot be obtained (or is `none`)."
    )
    image_size: int = Field(224, ge=32, le=1024, description="Square input side; VGG19 needs at least 32.")
    precision: Literal["auto", "float32", "mixed_bfloat16"] = Field(
        "float32",
        description="Compute precision of extraction and training; `auto` = mixed_bfloat16 where the CPU runs "
        "bfloat16 natively (AMX or AVX-512 BF16), else float32: faster there, and it cost 0.7 points of test "
        "accuracy in BENCHMARKS.md section 8, hence not the default. The registered model always computes in float32.",
    )

    @field_validator("weights")
    @classmethod
    def _weights_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be `imagenet`, `none` or a path to a weights file")
        return value.strip()


class FeaturesConfig(Section):
    """Computing the frozen base's outputs once, cached on disk."""

    batch_size: int = Field(32, ge=1, le=1024)
    cache_dir: Path = Field(Path(".vggflow/cache"), description="Feature and backbone cache (safe to delete).")
    executor: Literal["local", "dask"] = Field(
        "local", description="`local`: one pass in this process. `dask`: shards of images on a Dask cluster."
    )
    dask_address: str | None = Field(
        None, description="Scheduler of an existing Dask cluster (tcp://host:port); None: a local cluster for the run."
    )
    dask_workers: int = Field(2, ge=1, description="Workers of the local cluster (one thread each).")
    shard_size: int = Field(
        512, ge=1, description="Images per shard (rounded up to whole batches, so the batches equal the local pass's)."
    )
    shard_store: str | None = Field(
        None,
        description="Where shards write their part of the cache: an fsspec URL (s3://bucket/prefix) every worker and "
        "this process can reach; None: the cache folder itself (a local cluster, or a shared filesystem).",
    )


class HeadConfig(Section):
    """Feature-extraction training: the new classification head on cached features."""

    dense_units: int = Field(128, ge=0, description="Hidden ReLU units; 0 = a linear classifier (logistic regression).")
    dropout: float = Field(0.3, ge=0, lt=1)
    standardize: bool = Field(
        True, description="Standardise the pooled features (a Normalization layer adapted on the training rows)."
    )
    learning_rate: float = Field(3e-3, gt=0, description="Starting learning rate (Adam, or AdamW with weight_decay).")
    epochs: int = Field(200, ge=1, description="Upper bound: early stopping ends training at its plateau.")
    batch_size: int = Field(32, ge=1)
    patience: int = Field(10, ge=1, description="Early stopping on validation loss (the best epoch is kept).")
    lr_plateau_factor: float = Field(0.3, gt=0, lt=1, description="ReduceLROnPlateau: multiply the rate by this...")
    lr_plateau_patience: int = Field(3, ge=1, description="...after this many epochs without a better val_loss.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay; 0 = Adam.")
    label_smoothing: float = Field(0.0, ge=0, lt=1)


StageUnfreeze = Literal["block1", "block2", "block3", "block4", "block5", "all"]


class StageConfig(Section):
    """One fine-tuning stage: unfreeze the base from `unfreeze_from` upwards and train."""

    name: str | None = Field(None, description="Defaults to `unfreeze_from`; names the nested MLflow run.")
    unfreeze_from: StageUnfreeze
    learning_rate: float = Field(gt=0, description="Peak learning rate of the head's layers in this stage.")
    epochs: int = Field(10, ge=1)

    @property
    def label(self) -> str:
        return self.name or self.unfreeze_from


def _default_stages() -> list[StageConfig]:
    return [
        StageConfig(unfreeze_from="block5", learning_rate=1e-4, epochs=20),
    ]


class FinetuneConfig(Section):
    """Staged unfreezing; each stage starts from the best weights so far."""

    stages: list[StageConfig] = Field(default_factory=_default_stages)
    batch_size: int = Field(32, ge=1)
    patience: int = Field(
        10, ge=1, description="Early stopping on validation loss within a stage; the cosine settles in its last epochs."
    )
    # Validation loss, not accuracy: on a small validation split accuracy moves in steps of one
    # image and ties or flips on noise, while the loss ranks every prediction's confidence too; it
    # is also what early stopping keeps the best epoch by, so a stage is chosen by what it kept.
    selection_metric: Literal["val_accuracy", "val_loss"] = Field(
        "val_loss", description="Chooses the freeze configuration (head-only included)."
    )
    min_improvement: float = Field(
        0.0, ge=0, description="A stage must beat the best so far by more than this, else later stages are skipped."
    )
    stop_when_no_improvement: bool = Field(True, description="False runs every stage (the best one still wins).")
    cache_frozen_prefix: bool = Field(
        True, description="Train a stage on cached outputs of its frozen lower blocks instead of recomputing them."
    )
    prefix_cache_max_gb: float = Field(8.0, ge=0, description="Larger frozen-prefix caches are not built.")
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="Learning rate within a stage: linear warm-up, then cosine decay; or constant."
    )
    warmup_epochs: int = Field(1, ge=0, description="Linear warm-up from 0 (cosine); at most a stage's epochs.")
    final_lr_fraction: float = Field(0.0, ge=0, le=1, description="Where the cosine ends, as a fraction of the peak.")
    block_lr_multiplier: float = Field(
        1.0, gt=0, le=1, description="Discriminative rates: the top unfrozen block learns at this × the head's rate..."
    )
    lower_block_lr_decay: float = Field(0.3, gt=0, le=1, description="...and each block below it this much slower.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay; 0 = Adam.")
    label_smoothing: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _warmup_within_stages(self) -> FinetuneConfig:
        if self.schedule == "cosine":
            for index, stage in enumerate(self.stages):
                if self.warmup_epochs > stage.epochs:
                    raise ValueError(
                        f"warmup_epochs ({self.warmup_epochs}) is longer than stage {stage.label}'s "
                        f"{stage.epochs} epochs (finetune.stages.{index}.epochs): shorten the warm-up"
                    )
        return self

    @field_validator("stages")
    @classmethod
    def _unique_stage_names(cls, stages: list[StageConfig]) -> list[StageConfig]:
        labels = [s.label for s in stages]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(duplicates)} (set `name:`)")
        if "head" in labels:
            raise ValueError("`head` is reserved for the feature-extraction stage")
        return stages


class AugmentConfig(Section):
    """Random augmentation of the training images, for the stages that see images (never at inference).

    A stage that augments cannot train on cached frozen-block outputs: it streams images.
    """

    translate: float = Field(0.0, ge=0, lt=0.5, description="Random shift, as a fraction of the image side; 0 = off.")
    flip: Literal["none", "horizontal"] = Field("none", description="Random mirror; only where labels allow it.")

    @property
    def enabled(self) -> bool:
        return self.translate > 0 or self.flip != "none"


class EvaluateConfig(Section):
    """Test-split evaluation."""

    batch_size: int = Field(32, ge=1)
    worst_examples: int = Field(16, ge=0, description="Misclassified test images shown in the report grid.")


class TrackingConfig(Section):
    """MLflow tracking store; `MLFLOW_TRACKING_URI` overrides `uri`."""

    uri: str = Field("sqlite:///mlflow/mlflow.db")
    artifact_root: Path = Field(Path("mlflow/artifacts"), description="Artifact location of experiments created here.")
    experiment: str = Field("vggflow")

    @property
    def effective_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or self.uri


Metric = Literal["accuracy", "macro_f1"]


class RegistryConfig(Section):
    """Model registration and the champion/challenger promotion gate."""

    model_name: str = Field("vgg19-classifier", min_length=1)
    promote: bool = Field(True, description="False registers the version without touching aliases.")
    primary_metric: Metric = "accuracy"
    min_delta: float = Field(0.0, ge=0, description="Required improvement over the champion on the primary metric.")
    thresholds: dict[Metric, float] = Field(
        default_factory=lambda: {"accuracy": 0.5}, description="Absolute minimum test metrics."
    )
    lock_url: str | None = Field(
        None,
        description="postgresql://USER@HOST:PORT/DB: promotions take a PostgreSQL advisory lock there, shared by "
        "every client of a shared registry (password from PGPASSFILE). None: a file lock beside the sqlite store.",
    )

    @field_validator("lock_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql://user@host:port/database URL (or null)")
        if value and "@" in value and ":" in value.split("://", 1)[1].split("@", 1)[0]:
            raise ValueError("must not contain a password: put it in a PGPASSFILE (see docs/production.md)")
        return value or None


StackService = Literal["postgres", "s3", "mlflow", "prefect", "dask"]


def _default_stack_ports() -> dict[str, int]:
    return {"postgres": 15432, "s3": 15900, "mlflow": 15500, "prefect": 15420, "dask": 15786}


class StackConfig(Section):
    """The shared production stack that `vggflow stack up` starts on this machine (docs/production.md)."""

    dir: Path = Field(Path(".vggflow/stack"), description="Its databases, objects, logs, state and credentials.")
    ports: dict[StackService, int] = Field(
        default_factory=_default_stack_ports, description="First choice per service; the next free port when taken."
    )
    bucket: str = Field("vggflow", min_length=3, description="Object-store bucket: MLflow artifacts, DVC, shards.")
    work_pool: str = Field("vggflow-process", description="Prefect process work pool (as in prefect.yaml).")
    dask_workers: int = Field(0, ge=0, description="Dask workers started with the stack (0: no Dask cluster).")
    startup_timeout: float = Field(300.0, gt=0, description="Seconds each service may take to become healthy.")

    @field_validator("ports")
    @classmethod
    def _every_service_has_a_port(cls, ports: dict[str, int]) -> dict[str, int]:
        if any(not 1024 <= port <= 65535 for port in ports.values()):
            raise ValueError("ports must be between 1024 and 65535")
        return _default_stack_ports() | ports  # a service left out keeps its default


class ScheduleConfig(Section):
    """Scheduled retraining (a Prefect deployment)."""

    cron: str = "0 3 * * *"
    timezone: str = "UTC"
    deployment_name: str = "nightly"


class Config(BaseModel):
    """The whole configuration."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    seed: int = Field(42, description="Seeds the split, weight initialisation and training.")
    work_dir: Path = Field(Path(".vggflow"), description="Reports, checkpoints and run state (safe to delete).")
    data: DataConfig = Field(default_factory=DataConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    stack: StackConfig = Field(default_factory=StackConfig)
    sweep: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Head/stage configurations trained side by side, each mapping head.* / finetune.* keys to values; "
        "the best on validation data is evaluated and gated. Empty: the configuration above alone.",
    )

    @model_validator(mode="after")
    def _sweep_configurations_are_valid(self) -> Config:
        for index, overrides in enumerate(self.sweep):
            bad = [key for key in overrides if not key.startswith(SWEEP_SECTIONS) or key in SWEEP_FIXED]
            if bad or not overrides:
                raise ValueError(
                    f"sweep item {index}: {', '.join(bad) or 'empty'}: each item sets head.* / finetune.* keys "
                    f"(not {', '.join(sorted(SWEEP_FIXED))}, which every configuration is compared on)"
                )
        if self.sweep:
            self.trial_configs()  # every configuration must be a valid config
        return self

    def trial_configs(self) -> list[Config]:
        """One config per ``sweep`` item: this one with the item's values (and no sweep).

        Raises:
            ValueError: an item's key or value is invalid, naming the item.
        """
        if not self.sweep:
            return []
        defaults = _default_tree()
        configs = []
        for index, overrides in enumerate(self.sweep):
            tree = self.model_dump(mode="json") | {"sweep": []}
            try:
                for key, value in overrides.items():
                    apply_override(tree, key.split("."), value, f"sweep item {index}", defaults)
                configs.append(Config.model_validate(tree))
            except ConfigError as err:
                raise ValueError(f"sweep item {index} ({overrides}): {err}") from None
            except ValidationError as err:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
                raise ValueError(f"sweep item {index} ({overrides}): {problems}") from None
        return configs

    def with_absolute_paths(self) -> Config:
        """This config with its folders made absolute (data, feature cache, work folder): for Dask workers."""
        return self.model_copy(
            update={
                "work_dir": Path(self.work_dir).resolve(),
                "data": self.data.model_copy(update={"dir": Path(self.data.dir).resolve()}),
                "features": self.features.model_copy(update={"cache_dir": Path(self.features.cache_dir).resolve()}),
            }
        )

    @model_validator(mode="after")
    def _augmentation_fits_the_image(self) -> Config:
        shift = self.augment.translate * self.backbone.image_size
        if 0 < shift < 1:
            raise ValueError(
                f"augment.translate {self.augment.translate} shifts images of {self.backbone.image_size} px by "
                f"less than one pixel: use at least {1 / self.backbone.image_size:.3g}, or 0 to turn it off"
            )
        return self

    def as_yaml(self) -> str:
        """The effective config, as YAML (what gets logged)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat_params(self) -> dict[str, str]:
        """The effective config flattened to ``section.key`` → string, for MLflow params."""
        return {key: str(value) for key, value in flatten(self.model_dump(mode="json")).items()}


#: What a sweep item may set, and what it may not (the trials are compared on it).
SWEEP_SECTIONS = ("head.", "finetune.")
SWEEP_FIXED = {"finetune.selection_metric"}


@functools.lru_cache(maxsize=1)
def _default_tree() -> dict[str, Any]:
    """The built-in defaults as a plain tree, computed once (sweep items fill missing parts from it; never mutated)."""
    return Config().model_dump(mode="json")


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    environ: dict[str, str] | None = None,
    values: dict[str, Any] | None = None,
) -> Config:
    """Build the effective config.

    Args:
        path: YAML file, or None for the defaults.
        overrides: ``section.key=value`` strings (values parsed as YAML), applied after the environment.
        environ: environment to read ``VGGFLOW__SECTION__KEY`` overrides from (default: os.environ).
        values: ``{"section.key": value}`` set last, as typed values (a command's own options such as
            ``--data``); None values are skipped.

    Raises:
        ConfigError: unreadable file, bad YAML, unknown key or invalid value, naming the culprit.
    """
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        tree = loaded or {}
    environ = os.environ if environ is None else environ
    defaults = Config().model_dump(mode="json")
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX):
            dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
            key_path, value = parse_override(f"{dotted}={environ[name]}", f"environment variable {name}")
            apply_override(tree, key_path, value, f"environment variable {name}", defaults)
    for text in overrides:
        key_path, value = parse_override(text, f"--set {text}")
        apply_override(tree, key_path, value, f"--set {text}", defaults)
    given = {key: value for key, value in (values or {}).items() if value is not None}
    for key, value in given.items():
        apply_override(tree, key.split("."), value.as_posix() if isinstance(value, Path) else value, key, defaults)
    if overrides or given or any(n.startswith(ENV_PREFIX) for n in environ):
        source += " + overrides"
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
