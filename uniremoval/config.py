"""Typed configuration: one pydantic model per stage, loaded from YAML with `extends` and overrides.

A config file names its stage (`stage: teacher|cache|kt|da|eval`) and may extend one or more base
files (paths relative to the file). Mappings merge key by key; lists and scalars replace. Dotted
command-line overrides (`optim.lr=1e-4 data.train.0.weight=2`) apply last, their values parsed as
YAML. Every error names the file (or override), the dotted key, the bad value and what is allowed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from uniremoval.errors import ConfigError

DEFAULT_DEGRADATIONS = ["haze", "rain", "blur"]
CLEAR = "clear"  # the degradation label of clean images (shards of clear photos)
# A degradation type names config keys (teachers.checkpoints.<type>, dotted on the command line), MLflow
# params, tags and metrics (which refuse '+' and others), and files (teacher-<type>): 'rain+fog' lost its
# teacher's param, and 'snow.v2' could not be set from the command line.
TYPE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def degradation_name_problem(name: str) -> str | None:
    """Why `name` cannot be a degradation type (None: it can)."""
    if TYPE_NAME.fullmatch(name):
        return None
    return ("a degradation type is letters, digits, '_' and '-', starting with a letter (it names config keys, "
            f"MLflow params and files), e.g. {_type_name_example(name)!r}")


def _checked_type_name(name: str) -> str:
    """`name` when it can be a degradation type, else the ValueError pydantic reports under its key."""
    if problem := degradation_name_problem(name):
        raise ValueError(f"{name!r}: {problem}")
    return name


def _type_name_example(name: str) -> str:
    fixed = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "type"
    return fixed if fixed[0].isalpha() else f"t{fixed}"


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated, and a
    boolean is not a number (pydantic's lax mode reads `data.batch_size=true` as 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v, info):
        # Per field, so that the error's location is the key (and its file or override is named).
        if isinstance(v, bool):
            field = cls.model_fields[info.field_name]
            kinds = set(getattr(field.annotation, "__args__", ()) or ()) | {field.annotation}
            if kinds & {int, float} and bool not in kinds:
                raise ValueError(f"{str(v).lower()} is a boolean; give a number")
        return v


# --------------------------------------------------------------------------- sections

InputRange = Literal["minus_one_one", "zero_one"]


# torch.compile modes whose compiled code replays CUDA graphs (stages/fast.py uses the same tuple).
CUDA_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


def preset_problem(arch: str, preset: str) -> str | None:
    """Why `preset` is not one of the registered architecture `arch`'s presets, or None."""
    from uniremoval.models import ARCH_SPECS

    presets = ARCH_SPECS[arch].presets
    if preset in presets:
        return None
    return f"is not a preset of model.arch={arch}: " + (f"choose one of {', '.join(presets)}" if presets else
                                                         "it has none, leave it out")


class ModelConfig(Strict):
    # A registered architecture that restores images (uniremoval/models/__init__.py: ARCH_SPECS).
    arch: str = "mprnet"
    # One of the architecture's presets; None: its default (MPRNet: deblur).
    preset: str | None = Field(None, validate_default=True)
    # The architecture's own options over its preset (MPRNet: n_feat, num_cab, ...: MPRNetConfig's fields),
    # saved in the checkpoint's JSON (model_kwargs) and rebuilt from it. Teachers and student share them.
    overrides: dict[str, Any] = Field(default_factory=dict)
    # Training in this project uses [-1, 1] images; official MPRNet checkpoints use [0, 1].
    input_range: InputRange = "minus_one_one"
    # Weights to start from: our .safetensors or an official MPRNet .pth (DA starts from KT's).
    init: str | None = None
    channels_last: bool = False
    compile: bool = False
    # torch.compile's mode: reduce-overhead and max-autotune replay CUDA graphs (no per-kernel launch
    # cost); bench/gpu.py times default and reduce-overhead side by side on a GPU.
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"] = "default"

    @field_validator("arch")
    @classmethod
    def _registered_restorer(cls, v: str) -> str:
        from uniremoval.models import restorers

        if v not in restorers():
            raise ValueError(f"{v!r} is not a registered architecture that restores images: choose one of "
                             f"{', '.join(restorers())} (a new one is registered in uniremoval/models/__init__.py's "
                             "ARCH_SPECS: README, Extending)")
        return v

    @field_validator("preset")
    @classmethod
    def _a_preset_of_the_arch(cls, v: str | None, info: ValidationInfo) -> str | None:
        arch = info.data.get("arch")
        if arch is None:  # the arch itself was refused: that is the error to read
            return v
        from uniremoval.models import ARCH_SPECS

        if v is None:
            return ARCH_SPECS[arch].default_preset
        if problem := preset_problem(arch, v):
            raise ValueError(f"{v!r} {problem}")
        return v


class FeatureNetConfig(Strict):
    """phi, the VGG-19 feature space of the image-grained contrastive losses."""

    weights: Literal["imagenet", "random"] = "imagenet"
    # A local copy of torchvision's vgg19-dcbb9e9d.pth; None looks in the torch hub cache.
    path: str | None = None
    layers: list[str] = Field(default_factory=lambda: ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"])
    # >= 0: a negative weight would turn its contrastive term into one the student maximises.
    layer_weights: list[Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0])

    @model_validator(mode="after")
    def _same_length(self):
        if len(self.layers) != len(self.layer_weights):
            raise ValueError(
                f"layers has {len(self.layers)} entries but layer_weights has {len(self.layer_weights)}; "
                "give one weight per layer"
            )
        return self


class DiscriminatorConfig(Strict):
    base_channels: int = Field(64, ge=1, le=1024)
    n_layers: int = Field(3, ge=1, le=6)
    norm: Literal["instance", "batch", "none"] = "instance"
    spectral_norm: bool = False


class DataSource(Strict):
    """One dataset: a shard directory (with manifest.json), a glob/brace pattern, or URLs."""

    name: str
    shards: list[str]
    degradation: str | None = None
    weight: float = Field(1.0, gt=0)
    # data.val only: validate on the set's first N samples (shard list order, then tar order),
    # the same images on any number of processes
    max_samples: int | None = Field(None, ge=1)

    @field_validator("degradation")
    @classmethod
    def _type_name(cls, v):
        return v if v is None else _checked_type_name(v)

    @field_validator("shards", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("shards")
    @classmethod
    def _not_empty(cls, v):
        if not v:
            raise ValueError("give at least one shard directory, pattern or URL")
        if any(not s.strip() for s in v):  # '' is the working directory as a path
            raise ValueError("an empty shard path; give a shard directory, pattern or URL")
        return v


class NamedSource(DataSource):
    """A source of data.train, data.clear or eval.data: its name also names files and folders (the cache's
    <cache.out>/<name>, eval's -<name>.json) and MLflow metrics and artifacts, so it holds no '/' ('../x'
    wrote outside cache.out) and nothing MLflow refuses (the run was spooled as if the server were down)."""

    @field_validator("name")
    @classmethod
    def _file_safe(cls, v):
        from uniremoval.tracking import dataset_name_fix, dataset_name_problem

        if problem := dataset_name_problem(v, slash=False):
            raise ValueError(f"{v!r}: a source's name names files and MLflow metrics, and {problem}; "
                             f"{dataset_name_fix(v, slash=False)}")
        return v


Domain = Literal["synthetic", "real"]  # = data.readers.DOMAINS (the samples' json `domain`); config imports no reader


class EvalSource(NamedSource):
    """A source of eval.data. `domain` files an image folder's scores in the report's tables (synthetic:
    Tables I-IV, real: Table V), as `eval --domain` does; shards carry theirs in their json, so it is
    refused for them when eval starts (which source is a folder is known only on disk)."""

    domain: Domain | None = None


class AugmentConfig(Strict):
    """The symmetries a training crop may be given, each switched on drawn with probability 1/2 (the
    same for every image of a sample and its cached feature grid)."""

    hflip: bool = True
    vflip: bool = True
    rot90: bool = True


def _refuse_max_samples(sources: list[DataSource], where: str) -> list[DataSource]:
    """max_samples caps a validation set (data.val) only: nothing else reads it, and a source of
    data.train, data.clear or eval.data with it was read whole, the cap silently ignored."""
    if capped := [s.name for s in sources if s.max_samples is not None]:
        raise ValueError(f"{where} source(s) {capped} set max_samples, which only data.val reads (a validation "
                         f"set's cap); here every sample would be read: remove it, or give shards holding the "
                         f"samples wanted")
    return sources


class DataConfig(Strict):
    degradations: list[str] = Field(default_factory=lambda: list(DEFAULT_DEGRADATIONS), min_length=1)
    train: list[NamedSource] = Field(default_factory=list)
    val: list[DataSource] = Field(default_factory=list)
    # Real clear images X_C for domain adaptation (any shards of clear photos).
    clear: list[NamedSource] = Field(default_factory=list)
    batch_size: int = Field(16, ge=1, le=4096)
    crop_size: int = Field(128, ge=16, le=4096)
    num_workers: int = Field(4, ge=0, le=256)
    # Each loader worker shuffles each source in a buffer of raw samples: up to shuffle_buffer of them
    # and at most shuffle_buffer_mb (null: no cap). Memory: workers x sources x the smaller of the two.
    shuffle_buffer: int = Field(1000, ge=0)
    shuffle_buffer_mb: float | None = Field(256, gt=0)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    bad_samples: Literal["skip", "fail"] = "skip"
    pin_memory: bool = True
    # Pixel size of the pooled-feature grid stored in caches; crops align to it.
    feature_cell: int = Field(16, ge=1, le=256)

    @field_validator("degradations")
    @classmethod
    def _unique_names(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"degradation names must be unique, got {v}")
        if CLEAR in v:
            raise ValueError(f"'{CLEAR}' is reserved for clean images and cannot be a degradation type")
        for name in v:
            _checked_type_name(name)
        return v

    @field_validator("train", "clear")
    @classmethod
    def _no_cap(cls, v, info):
        return _refuse_max_samples(v, f"data.{info.field_name}")

    @field_validator("val")
    @classmethod
    def _val_names(cls, v):
        # Each set logs val/<name>/psnr, and val/mean/psnr is the mean over the sets: a set named
        # "mean", or two of one name, overwrote another's score, and best.safetensors followed it.
        names = [s.name for s in v]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"validation set name(s) {twice} are given twice; each set logs val/<name>/*, so "
                             f"give each a name of its own")
        from uniremoval.tracking import VAL_MEAN, dataset_name_fix, dataset_name_problem

        if VAL_MEAN in names:
            raise ValueError(f"a validation set may not be named '{VAL_MEAN}': val/{VAL_MEAN}/psnr is the mean over "
                             "the sets; rename it")

        # MLflow refuses such a name in val/<name>/<metric>: the set would be scored and never logged.
        for n in names:
            if problem := dataset_name_problem(n):
                raise ValueError(f"validation set name {n!r}: MLflow metric names (val/<name>/<metric>) {problem}; "
                                 f"{dataset_name_fix(n)}")
        return v


class OptimConfig(Strict):
    name: Literal["adam", "adamw"] = "adam"
    lr: float = Field(2e-4, gt=0, le=1)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    # None: fused kernels on CUDA, multi-tensor foreach elsewhere; true: fused on CPU too.
    fused: bool | None = None

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v):
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"each beta must be in [0, 1), got {list(v)}")
        return v


class ScheduleConfig(Strict):
    name: Literal["constant", "cosine", "warmup_cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0)


class TrainConfig(Strict):
    epochs: int = Field(1, ge=1)
    steps_per_epoch: int = Field(1000, ge=1)
    # Stop early (e.g. a smoke test); None runs epochs * steps_per_epoch.
    max_steps: int | None = Field(None, ge=1)
    grad_accum: int = Field(1, ge=1)
    clip_grad_norm: float | None = Field(None, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    log_every: int = Field(10, ge=1)
    val_every: int = Field(1000, ge=1)
    image_every: int = Field(1000, ge=1)
    nonfinite: Literal["skip", "stop"] = "skip"
    max_nonfinite: int = Field(50, ge=0)
    cpu: bool = False
    # DDP: a model with parameters that a step leaves unused (an architecture's branch used only for the
    # feature, say) fails at the next step; true lets DDP search for them every step (slower). MPRNet
    # uses every parameter. Not part of the config hash: the gradients are the same.
    find_unused_parameters: bool = False

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v):
        # YAML 1.1 reads a bare `no` (in a file or `train.mixed_precision=no`) as False.
        return "no" if v is False else v


class CheckpointConfig(Strict):
    every_steps: int = Field(1000, ge=1)
    keep_last: int = Field(2, ge=1)
    # "auto" continues the newest checkpoint in the output dir; a path continues that one.
    resume: str | None = None


class TrackingConfig(Strict):
    enabled: bool = True
    # None: $MLFLOW_TRACKING_URI, else the embedded store sqlite:///<cwd>/mlflow.db.
    uri: str | None = None
    experiment: str | None = None  # None: the config's `project`
    run_name: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    # Copy each training run's exported weights (last/best) into its MLflow artifacts (weights/).
    log_weights: bool = True

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, v: str | None) -> str | None:
        from uniremoval.tracking import uri_problem

        problem = uri_problem(v) if v else None
        if problem:
            raise ValueError(problem)
        return v


class TeacherLossConfig(Strict):
    """MPRNet's own recipe: Charbonnier + edge loss over the three stage outputs."""

    charbonnier_eps: float = Field(1e-3, gt=0)
    edge_weight: float = Field(0.05, ge=0)


class KTLossConfig(Strict):
    pixel: Literal["l1", "charbonnier"] = "l1"
    a1: float = Field(0.5, ge=0)
    a1_decay: float = Field(0.99, gt=0, le=1)
    a2: float = Field(0.1, ge=0)
    tau: float = Field(1e-6, gt=0)
    use_icl: bool = True  # image-grained contrastive term L_ig
    use_fcl: bool = True  # feature-grained contrastive term L_fg
    # Negatives are inputs (image level) or other samples' student features (feature level);
    # detached by default so the loss pulls the anchor rather than pushing the negatives.
    negatives_grad: bool = False
    feature_negatives: Literal["all", "other_types"] = "all"


class DALossConfig(Strict):
    gan: Literal["lsgan", "vanilla", "hinge"] = "lsgan"
    l1: float = Field(0.5, ge=0)
    l1_decay: float = Field(0.99, gt=0, le=1)
    l2: float = Field(0.1, ge=0)
    l3: float = Field(0.1, ge=0)
    tau: float = Field(1e-6, gt=0)
    use_gan: bool = True
    use_idt: bool = True
    use_eicl: bool = True
    use_efcl: bool = True
    negatives_grad: bool = False
    # The student's outputs on clear images act as targets (detached); the identity loss is
    # what trains the student on clear images.
    positives_grad: bool = False


class TeachersConfig(Strict):
    # cached: targets and features from cache shards (data.train points at them);
    # online: teachers run on each batch (data.train points at synthetic shards).
    mode: Literal["cached", "online"] = "cached"
    # degradation name -> checkpoint (ours, or an official MPRNet .pth); null drops an entry a base
    # file set (mappings merge: a config of other types extending configs/cache.yaml had no other way
    # to leave out its rain and blur teachers, and was refused)
    checkpoints: dict[str, str | None] = Field(default_factory=dict)
    preset: str | None = None  # None: the student's preset (one of model.arch's: checked with it)

    @field_validator("checkpoints")
    @classmethod
    def _drop_nulls(cls, v: dict[str, str | None]) -> dict[str, str | None]:
        return {k: p for k, p in v.items() if p is not None}


class CacheOutConfig(Strict):
    out: str = "cache"
    # Consecutive samples of one image size share a teacher forward (memory grows with it).
    batch_size: int = Field(1, ge=1)
    # Autotune convolutions per image size: pays off for fixed-size sources (GoPro 1280x720),
    # costs a search per new size on sources of many sizes (Rain1400, RESIDE).
    cudnn_benchmark: bool = False
    # Threads that PNG-encode the teacher's outputs while it runs the next batch (plus one that
    # decodes the next inputs); 0 does all of it in between the teacher's batches.
    workers: int = Field(2, ge=0, le=64)
    # zlib level of the stored teacher PNGs: lossless at any level; 1 encodes a 720p image ~4.6x
    # faster than 6 for ~17% more bytes (README "Speed").
    png_level: int = Field(1, ge=0, le=9)


class ValIQAConfig(Strict):
    """No-reference IQA on held-out real images during domain adaptation."""

    metrics: list[str] = Field(default_factory=lambda: ["piqe"])
    max_images: int = Field(16, ge=1)  # per set: its first N images (or max_samples, if fewer)

    @field_validator("metrics")
    @classmethod
    def _no_reference(cls, v):
        # Checked here: the scorer is built at the first validation, train.val_every steps into the run.
        from uniremoval.eval.metrics import METRICS  # no torch at import: config stays cheap

        allowed = [name for name, info in METRICS.items() if info.kind == "nr"]
        bad = [name for name in v if name not in allowed]
        if bad:
            raise ValueError(f"{bad} not allowed: the real validation images are unpaired, so use no-reference "
                             f"metrics: {', '.join(allowed)}")
        return v


class EvalConfig(Strict):
    checkpoint: str | None = None
    data: list[EvalSource] = Field(default_factory=list)
    metrics: list[str] = Field(default_factory=lambda: ["brisque", "piqe"])
    save_images: str | None = None

    @field_validator("data")
    @classmethod
    def _no_cap(cls, v):
        return _refuse_max_samples(v, "eval.data")

    @field_validator("data")
    @classmethod
    def _names(cls, v):
        # Each source is one run eval-<name> writing -<name>.json/.csv and <save_images>/<name>/: a name
        # given twice overwrote the other's files (silently); a '/' in it made paths of folders (NamedSource).
        names = [s.name for s in v]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"eval.data name(s) {twice} are given twice; each source writes files and an MLflow "
                             f"run of its name, so give each a name of its own")
        return v

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v):
        # Checked here, so the error names the key (and the file or --set override) like any other.
        from uniremoval.errors import UniremovalError
        from uniremoval.eval.metrics import parse_metrics  # no torch at import: config stays cheap

        try:
            return parse_metrics(v)
        except UniremovalError as exc:
            raise ValueError(str(exc)) from None


# --------------------------------------------------------------------------- stages


class StageBase(BaseModel):
    # The sections' rules without their boolean check: this level holds no number, and pydantic refuses
    # a before-validator on every field here (it would include the `stage` discriminator).
    model_config = Strict.model_config

    project: str = Field("uniremoval", min_length=1)
    name: str = Field("default", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    output_dir: str = "outputs"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("name")
    @classmethod
    def _a_folder_of_its_own(cls, v):
        # The run's folder under output_dir: `.` and `..` would put it in or above output_dir.
        if v in (".", ".."):
            raise ValueError(f"{v!r} is not a run folder name: the run would be written outside output_dir/<name>")
        return v

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


class TeacherStage(StageBase):
    stage: Literal["teacher"]
    degradation: str
    loss: TeacherLossConfig = Field(default_factory=TeacherLossConfig)

    @field_validator("degradation")
    @classmethod
    def _type_name(cls, v):
        return _checked_type_name(v)


class CacheStage(StageBase):
    stage: Literal["cache"]
    teachers: TeachersConfig = Field(default_factory=TeachersConfig)
    cache: CacheOutConfig = Field(default_factory=CacheOutConfig)

    @model_validator(mode="after")
    def _no_cuda_graphs(self):
        # A replayed graph writes each batch's outputs into the same memory, while the encoder
        # threads still read the previous batch's: refused rather than copied (graphs save launch
        # time, which full frames do not spend).
        if self.model.compile and self.model.compile_mode in CUDA_GRAPH_COMPILE_MODES:
            raise ValueError(f"model.compile_mode={self.model.compile_mode} replays CUDA graphs, which the cache "
                             "does not use; set model.compile_mode=default (or max-autotune-no-cudagraphs)")
        return self


class KTStage(StageBase):
    stage: Literal["kt"]
    teachers: TeachersConfig = Field(default_factory=TeachersConfig)
    loss: KTLossConfig = Field(default_factory=KTLossConfig)
    features: FeatureNetConfig = Field(default_factory=FeatureNetConfig)


class DAStage(StageBase):
    stage: Literal["da"]
    loss: DALossConfig = Field(default_factory=DALossConfig)
    features: FeatureNetConfig = Field(default_factory=FeatureNetConfig)
    discriminator: DiscriminatorConfig = Field(default_factory=DiscriminatorConfig)
    optim_d: OptimConfig = Field(default_factory=OptimConfig)
    val_iqa: ValIQAConfig = Field(default_factory=ValIQAConfig)


class EvalStage(StageBase):
    stage: Literal["eval"]
    eval: EvalConfig = Field(default_factory=EvalConfig)


StageConfig = Annotated[
    TeacherStage | CacheStage | KTStage | DAStage | EvalStage, Field(discriminator="stage")
]
STAGES = ("teacher", "cache", "kt", "da", "eval")
_ADAPTER = TypeAdapter(StageConfig)
_STAGE_MODELS: dict[str, type[StageBase]] = {
    "teacher": TeacherStage,
    "cache": CacheStage,
    "kt": KTStage,
    "da": DAStage,
    "eval": EvalStage,
}


# --------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice in one mapping is an error: PyYAML keeps the last one
    and drops the other without a word (two `optim:` sections lose the first one's settings)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (first at line {seen[key]}); "
                    f"keep one of them", key_node.start_mark)
            if isinstance(key, (str, int, float, bool)):
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict:
    if path.is_dir():
        raise ConfigError(f"config {path} is a folder; give a YAML file (e.g. {path / 'kt.yaml'})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # safe: a SafeLoader
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); is it a YAML config?") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    """A copy of `base` with `over` laid on top: nested mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def flatten_keys(d: Any, prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1e-4, 'betas': [0.9, 0.99]}} -> {'optim.lr': 1e-4, 'optim.betas': [0.9, 0.99]};
    an empty mapping stays a value."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten_keys(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: d}
    return {prefix[:-1]: d}


def _load_layers(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict, dict[str, Path]]:
    """Resolve `extends` chains. Returns the merged mapping and, per leaf key, the file that set it."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"{path}: 'extends' forms a cycle: {chain}")
    data = _read_yaml(path)
    bases = data.pop("extends", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: key 'extends' must be a file path or a list of paths, got {bases!r}")
    merged: dict = {}
    origin: dict[str, Path] = {}
    for base in bases:
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.is_file():
            raise ConfigError(f"{path}: key 'extends': base file not found: {base_path}")
        layer, layer_origin = _load_layers(base_path, (*seen, path))
        merged = deep_merge(merged, layer)
        _set_origin(origin, layer_origin)
    merged = deep_merge(merged, data)
    _set_origin(origin, {k: path for k in flatten_keys(data)})
    return merged, origin


def _set_origin(origin: dict[str, Path], later: dict[str, Path]) -> None:
    """Record a later layer's keys, moved to the end: `origin`'s order is then the order the keys were
    last set in, and its last entries under a section are the layer that touched it last."""
    for k, p in later.items():
        origin.pop(k, None)
        origin[k] = p


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value (e.g. optim.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key part in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _apply_override(data: dict, parts: list[str], value: Any, text: str) -> None:
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, parts[: i + 1], text)]
            continue
        if part not in node or node[part] is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"override {text!r}: key '{where}' holds a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, parts, text)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, parts: list[str], text: str) -> int:
    where = ".".join(parts)
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ConfigError(f"override {text!r}: '{where}' needs a list index in 0..{len(node) - 1}, got {part!r}")
    return int(part)


def _allowed_keys(model: type[BaseModel] | None, loc: tuple) -> list[str] | None:
    """Walk a pydantic model along an error location to list the keys valid there."""
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _model_of(field.annotation)
    return sorted(model.model_fields) if model is not None else None


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _source_of(key: str, origin: dict[str, Path], overrides: dict[str, str], path: Path) -> str:
    """The override or file that set dotted `key`: the one that set the key itself or a section above
    it (overrides apply after every file); for an error about a whole section, the last one that set a
    key inside it (the later layer wins, so it is the likeliest cause)."""
    above = [k for k in overrides if k == key or key.startswith(k + ".")]
    if above:
        return f"override {overrides[above[-1]]!r}"
    above = [k for k in origin if k == key or key.startswith(k + ".")]
    if above:
        return str(origin[above[-1]])
    below = [k for k in overrides if k.startswith(key + ".")]
    if below:
        return f"override {overrides[below[-1]]!r}"
    below = [k for k in origin if k.startswith(key + ".")]
    return str(origin[below[-1]]) if below else str(path)


def file_errors(exc: ValidationError, model: type[BaseModel], path: Path) -> str:
    """A validation error of one YAML file read as `model` (not a stage config: the demo's plan), in the
    stage configs' words: one line per key, unknown keys with the keys allowed there."""
    return _format_errors(exc, None, {}, {}, path, model)


def _format_errors(exc: ValidationError, stage: str | None, origin: dict[str, Path], overrides: dict[str, str],
                   path: Path, model: type[BaseModel] | None = None) -> str:
    model = model or _STAGE_MODELS.get(stage or "")
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        if loc and loc[0] == stage and model is not None:
            loc = loc[1:]  # the discriminated union prefixes the tag
        key = ".".join(str(p) for p in loc) or "(top level)"
        source = _source_of(key, origin, overrides, path)
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1])
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"{source}: unknown key '{key}'{hint}")
        elif err["type"] == "missing":
            lines.append(f"{source}: required key '{key}' is missing")
        elif not loc or isinstance(err.get("input"), dict):
            # a check across keys of the config or of a section: its message names the keys, and the
            # whole section's values are no help
            where = f"section '{key}': " if loc else ""
            lines.append(f"{source}: {where}{err['msg'].removeprefix('Value error, ')}")
        else:
            value = err.get("input")
            hint = ""
            if err["type"] == "string_type" and isinstance(value, (bool, int, float)):
                # YAML read the text as a number or bool: quoting keeps it text
                # (the text as written is not known for an element: YAML turned no/off into False, 1.10 into
                # 1.1, 0x10 into 16, so no re-dumped value is offered as the fix)
                read = f"{type(value).__name__} {value!r}"
                if source.startswith("override") and key in overrides:
                    hint = f" (the override was read as YAML, giving {read}: quote the text, e.g. " \
                           f"{key}='\"{overrides[key].split('=', 1)[-1]}\"')"
                elif source.startswith("override"):  # an element of a list or mapping the override gave whole
                    hint = f" (the override was read as YAML, giving {read}: put that element in quotes as you wrote it)"
                else:
                    hint = f" (YAML read the text as {read}: put it in quotes as you wrote it)"
            lines.append(f"{source}: key '{key}': bad value {value!r}: {err['msg']}{hint}")
    return "invalid config:\n  " + "\n  ".join(lines)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), stage: str | None = None):
    """Load, merge, override and validate a stage config. Raises ConfigError with named keys."""
    path = Path(path)
    data, origin = _load_layers(path)
    override_texts: dict[str, str] = {}
    for text in overrides:
        parts, value = parse_override(text)
        _apply_override(data, parts, value, text)
        override_texts[".".join(parts)] = text
    if stage is not None:
        data.setdefault("stage", stage)
    found = data.get("stage")
    if found not in STAGES:
        src = f"override {override_texts['stage']!r}" if "stage" in override_texts else str(path)
        if found is None:  # a base file (configs/base.yaml) that stage configs extend
            raise ConfigError(f"{path} has no 'stage' key, so it is no stage config (a base file that stage "
                              f"configs `extends:`?): give a file with `stage: {'|'.join(STAGES)}`, such as "
                              f"configs/kt.yaml, or add the key")
        raise ConfigError(f"{src}: key 'stage' must be one of {', '.join(STAGES)}, got {found!r}")
    if stage is not None and found != stage:
        raise ConfigError(f"{path}: this is a '{found}' config, but the command needs a '{stage}' config")
    try:
        cfg = _ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, found, origin, override_texts, path)) from None
    bad = _cross_field_errors(cfg)
    if bad:
        lines = [f"{_source_of(key, origin, override_texts, path)}: key '{key}': bad value {value!r}: {allowed}"
                 for key, value, allowed in bad]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines))
    return cfg


def _cross_field_errors(cfg: StageBase) -> list[tuple[str, Any, str]]:
    """Checks that span sections, as (dotted key, value, what is allowed). Found here, they stop a
    run before anything starts; the loaders would only raise them after the MLflow run began."""
    out: list[tuple[str, Any, str]] = []
    from uniremoval.models import ARCH_SPECS

    arch = ARCH_SPECS[cfg.model.arch]  # what the architecture takes (a crop multiple, its presets)
    if cfg.data.crop_size % arch.size_multiple:
        fits = max(cfg.data.crop_size // arch.size_multiple * arch.size_multiple, arch.size_multiple)
        out.append(("data.crop_size", cfg.data.crop_size,
                    f"must be a multiple of {arch.size_multiple} for model.arch={cfg.model.arch} (e.g. {fits})"))
    # the teachers share the student's architecture: their preset is one of its
    teachers = cfg.teachers.preset if isinstance(cfg, (KTStage, CacheStage)) else None
    if teachers is not None and (problem := preset_problem(cfg.model.arch, teachers)):
        out.append(("teachers.preset", teachers, problem))
    sch, t = cfg.schedule, cfg.train
    horizon = t.epochs * t.steps_per_epoch  # the schedule's span (Trainer.schedule_horizon)
    if sch.name == "warmup_cosine" and sch.warmup_steps > horizon:
        # e.g. MPRNet's recipe (1500 = 3 x 500) kept with fewer steps per epoch: the LR only ever rose,
        # never reaching optim.lr nor decaying, silently
        out.append(("schedule.warmup_steps", sch.warmup_steps,
                    (f"is longer than the run, train.epochs x train.steps_per_epoch = {horizon} steps: the LR "
                     f"would never reach optim.lr nor decay; lower it (MPRNet's recipe: 3 x train.steps_per_epoch"
                     + (f" = {3 * t.steps_per_epoch})" if 3 * t.steps_per_epoch < horizon else ")"))))
    if isinstance(cfg, (KTStage, CacheStage)):  # a misspelt type would leave the real one's old teacher in use
        for deg, path in cfg.teachers.checkpoints.items():
            if deg not in cfg.data.degradations:
                out.append((f"teachers.checkpoints.{deg}", path,
                            (f"names no type of data.degradations {cfg.data.degradations}: add '{deg}' to "
                             f"data.degradations (a type of your own), or drop the entry (one a base file sets: "
                             f"teachers.checkpoints.{deg}=null)")))
    if isinstance(cfg, TeacherStage):
        # A teacher leaves out the sources of other types (one list may serve every teacher), so a
        # misspelt type dropped that source, or the only validation set (then no best.safetensors), silently.
        known = [cfg.degradation, *(d for d in cfg.data.degradations if d != cfg.degradation)]
        for section in ("train", "val"):
            for i, src in enumerate(getattr(cfg.data, section)):
                if src.degradation is not None and src.degradation not in known:
                    why = (f"names neither the teacher's degradation nor a type of data.degradations: one of "
                           f"{known} (a teacher leaves other types' sources out)")
                    out.append((f"data.{section}.{i}.degradation", src.degradation, why))
    if not isinstance(cfg, (KTStage, DAStage)):
        return out  # a teacher trains cfg.degradation; the cache pairs sources with teachers.checkpoints
    degs = cfg.data.degradations
    for section in ("train", "val"):
        for i, src in enumerate(getattr(cfg.data, section)):
            if src.degradation is not None and src.degradation not in degs:
                out.append((f"data.{section}.{i}.degradation", src.degradation,
                            f"must be one of data.degradations {degs}"))
    # Every batch holds one sample of each type (pipelines._Mixer): found here rather than by the
    # loader, which raised it only after the run folder and a FAILED MLflow run were made.
    if cfg.data.batch_size < len(degs):
        least = (f"must be at least the number of types in data.degradations {degs} ({len(degs)}): every batch "
                 "holds one sample of each (data.batch_size is per process)")
        out.append(("data.batch_size", cfg.data.batch_size, least))
    covered = {src.degradation for src in cfg.data.train}
    missing = [d for d in degs if d not in covered]
    if cfg.data.train and missing:
        fix = (f"has no source for {missing} of data.degradations {degs}; every batch holds every type: add a "
               f"source with degradation: {missing[0]}, or drop it from data.degradations")
        out.append(("data.train", [src.name for src in cfg.data.train], fix))
    if isinstance(cfg, DAStage):
        # The student's loss must hold a term with a weight: with none the first backward raised a
        # traceback after the run started; with weights of 0 the run trained nothing, silently.
        lc = cfg.loss
        if not (lc.use_gan or (lc.use_idt and lc.l2 > 0)
                or (lc.l3 > 0 and (lc.use_eicl or (lc.use_efcl and lc.l1 > 0)))):
            terms = {k: getattr(lc, k) for k in ("use_gan", "use_idt", "use_eicl", "use_efcl", "l1", "l2", "l3")}
            why = ("leaves no term of L_da with a weight, so nothing would train: turn on use_gan, or use_idt "
                   "with l2 > 0, or use_eicl/use_efcl with l3 > 0 (and l1 > 0 for use_efcl)")
            out.append(("loss", terms, why))
        from uniremoval.models.discriminator_arch import min_input_size

        least = min_input_size(cfg.discriminator.n_layers)
        if cfg.data.crop_size < least:
            why = (f"must be at least {least} for the PatchGAN discriminator with discriminator.n_layers="
                   f"{cfg.discriminator.n_layers} (each layer halves the crop; lower n_layers for smaller crops)")
            out.append(("data.crop_size", cfg.data.crop_size, why))
    if isinstance(cfg, KTStage) and cfg.loss.use_fcl and cfg.loss.a1 > 0 and cfg.loss.a2 > 0:
        # L_fg's negatives are the features of the batch's other samples (of other types only, with
        # other_types): with none the term is -log 1 = 0 at every step, and the run looked healthy.
        if cfg.loss.feature_negatives == "other_types" and len(degs) < 2:
            why = (f"with one type in data.degradations {degs} leaves L_fg (use_fcl) no negative: it would be 0 at "
                   "every step; use loss.feature_negatives=all, or loss.use_fcl=false")
            out.append(("loss.feature_negatives", cfg.loss.feature_negatives, why))
        elif cfg.data.batch_size < 2:
            why = ("leaves L_fg (use_fcl) no negative, the other samples of the batch: it would be 0 at every step; "
                   "use data.batch_size=2 or more, or loss.use_fcl=false")
            out.append(("data.batch_size", cfg.data.batch_size, why))
    if isinstance(cfg, KTStage) and cfg.teachers.mode == "cached" and cfg.data.crop_size % cfg.data.feature_cell:
        grid = f"must be a multiple of data.feature_cell={cfg.data.feature_cell} (cached teacher features are " \
            "cropped on that grid)"
        out.append(("data.crop_size", cfg.data.crop_size, grid))
    return out


def config_to_dict(cfg: BaseModel) -> dict:
    return cfg.model_dump(mode="json")


def config_to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# Fields that change where or how a run is observed, not what it computes.
_HASH_EXCLUDE = {"tracking", "checkpoint", "output_dir"}


def _identity(data: dict) -> dict:
    """What a run computes: a config dict without where it is written and observed, max_steps
    (stopping early does not change what is trained) or how DDP finds its gradients."""
    out = {k: v for k, v in data.items() if k not in _HASH_EXCLUDE}
    if isinstance(out.get("model"), dict) and not out["model"].get("overrides"):
        # none given: hashed as before the setting existed (the hashes of earlier runs still compare)
        out["model"] = {k: v for k, v in out["model"].items() if k != "overrides"}
    if isinstance(out.get("train"), dict):
        out["train"] = {k: v for k, v in out["train"].items() if k not in ("max_steps", "find_unused_parameters")}
    return out


def config_hash(cfg: BaseModel) -> str:
    """Short sha256 of the resolved config, ignoring tracking/checkpoint/output locations."""
    blob = json.dumps(_identity(config_to_dict(cfg)), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# What a resumed run cannot change: the weights and optimiser state it continues belong to this
# architecture, these degradation types and this stage. Everything else may change with a warning.
# DA's loss.use_gan decides whether a discriminator and its optimiser are trained at all, loss.gan the
# objective its weights and optimiser state were trained for (and the run's `gan` tag). The other loss
# switches (ABLATION_SWITCHES) are the run's ablation row (its `ablation.*` tags, which eval copies and
# the report's Tables IV and V lay out): a resume that turned one on or off went on logging (e.g.
# train/fg) into a run, and exported weights, still tagged as the other row.
# A loss config's `use_*` fields are its switches: a term added with one is an ablation switch too.
KT_SWITCHES = tuple(n for n in KTLossConfig.model_fields if n.startswith("use_"))  # use_icl, use_fcl
DA_SWITCHES = tuple(n for n in DALossConfig.model_fields if n.startswith("use_"))  # use_gan, use_idt, ...
ABLATION_SWITCHES = tuple(f"loss.{n}" for n in dict.fromkeys(KT_SWITCHES + DA_SWITCHES) if n != "use_gan")
RESUME_FIXED = ("stage", "degradation", "model.arch", "model.preset", "model.overrides", "model.input_range",
                "data.degradations",
                "discriminator", "loss.use_gan", "loss.gan", *ABLATION_SWITCHES)


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()  # a setting one of two compared configs does not have


def config_changes(saved: dict, cfg: BaseModel) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for each setting that differs from a checkpoint's config,
    leaving out what the hash leaves out (where a run is written and observed, max_steps)."""
    old, new = flatten_keys(_identity(saved)), flatten_keys(_identity(config_to_dict(cfg)))
    return [(k, old.get(k, ABSENT), new.get(k, ABSENT)) for k in sorted(old.keys() | new.keys())
            if old.get(k, ABSENT) != new.get(k, ABSENT)]


def fixed_on_resume(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in RESUME_FIXED)


def run_name(cfg: StageBase) -> str:
    """A training run's name as MLflow shows it: tracking.run_name, else the config's name (its run folder)."""
    return cfg.tracking.run_name or cfg.name


def ablation_flags(cfg: BaseModel) -> dict[str, bool]:
    """The loss switches that identify an ablation row (Tables IV and V)."""
    loss = getattr(cfg, "loss", None)
    if isinstance(loss, KTLossConfig):
        return {k: getattr(loss, k) for k in KT_SWITCHES}
    if isinstance(loss, DALossConfig):
        return {k: getattr(loss, k) for k in DA_SWITCHES}
    return {}
