"""The whole study in one command: classifier, held-out judge, every variant x seed for ``reproduce.epochs``
epochs, then the comparison of all of them on the test split.

    python run.py experiment=reproduce                       # conf/experiment/reproduce.yaml
    python run.py experiment=reproduce runtime.device=cuda   # the same on a GPU

Each stage is an ordinary run (``task=train_classifier`` or ``task=train_vae``), composed from ``conf/`` with the
stage's overrides plus the command line's own, and run in ``<run dir>/<stage>``. A stage whose model file already exists
is skipped, and an interrupted stage continues from its ``last.pt``, so running the same command again (the
experiment fixes the run dir) picks up where it stopped. Seed-0 VAEs are exported to ``weights/<name>_epoch<E>.pth``,
the other seeds to ``weights/seeds/<name>_seed<S>_epoch<E>.pth``. The evaluation stage runs ``task=evaluate`` on
every VAE file; ``python -m analysis.report <run dir>/evaluation`` turns it into the table over seeds (mean and
95% t-interval per variant) and the figures.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from semvae import checkpoints, rundir
from semvae.config import REPRODUCE_CLASSIFIERS, Config, ConfigError, as_plain, validate
from semvae.tasks.checks import check_inputs
from semvae.tasks.evaluate import evaluate_models
from semvae.tasks.train_classifier import train_classifier
from semvae.tasks.train_vae import train_vae

log = logging.getLogger(__name__)

# Overrides of the command line that each stage sets for itself and so must not pass on.
STAGE_KEYS = ("experiment", "task", "variant", "seed", "classifier", "reproduce", "evaluation.checkpoints", "name")


@dataclass
class Stage:
    name: str  # folder under the reproduce run dir
    overrides: list[str]  # what Hydra composes: the same for every seed of a variant
    output: Path  # the model file it exports; the stage is done when it exists
    vae: bool  # trains a VAE (evaluated at the end), else a classifier
    values: dict[str, Any] = field(default_factory=dict)  # plain keys set on the composed config (seed, export)


def vae_file(cfg: Config, name: str, seed: int) -> Path:
    weights, epochs = Path(cfg.paths.weights_dir), cfg.reproduce.epochs
    if seed == 0:
        return weights / f"{name}_epoch{epochs}.pth"
    return weights / "seeds" / f"{name}_seed{seed}_epoch{epochs}.pth"


def passed_on(overrides: list[str]) -> list[str]:
    """The command line's overrides that every stage inherits (trainer, data, model, logger, paths, ...)."""

    def key(override: str) -> str:
        return override.split("=", 1)[0].lstrip("+~")

    return [o for o in overrides if not any(key(o) == k or key(o).startswith(k + ".") for k in STAGE_KEYS)]


def plan(cfg: Config, variant_names: dict[str, str]) -> list[Stage]:
    """The training stages in order: classifiers first (the semantic loss and the judges need them), then the VAEs
    seed by seed, so that the seed-0 models of every variant are ready first."""
    r = cfg.reproduce
    stages = []
    e = cfg.evaluation
    outputs = {
        "classifier": cfg.classifier.checkpoint,
        "judge": e.heldout_checkpoint,
        "mlp": e.mlp_checkpoint,
        "cnn": e.cnn_checkpoint,
    }
    for classifier in REPRODUCE_CLASSIFIERS:
        if classifier in r.classifiers:
            overrides = ["task=train_classifier", f"classifier={classifier}"]
            if r.classifier_epochs is not None:
                overrides.append(f"classifier.epochs={r.classifier_epochs}")
            stages.append(Stage(f"classifier_{classifier}", overrides, Path(outputs[classifier]), vae=False))
    for seed in r.seeds:
        for variant in r.variants:
            name = variant_names[variant]
            output = vae_file(cfg, name, seed)
            values = {"seed": seed, "task.export": str(output)}
            stages.append(Stage(f"{name}_s{seed}", vae_overrides(cfg, variant), output, vae=True, values=values))
    return stages


def vae_overrides(cfg: Config, variant: str) -> list[str]:
    return ["task=train_vae", f"variant={variant}", f"trainer.epochs={cfg.reproduce.epochs}"]


class Composer:
    """Stage configs as ``python run.py <overrides> <key>=<value> ...`` would compose them: Hydra composes each
    distinct list of overrides once (the seeds of a variant share one), and the plain keys are then set on a copy,
    as Hydra sets a value override. A choice that conf/ does not have fails with Hydra's message, which lists the
    options."""

    def __init__(self, common: list[str]):
        self.common = common
        self.composed: dict[tuple[str, ...], DictConfig] = {}

    def __call__(self, overrides: list[str], values: dict[str, Any] | None = None) -> Config:
        from hydra import compose as hydra_compose
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        overrides = self.common + overrides
        try:
            key = tuple(overrides)
            if key not in self.composed:
                self.composed[key] = hydra_compose(config_name="config", overrides=overrides)
            cfg = copy.deepcopy(self.composed[key])
            for name, value in (values or {}).items():
                OmegaConf.update(cfg, name, value, merge=False)
            return validate(OmegaConf.to_object(cfg))
        except (HydraException, OmegaConfBaseException) as error:
            given = overrides + [f"{k}={v}" for k, v in (values or {}).items()]
            raise ConfigError(f"reproduce: a stage with overrides {given} does not compose: {error}") from None


@contextlib.contextmanager
def admitted(cfg: Config, stage_dir: Path) -> Iterator[None]:
    """A stage as a run of its own: its checks (``check_inputs``: folder, machine, data, files) before its folder
    exists, then its folder held for the stage's life, as ``semvae.guard`` admits a run."""
    check_inputs(cfg, stage_dir)
    with rundir.held(stage_dir):
        yield


def reproduce(cfg: Config, run_dir: str | Path, group: str | None = None) -> dict[str, Any]:
    """Run the stages of ``plan`` not done yet, then evaluate every VAE; needs a running Hydra app (run.py)."""
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(run_dir)
    checkpoints.write_json_atomic(as_plain(cfg), run_dir / "config.json")  # the study's settings: its folder is its own
    compose = Composer(passed_on(list(HydraConfig.get().overrides.task)))
    names = {v: compose(vae_overrides(cfg, v)).name for v in cfg.reproduce.variants}
    stages = plan(cfg, names)
    configs = [compose(s.overrides, s.values) for s in stages]  # every stage's config is checked before any work
    vae_files = [s.output for s in stages if s.vae]
    evaluation = compose(["task=evaluate", "evaluation.checkpoints=[" + ",".join(f"'{p}'" for p in vae_files) + "]"])
    group = group or "reproduce"
    done = []
    for stage, stage_cfg in zip(stages, configs, strict=True):
        if stage.output.exists():
            log.info("%s: %s exists, skipped (delete it to train it again)", stage.name, stage.output)
            continue
        stage_dir = run_dir / stage.name
        log.info("%s: training into %s (exports %s)", stage.name, stage_dir, stage.output)
        train = train_vae if stage.vae else train_classifier
        with admitted(stage_cfg, stage_dir):
            train(stage_cfg, stage_dir, group)
        done.append(stage.name)
    if not cfg.reproduce.evaluate:
        return {"trained": done}
    eval_dir = run_dir / "evaluation"
    with admitted(evaluation, eval_dir):
        summary = evaluate_models(evaluation, eval_dir, group)
    log.info("table over seeds and figures: python -m analysis.report %s", eval_dir)
    return {"trained": done, **summary}
