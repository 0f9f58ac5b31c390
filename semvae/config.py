"""Typed configuration: one dataclass per config group, registered with Hydra's ConfigStore.

The YAML files under ``conf/`` are merged onto these schemas, so a misspelt key or a value of the wrong type is
rejected by Hydra/OmegaConf while composing, before any work. ``validate`` then checks what types cannot express
(ranges, lengths, combinations) and names the offending key in its message.

Nothing here imports Hydra at module level except ``register_configs``; the library stays usable without it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from semvae.errors import InputError


class ConfigError(InputError, ValueError):
    """A configuration value is outside what the code accepts; the message names the key."""


class DatasetName(str, Enum):
    mnist = "mnist"
    fashion_mnist = "fashion_mnist"


class Directions(str, Enum):
    random = "random"  # uniform on the unit sphere
    axis = "axis"  # a random signed latent axis +-e_j


class TaskName(str, Enum):
    """The tasks of ``run.py``, one module each in ``semvae/tasks/``."""

    train_vae = "train_vae"  # train a VAE (any variant)
    train_classifier = "train_classifier"  # train the feature classifier phi (or the held-out judge)
    evaluate = "evaluate"  # compare trained VAEs on the test split
    reproduce = "reproduce"  # classifiers, every variant x seed, then the comparison


class JudgeName(str, Enum):
    train = "train"  # the classifier used by the semantic loss (classifier.checkpoint)
    heldout = "heldout"  # a second ResNet classifier never used by any loss (evaluation.heldout_checkpoint)
    mlp = "mlp"  # a multilayer perceptron, another architecture family, never used by any loss
    cnn = "cnn"  # a plain LeNet-style CNN (no residual path, no normalisation), never used by any loss
    morpho = "morpho"  # Morpho-MNIST morphometrics, standardised over the test set


# the classifier judges and the key of each one's model file (the morphometrics need none)
CLASSIFIER_JUDGES = {
    "train": "classifier.checkpoint",
    "heldout": "evaluation.heldout_checkpoint",
    "mlp": "evaluation.mlp_checkpoint",
    "cnn": "evaluation.cnn_checkpoint",
}


class ClassifierArch(str, Enum):
    """The classifier's architecture family (semvae/models.py, ``build_classifier``)."""

    resnet = "resnet"  # residual CNN with batch norm; widths = channels at 28, 14, 7 px (phi and the held-out judge)
    mlp = "mlp"  # multilayer perceptron; widths = hidden layer sizes
    cnn = "cnn"  # plain LeNet-style CNN; widths = (conv channels, conv channels, hidden units)


class LrSchedule(str, Enum):
    constant = "constant"
    cosine = "cosine"  # per step, from trainer.lr down to 0 at the last step


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"  # bfloat16 autocast for the training step; fp32 weights, optimiser state and loss reductions


class LoggerMode(str, Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class DataConfig:
    name: DatasetName = DatasetName.mnist
    root: str = "data"
    # Folder holding the dataset's canonical .gz files (for machines without internet); copied into root and
    # checked against torchvision's MD5 sums when the dataset is not under root yet.
    mirror: Optional[str] = None
    download: bool = True
    val_size: int = 2000  # images carved from the training split for validation
    split_seed: int = 0  # fixed for every run, so all runs share one validation split


@dataclass
class ModelConfig:
    latent_dim: int = 16
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])  # channels at 28, 14 and 7 pixels
    blocks: int = 1  # residual blocks per resolution


@dataclass
class ClassifierConfig:
    name: str = "classifier"
    arch: ClassifierArch = ClassifierArch.resnet
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    blocks: int = 1
    checkpoint: str = "weights/classifier.pth"  # where task=train_classifier exports it and the VAE loads it
    seed: Optional[int] = None  # training seed for task=train_classifier; None uses the run's seed
    augment_shift: int = 2  # random translation in pixels during classifier training
    epochs: Optional[int] = None  # of task=train_classifier; None: trainer.epochs (trainer=classifier: 8)

    def expected_architecture(self) -> dict[str, Any]:
        """What a model file must hold to be this classifier (``checkpoints.load_classifier``'s ``expect``)."""
        return {"arch": self.arch.value, "widths": list(self.widths), "blocks": self.blocks}


@dataclass
class SemanticConfig:
    directions: Directions = Directions.random  # random: uniform on the unit sphere; axis: a random signed latent axis
    step: float = 1.0  # delta, in prior standard deviations
    n_directions: int = 4  # K, drawn fresh every step and shared by all starting points
    n_points: Optional[int] = 32  # M starting points from the batch; None uses the whole batch
    normalize: bool = True  # the normalised form, in [0, 1]; false: the raw variance
    eps: float = 1e-8
    # under runtime.precision=bf16: decode and read the shifted codes in bf16 as well (the feature differences and
    # their reductions stay fp32); off, the semantic term runs in fp32. docs/METHOD.md states the measured tolerance
    reduced_precision: bool = False


@dataclass
class LossConfig:
    beta: float = 1.0
    semantic_weight: float = 0.0  # lambda
    semantic: SemanticConfig = field(default_factory=SemanticConfig)


@dataclass
class TrainerConfig:
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: LrSchedule = LrSchedule.constant
    log_every: int = 50  # optimiser steps between reads of the running losses (the only host syncs)
    checkpoint_every: Optional[int] = 500  # steps between mid-epoch checkpoints (at the next log point); null: epochs
    limit_train_batches: Optional[int] = None  # cut epochs short (smoke tests)
    limit_eval_batches: Optional[int] = None
    progress: bool = True  # a progress bar per epoch
    resume: Optional[str] = None  # checkpoint to continue from; null: the run dir's last.pt if there is one
    n_image_samples: int = 64  # reconstructions and prior samples logged as images


@dataclass
class RuntimeConfig:
    """Where every task computes (semvae/runtime.py): training and evaluation alike."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: Optional[int] = None  # torch intra-op threads; None: SLURM's cpus per task, else torch's default
    precision: Precision = Precision.fp32  # of the training step; evaluation always computes in fp32
    channels_last: bool = True  # NHWC memory format for the convolutions (faster on CPUs and tensor cores)


@dataclass
class LoggerConfig:
    mode: LoggerMode = LoggerMode.offline
    project: str = "semvae"
    entity: Optional[str] = None
    group: Optional[str] = None  # None: the sweep's directory name in a multirun, else no group
    tags: list[str] = field(default_factory=list)
    log_artifacts: bool = True
    init_timeout: float = 60.0  # seconds W&B may take to start before the run goes on without it


@dataclass
class PathsConfig:
    root_dir: str = "."
    data_dir: str = "data"
    weights_dir: str = "weights"
    output_dir: str = "outputs"


@dataclass
class TaskConfig:
    name: TaskName = TaskName.train_vae
    export: Optional[str] = None  # copy the final model here, e.g. weights/VAE_epoch50.pth
    overwrite: bool = False  # allow export to replace an existing file
    evaluate: bool = False  # task=train_vae: evaluate the trained VAE on the test split (evaluation.*) into test/*


# The classifiers experiment=reproduce can train (conf/classifier/ options); semvae.reproduce maps each to its file.
REPRODUCE_CLASSIFIERS = ("classifier", "judge", "mlp", "cnn")


@dataclass
class ReproduceConfig:
    """The study of task=reproduce (conf/reproduce/default.yaml, set by conf/experiment/reproduce.yaml)."""

    variants: list[str] = field(default_factory=lambda: ["vae", "beta", "semantic"])  # conf/variant/ options
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # seed 0 goes to weights/, the others to seeds/
    epochs: int = 50  # of every VAE; the exported file names say it
    classifiers: list[str] = field(default_factory=lambda: list(REPRODUCE_CLASSIFIERS))  # conf/classifier/ options
    classifier_epochs: Optional[int] = None  # None: each classifier's own (classifier.epochs, else trainer's)
    evaluate: bool = True  # compare every VAE on the test split at the end


@dataclass
class EvaluationConfig:
    checkpoints: list[str] = field(default_factory=list)  # VAE model files to compare
    heldout_checkpoint: str = "weights/judge.pth"
    mlp_checkpoint: str = "weights/judge_mlp.pth"  # the mlp judge (classifier=mlp)
    cnn_checkpoint: str = "weights/judge_cnn.pth"  # the cnn judge (classifier=cnn)
    judges: list[JudgeName] = field(default_factory=lambda: list(JudgeName))
    seed: int = 0  # fixes starting images, directions, pairs and ELBO noise: the same for every model
    n_points: int = 1000  # GSV starting points z_i = mu(x_i), test images
    morpho_points: int = 200  # starting points judged by the (slower, per-image) morphometrics
    n_random_directions: int = 64  # besides every latent axis +-e_j
    steps: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    # a (direction, step) whose mean squared change of a judge's reading is below this fraction of that reading's
    # spread over real images moves nothing: left out of the normalised GSV, counted in gsv_inactive_*. 0 keeps
    # every cell, the definition of docs/results.md (where a direction that changes nothing scores 0, the best)
    change_floor: float = 0.0
    # bootstrap resamples of the starting points behind every GSV's standard error (gsv_*_se): how much the GSV
    # would move with another draw of n_points test images. 0: no standard errors
    resamples: int = 200
    n_pairs: int = 8  # interpolation pairs
    interpolation_steps: int = 10
    traversal_range: float = 3.0  # traversals set each latent dim to values in [-range, range]
    traversal_steps: int = 9
    batch_size: int = 512
    limit_test: Optional[int] = None  # evaluate on the first N test images only (smoke tests)


@dataclass
class Config:
    seed: int = 0
    name: str = "VAE"  # run name; conf/config.yaml derives it from the loss setting (semvae.variants.run_name)
    # summary keys run.py returns, in order, for a sweeper to optimise (e.g. Optuna): [test/mse, ...]
    objectives: list[str] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    reproduce: ReproduceConfig = field(default_factory=ReproduceConfig)


def as_plain(obj: Any) -> Any:
    """A dataclass config as plain dicts, lists and scalars (enums by value), for JSON, W&B and checkpoints."""
    if dataclasses.is_dataclass(obj):
        return {f.name: as_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, list | tuple):
        return [as_plain(v) for v in obj]
    return obj


def register_configs() -> None:
    """Register the schemas so that ``conf/`` files are validated against them while composing."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from semvae.variants import run_name

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    OmegaConf.register_new_resolver(
        "run_name",
        lambda beta, weight, normalize=True: run_name(float(beta), float(weight), normalize in (True, "true", "True")),
        replace=True,
    )


def unknown_key_message(key: str, groups: tuple[str, ...] = ()) -> str | None:
    """None if the dotted ``key`` exists in the schema (or is a config group), else a message that lists the keys
    allowed where it went wrong and the closest match.

    Hydra rejects such a key too, but without saying which keys exist; run.py calls this first.
    """
    import difflib

    node: Any = Config
    parts = key.split(".")
    if parts[0] == "hydra" or key.split("/")[0] in groups and "." not in key:
        return None  # Hydra's own settings, or a group choice such as variant=semantic or hydra/launcher=...
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            return None  # below a leaf (e.g. a list index): leave it to OmegaConf
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            where = ".".join(parts[:depth]) or "the top level"
            allowed = sorted(set(fields) | (set(groups) if depth == 0 else set()))
            close = difflib.get_close_matches(part, allowed, n=1)
            hint = f"; did you mean '{'.'.join([*parts[:depth], close[0]])}'?" if close else ""
            return f"unknown config key '{key}': allowed keys at {where}: {', '.join(allowed)}{hint}"
        node = _field_type(node, fields[part])
    return None


def _field_type(owner: type, f: dataclasses.Field) -> Any:
    import typing

    return typing.get_type_hints(owner).get(f.name)


def _require(ok: bool, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {message}")


MAX_SEED = 2**63 - 1024

# ``name`` becomes part of a folder's name (hydra.run.dir), so it is a name, never a path
NAME = re.compile(r"[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]{0,119}")


def validate(cfg: Config) -> Config:
    """Check ranges and combinations that the types cannot express. Returns ``cfg``; raises ConfigError."""
    _require(
        isinstance(cfg.name, str) and NAME.fullmatch(cfg.name) is not None,
        "name",
        "must be a name, not a path: 1 to 120 of the characters A-Z a-z 0-9 . _ + = @ , - (not starting with a dot)",
        cfg.name,
    )
    seeds = {"seed": cfg.seed, "data.split_seed": cfg.data.split_seed, "evaluation.seed": cfg.evaluation.seed}
    if cfg.classifier.seed is not None:
        seeds["classifier.seed"] = cfg.classifier.seed
    for key, seed in seeds.items():  # torch takes 64-bit seeds; runs derive a few more from each (seed + 1, ...)
        _require(0 <= seed < MAX_SEED, key, "must be an integer in [0, 2**63 - 1024) (torch's seed range)", seed)
    _require(cfg.data.val_size >= 1, "data.val_size", "must be >= 1", cfg.data.val_size)
    m = cfg.model
    _require(m.latent_dim >= 1, "model.latent_dim", "must be >= 1", m.latent_dim)
    _require(len(m.widths) == 3, "model.widths", "needs 3 entries (channels at 28, 14, 7 px)", m.widths)
    _require(all(w >= 1 for w in m.widths), "model.widths", "entries must be >= 1", m.widths)
    _require(m.blocks >= 0, "model.blocks", "must be >= 0", m.blocks)
    c = cfg.classifier
    widths_meaning = {
        ClassifierArch.resnet: "needs 3 entries (channels at 28, 14, 7 px) for classifier.arch=resnet",
        ClassifierArch.cnn: "needs 3 entries (conv channels, conv channels, hidden units) for classifier.arch=cnn",
        ClassifierArch.mlp: "needs 1 or more entries (hidden layer sizes) for classifier.arch=mlp",
    }[c.arch]
    n_widths_ok = len(c.widths) >= 1 if c.arch == ClassifierArch.mlp else len(c.widths) == 3
    _require(n_widths_ok, "classifier.widths", widths_meaning, c.widths)
    _require(all(w >= 1 for w in c.widths), "classifier.widths", "entries must be >= 1", c.widths)
    _require(c.blocks >= 0, "classifier.blocks", "must be >= 0", c.blocks)
    _require(c.epochs is None or c.epochs >= 1, "classifier.epochs", "must be >= 1 or null", c.epochs)
    _require(0 <= c.augment_shift <= 8, "classifier.augment_shift", "must be in [0, 8] pixels", c.augment_shift)
    loss = cfg.loss
    _require(0 <= loss.beta < math.inf, "loss.beta", "must be finite and >= 0", loss.beta)
    _require(
        0 <= loss.semantic_weight < math.inf, "loss.semantic_weight", "must be finite and >= 0", loss.semantic_weight
    )
    s = loss.semantic
    _require(0 < s.step < math.inf, "loss.semantic.step", "must be finite and > 0", s.step)
    _require(s.n_directions >= 1, "loss.semantic.n_directions", "must be >= 1", s.n_directions)
    _require(
        s.n_points is None or s.n_points >= 2,
        "loss.semantic.n_points",
        "must be >= 2 (a variance needs two starting points) or null for the whole batch",
        s.n_points,
    )
    _require(s.eps > 0, "loss.semantic.eps", "must be > 0", s.eps)
    t = cfg.trainer
    _require(t.epochs >= 1, "trainer.epochs", "must be >= 1", t.epochs)
    _require(t.batch_size >= 2, "trainer.batch_size", "must be >= 2", t.batch_size)
    _require(0 < t.lr < math.inf, "trainer.lr", "must be finite and > 0", t.lr)
    _require(0 <= t.weight_decay < math.inf, "trainer.weight_decay", "must be finite and >= 0", t.weight_decay)
    _require(t.log_every >= 1, "trainer.log_every", "must be >= 1", t.log_every)
    _require(
        t.checkpoint_every is None or t.checkpoint_every >= 1,
        "trainer.checkpoint_every",
        "must be >= 1 or null",
        t.checkpoint_every,
    )
    _require(cfg.logger.init_timeout > 0, "logger.init_timeout", "must be > 0", cfg.logger.init_timeout)
    rt = cfg.runtime
    _require(rt.num_threads is None or rt.num_threads >= 1, "runtime.num_threads", "must be >= 1", rt.num_threads)
    for key in ("limit_train_batches", "limit_eval_batches"):
        value = getattr(t, key)
        _require(value is None or value >= 1, f"trainer.{key}", "must be >= 1 or null", value)
    _require(
        rt.device == "auto" or rt.device == "cpu" or rt.device.startswith("cuda"),
        "runtime.device",
        "allowed values: auto, cpu, cuda, cuda:N",
        rt.device,
    )
    e = cfg.evaluation
    _require(e.n_points >= 2, "evaluation.n_points", "must be >= 2", e.n_points)
    _require(
        2 <= e.morpho_points <= e.n_points,
        "evaluation.morpho_points",
        "must be in [2, evaluation.n_points]",
        e.morpho_points,
    )
    _require(e.n_random_directions >= 0, "evaluation.n_random_directions", "must be >= 0", e.n_random_directions)
    _require(len(e.steps) >= 1 and all(v > 0 for v in e.steps), "evaluation.steps", "needs values > 0", e.steps)
    _require(0 <= e.change_floor < 1, "evaluation.change_floor", "must be in [0, 1)", e.change_floor)
    _require(e.n_pairs >= 1, "evaluation.n_pairs", "must be >= 1", e.n_pairs)
    _require(e.interpolation_steps >= 2, "evaluation.interpolation_steps", "must be >= 2", e.interpolation_steps)
    _require(e.traversal_steps >= 2, "evaluation.traversal_steps", "must be >= 2", e.traversal_steps)
    _require(e.batch_size >= 1, "evaluation.batch_size", "must be >= 1", e.batch_size)
    resamples_ok = e.resamples == 0 or e.resamples >= 2
    _require(resamples_ok, "evaluation.resamples", "must be 0 (none) or >= 2", e.resamples)
    _require(
        e.limit_test is None or e.limit_test >= max(e.n_points, 2 * e.n_pairs),
        "evaluation.limit_test",
        "must be >= evaluation.n_points and 2 * evaluation.n_pairs, or null",
        e.limit_test,
    )
    _require(len(set(e.judges)) == len(e.judges), "evaluation.judges", "lists a judge twice", e.judges)
    r = cfg.reproduce
    _require(r.epochs >= 1, "reproduce.epochs", "must be >= 1", r.epochs)
    distinct = len(r.seeds) >= 1 and len(set(r.seeds)) == len(r.seeds)
    _require(distinct, "reproduce.seeds", "needs one or more distinct seeds", r.seeds)
    unknown = sorted(set(r.classifiers) - set(REPRODUCE_CLASSIFIERS))
    allowed = "allowed values: " + ", ".join(REPRODUCE_CLASSIFIERS)
    _require(not unknown, "reproduce.classifiers", allowed, r.classifiers)
    epochs = r.classifier_epochs
    _require(epochs is None or epochs >= 1, "reproduce.classifier_epochs", "must be >= 1 or null", epochs)
    if cfg.task.name == TaskName.evaluate:
        _require(len(e.checkpoints) >= 1, "evaluation.checkpoints", "lists no model to evaluate", e.checkpoints)
    if cfg.task.name == TaskName.train_vae and s.n_points is not None and loss.semantic_weight > 0:
        _require(
            s.n_points <= t.batch_size,
            "loss.semantic.n_points",
            f"must be <= trainer.batch_size ({t.batch_size})",
            s.n_points,
        )
    return cfg
