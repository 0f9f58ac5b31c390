"""The jobs ``run.py`` can start: train a VAE, train the classifier. Each takes the typed ``Config``.

``check_inputs`` runs before any work and raises ``ConfigError`` for files that a job would need or overwrite.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from semvae import checkpoints
from semvae.config import Config, ConfigError, JudgeName, TaskName
from semvae.data import Split, load_split, random_shift, train_val_split
from semvae.losses import sample_directions, vae_objective, variant_of
from semvae.models import Classifier, ResNetVAE
from semvae.reproduce import reproduce
from semvae.stopping import StopFlag, StopRequested
from semvae.tracking import Tracker
from semvae.train import FitResult, fit, native_bf16, seed_everything, validate

log = logging.getLogger(__name__)


def as_plain(obj: Any) -> Any:
    """A dataclass config as plain dicts, lists and scalars (enums by value), for JSON, W&B and checkpoints."""
    if dataclasses.is_dataclass(obj):
        return {f.name: as_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, list | tuple):
        return [as_plain(v) for v in obj]
    return obj


def resolve_device(name: str) -> torch.device:
    """The torch device for ``trainer.device`` / ``evaluation.device``. Also turns TF32 off: on Ampere and later
    GPUs cuDNN would otherwise round float32 convolutions to 10-bit mantissas, so ``precision=fp32`` means IEEE
    float32 on every device (bf16 is the explicit ``trainer.precision=bf16``)."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r}: no CUDA device is available here; use auto or cpu")
    return device


# settings a resumed run must share with the checkpoint it continues (trainer.epochs may grow)
RESUME_KEYS = (
    "seed",
    "model",
    "loss",
    "classifier.widths",
    "classifier.blocks",
    "data.name",
    "data.val_size",
    "data.split_seed",
    "trainer.batch_size",
    "trainer.lr",
    "trainer.weight_decay",
    "trainer.lr_schedule",
    "trainer.limit_train_batches",
)


def effective_config(cfg: Config) -> Config:
    """The config a task really runs with: task=classifier trains with classifier.seed when it is set."""
    if cfg.task.name == TaskName.classifier and cfg.classifier.seed is not None:
        return dataclasses.replace(cfg, seed=cfg.classifier.seed)
    return cfg


def resume_checkpoint(cfg: Config, run_dir: str | Path | None) -> Path | None:
    """trainer.resume when set, else the run dir's last.pt when it exists (the same command continues a run)."""
    if cfg.trainer.resume is not None:
        return Path(cfg.trainer.resume)
    if run_dir is not None and (Path(run_dir) / "last.pt").is_file():
        return Path(run_dir) / "last.pt"
    return None


def _lookup(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def _leaves(value: Any, key: str) -> dict[str, Any]:
    """{"loss": {"beta": 1}} under "loss" -> {"loss.beta": 1}: the settings a refusal names one by one."""
    if not isinstance(value, dict) or not value:
        return {key: value}
    return {k: v for name, sub in value.items() for k, v in _leaves(sub, f"{key}.{name}").items()}


def check_resumable(cfg: Config, path: Path) -> dict[str, Any]:
    """The checkpoint ``path`` if this config may continue it; CheckpointError naming the file and, key by key,
    the settings that differ (``loss.semantic_weight: 10.0 -> 0.0``) if not."""
    state = checkpoints.load_training_state(path)
    stored, current = state.get("config", {}), as_plain(effective_config(cfg))
    differing = []
    for key in RESUME_KEYS:
        then, now = _leaves(_lookup(stored, key), key), _leaves(_lookup(current, key), key)
        changed = [k for k in sorted(then | now) if then.get(k) != now.get(k)]
        differing += [f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in changed]
    if differing:
        raise checkpoints.CheckpointError(
            f"{path} was written by a run with other settings ({'; '.join(differing)}); use another run dir "
            "(hydra.run.dir) or the settings it was written with"
        )
    return state


def exported_by(run_dir: str | Path | None, path: str | Path) -> bool:
    """Whether the model file ``path`` was exported by the run in ``run_dir`` (then that run may write it again:
    a run stopped between its export and its summary finishes without task.overwrite)."""
    if run_dir is None:
        return False
    try:
        made_in = checkpoints.load(path).get("run_dir")
    except checkpoints.CheckpointError:
        return False
    return made_in is not None and Path(made_in).resolve() == Path(run_dir).resolve()


def check_writable(key: str, path: str | Path) -> None:
    """ConfigError naming ``key`` if a file cannot be created at ``path``: a name too long for the file system, a
    parent that is a file, or a folder that refuses new files. Nothing is left behind."""
    import errno
    import tempfile

    path = Path(path)
    limit = 255  # NAME_MAX of the usual Linux file systems
    too_long = [part for part in path.parts if len(part.encode()) > limit]
    if too_long:
        raise ConfigError(f"{key}={str(path)!r}: the name {too_long[0][:40]}... is longer than {limit} bytes")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{key}={str(path)!r}: {ancestor} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as error:
        reason = "the folder is read-only" if error.errno in (errno.EROFS, errno.EACCES) else error.strerror
        raise ConfigError(f"{key}={str(path)!r}: cannot write in {ancestor}: {reason}") from None


def check_inputs(cfg: Config, run_dir: str | Path | None = None) -> None:
    """Fail before any work on a missing input, a checkpoint this run cannot continue, or an export that would
    overwrite a file."""
    if cfg.trainer.resume is not None and not Path(cfg.trainer.resume).is_file():
        raise ConfigError(f"trainer.resume={cfg.trainer.resume!r}: no such checkpoint")
    if cfg.task.name in (TaskName.train, TaskName.classifier):
        resume = resume_checkpoint(cfg, run_dir)
        if resume is not None:
            check_resumable(cfg, resume)
    if (
        cfg.task.name == TaskName.train
        and cfg.loss.semantic_weight > 0
        and not Path(cfg.classifier.checkpoint).is_file()
    ):
        raise ConfigError(
            f"classifier.checkpoint={cfg.classifier.checkpoint!r} does not exist, and the semantic loss "
            f"(loss.semantic_weight={cfg.loss.semantic_weight}) needs it: train it first with "
            "`python run.py task=classifier`, or point classifier.checkpoint at one"
        )
    if cfg.task.name == TaskName.evaluate or (cfg.task.name == TaskName.train and cfg.task.evaluate):
        e = cfg.evaluation
        needed = {"evaluation.checkpoints": e.checkpoints} if cfg.task.name == TaskName.evaluate else {}
        if "train" in [j.value for j in e.judges]:
            needed["classifier.checkpoint"] = [cfg.classifier.checkpoint]
        if "heldout" in [j.value for j in e.judges]:
            needed["evaluation.heldout_checkpoint"] = [e.heldout_checkpoint]
        for key, paths in needed.items():
            missing = [p for p in paths if not Path(p).is_file()]
            if missing and key == "evaluation.checkpoints":
                raise ConfigError(f"{key}: not found: {', '.join(missing)}. List existing VAE model files")
            if missing:
                raise ConfigError(
                    f"{key}: not found: {', '.join(missing)}. Train it first (README, 'Run'), point {key} at an "
                    "existing file, or drop its judge from evaluation.judges"
                )
        for path in needed.get("evaluation.checkpoints", []):  # safe to load, and a VAE
            checkpoints.load_vae(path)
        if "evaluation.heldout_checkpoint" in needed:
            checkpoints.load_classifier(e.heldout_checkpoint)
    judged = cfg.task.name == TaskName.evaluate or (cfg.task.name == TaskName.train and cfg.task.evaluate)
    if (judged and JudgeName.train in cfg.evaluation.judges) or (
        cfg.task.name == TaskName.train and cfg.loss.semantic_weight > 0
    ):
        c = cfg.classifier  # safe to load, and the configured architecture
        checkpoints.load_classifier(c.checkpoint, expect={"widths": list(c.widths), "blocks": c.blocks})
    export = cfg.task.export
    if export is not None:
        check_writable("task.export", export)
        if Path(export).exists() and not cfg.task.overwrite and not exported_by(run_dir, export):
            raise ConfigError(f"task.export={export!r} exists; pass task.overwrite=true to replace it")


def _setup(cfg: Config) -> torch.device:
    threads = cfg.trainer.num_threads
    if threads is None and os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        threads = int(os.environ["SLURM_CPUS_PER_TASK"])  # the cores SLURM gave this job, not the node's
    if threads is not None:
        torch.set_num_threads(threads)
    device = resolve_device(cfg.trainer.device)
    if cfg.trainer.precision == "bf16" and not native_bf16(device):
        log.warning(
            "trainer.precision=bf16: %s has no native bfloat16, so bf16 runs emulated and far slower than fp32; "
            "use trainer.precision=fp32 here",
            device,
        )
    seed_everything(cfg.seed)
    return device


def _data(cfg: Config, device: torch.device) -> tuple[Split, Split]:
    d = cfg.data
    full = load_split(d.name.value, d.root, train=True, download=d.download, mirror=d.mirror)
    train, val = train_val_split(full, d.val_size, d.split_seed)
    log.info("%s: %d training and %d validation images on %s", d.name.value, len(train), len(val), device)
    return train.to(device), val.to(device)


def _tracker(
    cfg: Config, run_dir: Path, job_type: str, group: str | None, extra: dict[str, Any], run_id: str | None = None
) -> Tracker:
    lg = cfg.logger
    return Tracker(
        run_dir,
        config=as_plain(cfg) | extra,
        mode=lg.mode.value,
        project=lg.project,
        name=cfg.name,
        group=lg.group or group,
        job_type=job_type,
        entity=lg.entity,
        tags=list(lg.tags),
        log_artifacts=lg.log_artifacts,
        init_timeout=lg.init_timeout,
        run_id=run_id,
    )


def _fit_kwargs(cfg: Config, run_dir: Path, tracker: Tracker, resume: Path | None) -> dict[str, Any]:
    t = cfg.trainer
    return dict(
        run_dir=run_dir,
        tracker=tracker,
        epochs=t.epochs,
        batch_size=t.batch_size,
        lr=t.lr,
        weight_decay=t.weight_decay,
        lr_schedule=t.lr_schedule.value,
        log_every=t.log_every,
        checkpoint_every=t.checkpoint_every,
        limit_train_batches=t.limit_train_batches,
        limit_eval_batches=t.limit_eval_batches,
        progress=t.progress,
        resume=resume,
        precision=t.precision.value,
    )


def _tracked_fit(
    cfg: Config,
    run_dir: Path,
    group: str | None,
    job_type: str,
    extra: dict[str, Any],
    checkpoint_extra: dict[str, Any],
    run: Callable[[Tracker, dict[str, Any]], dict[str, Any]],
) -> dict[str, Any]:
    """Start tracking (continuing the W&B run of the checkpoint being resumed), run ``run`` with stop signals turned
    into a checkpoint-and-exit, and close tracking whatever happens."""
    resume = resume_checkpoint(cfg, run_dir)
    run_id = checkpoints.load(resume).get("wandb_id") if resume is not None else None
    tracker = _tracker(cfg, run_dir, job_type=job_type, group=group, extra=extra, run_id=run_id)
    checkpoint_extra = checkpoint_extra | {"config": as_plain(cfg), "wandb_id": tracker.run_id}
    try:
        with StopFlag() as stop:
            summary = run(
                tracker,
                _fit_kwargs(cfg, run_dir, tracker, resume) | {"stop": stop, "checkpoint_extra": checkpoint_extra},
            )
    except StopRequested as stopped:
        tracker.update_summary({"status": "stopped", "stopped_at_step": stopped.step, "stop": str(stopped)})
        tracker.finish(exit_code=128 + stopped.signum)
        raise
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()
    return summary


# the metrics of the final summary line
HEADLINE = (
    "val/loss",
    "val/mse",
    "val/accuracy",
    "test/accuracy",
    "test/mse",
    "test/gsv_norm_train",
    "test/gsv_norm_heldout",
    "test/gsv_norm_morpho",
)


def _finish(
    cfg: Config,
    tracker: Tracker,
    result: FitResult,
    model_file: dict[str, Any],
    summary: dict[str, Any],
) -> dict[str, Any]:
    """Export the final model if asked, log it as an artifact, write the summary and a one-line report."""
    summary = {
        "status": "finished",
        "torch_threads": torch.get_num_threads(),
        "epochs": result.epochs,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        "best_epoch": result.best_epoch,
        **{f"val/{k}": v for k, v in result.val.items()},
        **summary,
    }
    final = tracker.run_dir / "model.pth"
    model_file = model_file | {"summary": summary, "run_dir": str(tracker.run_dir.resolve())}
    checkpoints.save_atomic(model_file, final)
    export = cfg.task.export
    if export is not None:
        checkpoints.export(model_file, export, overwrite=cfg.task.overwrite or exported_by(tracker.run_dir, export))
        summary["export"] = str(export)
    tracker.update_summary(summary)
    tracker.log_checkpoint(final, name=cfg.name, metadata={k: v for k, v in summary.items() if k != "export"})
    log.info(
        "done: %s, %d epochs, %d steps in %.1fs; %s; model: %s%s",
        cfg.name,
        result.epochs,
        result.steps,
        result.seconds,
        ", ".join(f"{k}={v:.4g}" for k, v in summary.items() if k in HEADLINE),
        final,
        f" (exported to {cfg.task.export})" if cfg.task.export else "",
    )
    return summary


def load_classifier(cfg: Config, device: torch.device) -> Classifier:
    """The frozen feature extractor phi from ``classifier.checkpoint``, checked against ``classifier.*``."""
    c = cfg.classifier
    model, _ = checkpoints.load_classifier(c.checkpoint, device, {"widths": list(c.widths), "blocks": c.blocks})
    return model


def train_vae(cfg: Config, run_dir: str | Path, group: str | None = None) -> dict[str, Any]:
    """Train one VAE (any variant) and return its summary."""
    run_dir = Path(run_dir)
    device = _setup(cfg)
    train, val = _data(cfg, device)
    m, loss, sem = cfg.model, cfg.loss, cfg.loss.semantic
    vae = ResNetVAE(m.latent_dim, m.widths, m.blocks).to(device)
    phi = load_classifier(cfg, device) if loss.semantic_weight > 0 else None
    if cfg.trainer.channels_last:
        for net in (vae, phi):
            if net is not None:
                net.to(memory_format=torch.channels_last)
    variant = variant_of(loss.beta, loss.semantic_weight)

    direction_gen = torch.Generator().manual_seed(cfg.seed + 1)

    def objective(model: ResNetVAE, x: Tensor, generator: torch.Generator, noise: Tensor | None = None) -> dict:
        """The training loss of METHOD.md; K fresh directions from ``generator`` when the semantic term is on."""
        directions = None
        if phi is not None:
            directions = sample_directions(
                sem.n_directions, m.latent_dim, sem.directions.value, sem.step, generator, device
            )
        features = phi.features if phi is not None else None
        return vae_objective(
            model,
            x,
            loss.beta,
            loss.semantic_weight,
            features,
            directions,
            sem.n_points,
            sem.normalize,
            sem.eps,
            noise=noise,
        )

    def step_fn(model: ResNetVAE, x: Tensor, _y: Tensor) -> dict[str, Tensor]:
        return objective(model, x, direction_gen)

    # validation sees the same noise and directions every epoch, so its numbers are comparable across epochs
    val_seed = cfg.seed + 2

    def eval_fn(model: ResNetVAE, x: Tensor, _y: Tensor) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(val_seed)
        noise = torch.randn(x.shape[0], m.latent_dim, generator=g).to(device)
        terms = objective(model, x, g, noise=noise)
        mu, _ = model.encode(x)
        terms["neg_elbo"] = terms["recon"] + terms["kl"]
        terms["mse"] = F.mse_loss(torch.sigmoid(model.decode(mu)), x)
        return terms

    n_img = cfg.trainer.n_image_samples
    prior = torch.randn(n_img, m.latent_dim, generator=torch.Generator().manual_seed(val_seed)).to(device)
    shown = val.images[: max(n_img // 2, 1)]

    def image_fn(model: ResNetVAE) -> dict[str, Tensor]:
        recon = torch.sigmoid(model.decode(model.encode(shown)[0]))
        pairs = torch.stack([shown, recon], dim=1).flatten(0, 1)  # original, reconstruction, original, ...
        return {"images/reconstructions": pairs, "images/prior_samples": torch.sigmoid(model.decode(prior))}

    architecture = {"latent_dim": m.latent_dim, "widths": list(m.widths), "blocks": m.blocks}
    extra = {"variant": variant, "n_train": len(train), "n_val": len(val)}
    model_file = {
        "kind": "vae",
        "architecture": architecture,
        "config": as_plain(cfg),
        **extra,
        **checkpoints.provenance(cfg.paths.root_dir),
    }

    def run(tracker: Tracker, fit_kwargs: dict[str, Any]) -> dict[str, Any]:
        result = fit(
            vae,
            train,
            val,
            step_fn,
            eval_fn,
            seed=cfg.seed,
            generators={"directions": direction_gen},
            monitor="loss",
            image_fn=image_fn,
            **fit_kwargs,
        )
        if cfg.task.evaluate:
            try:
                extra.update(evaluate_trained(cfg, vae, device, run_dir, tracker))
            except StopRequested as stopped:
                raise StopRequested(
                    stopped.signum,
                    f"training is complete (step {result.steps}, {result.last_checkpoint}) and its evaluation was "
                    "stopped; it runs again on resume",
                    result.last_checkpoint,
                    result.steps,
                ) from None
        return _finish(cfg, tracker, result, {"model": vae.state_dict(), **model_file}, extra)

    return _tracked_fit(cfg, run_dir, group, variant, extra, {"architecture": architecture}, run)


def train_classifier(cfg: Config, run_dir: str | Path, group: str | None = None) -> dict[str, Any]:
    """Train the feature classifier (``classifier=resnet``) or the held-out judge (``classifier=judge``)."""
    run_dir = Path(run_dir)
    cfg = effective_config(cfg)
    c = cfg.classifier
    device = _setup(cfg)
    train, val = _data(cfg, device)
    model = Classifier(c.widths, c.blocks).to(device)
    if cfg.trainer.channels_last:
        model.to(memory_format=torch.channels_last)

    def step_fn(net: Classifier, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        x = random_shift(x, c.augment_shift) if c.augment_shift else x
        return {"loss": F.cross_entropy(net(x), y)}

    def eval_fn(net: Classifier, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        logits = net(x)
        return {"loss": F.cross_entropy(logits, y), "accuracy": (logits.argmax(1) == y).float().mean()}

    architecture = {"widths": list(c.widths), "blocks": c.blocks, "feature_dim": model.feature_dim}
    extra = {"variant": "classifier", "classifier": c.name, "n_train": len(train), "n_val": len(val)}
    made_by = checkpoints.provenance(cfg.paths.root_dir)  # the tree the run started from, as for the VAE

    def run(tracker: Tracker, fit_kwargs: dict[str, Any]) -> dict[str, Any]:
        result = fit(
            model, train, val, step_fn, eval_fn, seed=cfg.seed, monitor="accuracy", monitor_mode="max", **fit_kwargs
        )
        test = load_split(
            cfg.data.name.value, cfg.data.root, train=False, download=cfg.data.download, mirror=cfg.data.mirror
        ).to(device)
        test_metrics = validate(model, test, eval_fn, cfg.trainer.batch_size, cfg.trainer.limit_eval_batches)
        extra.update({f"test/{k}": v for k, v in test_metrics.items()})
        model_file = {
            "model": model.state_dict(),
            "kind": "classifier",
            "architecture": architecture,
            "config": as_plain(cfg),
            **extra,
            **made_by,
        }
        return _finish(cfg, tracker, result, model_file, extra)

    return _tracked_fit(cfg, run_dir, group, "classifier", extra, {"architecture": architecture}, run)


TASKS = {TaskName.train: train_vae, TaskName.classifier: train_classifier}


@dataclasses.dataclass
class EvaluationBench:
    """What every evaluated model is measured against: the test split, the judges, the fixed selection of
    starting images and pairs, and the morphometrics of the test images (computed once)."""

    cfg: Config
    test: Split
    judges: Any
    selection: Any
    factors: Tensor | None

    @classmethod
    def prepare(cls, cfg: Config, device: torch.device) -> EvaluationBench:
        return cls.load(cfg, device).measure_factors()

    @classmethod
    def load(cls, cfg: Config, device: torch.device) -> EvaluationBench:
        """The judges, the test split and the selection: what can fail on a wrong file, before any computation."""
        from semvae import comparison

        e, d = cfg.evaluation, cfg.data
        judges = comparison.Judges(morpho=JudgeName.morpho in e.judges)
        if JudgeName.train in e.judges:
            judges.classifiers["train"] = load_classifier(cfg, device)
        if JudgeName.heldout in e.judges:
            judges.classifiers["heldout"], _ = checkpoints.load_classifier(e.heldout_checkpoint, device)
        for net in judges.classifiers.values():
            net.to(memory_format=torch.channels_last)
        test = load_split(d.name.value, d.root, train=False, download=d.download, mirror=d.mirror)
        if e.limit_test is not None:
            test = test.subset(torch.arange(min(e.limit_test, len(test))))
        test = test.to(device)
        if e.n_points > len(test):
            raise ConfigError(f"evaluation.n_points={e.n_points}: the test split has only {len(test)} images")
        selection = comparison.select(test.images, e.n_points, e.n_pairs, e.seed)
        return cls(cfg, test, judges, selection, None)

    def measure_factors(self) -> EvaluationBench:
        """The morphometrics of the test images (seconds to minutes; a stop signal is honoured between chunks)."""
        from semvae import morpho

        if self.judges.morpho and self.factors is None:
            self.factors = morpho.measure(self.test.images.cpu())
            _, self.judges.morpho_mean, self.judges.morpho_std = morpho.standardize(self.factors)
        return self

    def evaluate(self, vae: ResNetVAE) -> tuple[dict[str, Any], dict[str, Tensor], Tensor]:
        from semvae import comparison

        e = self.cfg.evaluation
        return comparison.evaluate_model(
            vae,
            self.test.images,
            self.test.labels,
            self.judges,
            self.selection,
            self.factors,
            seed=e.seed,
            n_random_directions=e.n_random_directions,
            steps=list(e.steps),
            morpho_points=e.morpho_points,
            interpolation_steps=e.interpolation_steps,
            traversal_values=torch.linspace(-e.traversal_range, e.traversal_range, e.traversal_steps),
            batch_size=e.batch_size,
        )


def evaluate_trained(cfg: Config, vae: ResNetVAE, device: torch.device, run_dir: Path, tracker: Tracker) -> dict:
    """The evaluation of METHOD.md for the model a job has just trained: ``test/*`` metrics for its summary,
    ``latent_norms.npy`` (||mu(x)|| over the test split), interpolation and traversal grids."""
    import numpy as np
    from torchvision.utils import save_image

    e = cfg.evaluation
    log.info("evaluating the trained model on the test split")
    vae.eval()
    metrics, images, norms = EvaluationBench.prepare(cfg, device).evaluate(vae)
    np.save(run_dir / "latent_norms.npy", norms.numpy().astype(np.float32))
    save_image(images["interpolations"], run_dir / "interpolations.png", nrow=e.interpolation_steps)
    save_image(images["traversals"], run_dir / "traversals.png", nrow=e.traversal_steps)
    tracker.log_files(
        {"test/interpolations": run_dir / "interpolations.png", "test/traversals": run_dir / "traversals.png"}
    )
    return {f"test/{k}": v for k, v in metrics.items()}


def evaluation_settings(cfg: Config) -> dict[str, Any]:
    """What an evaluated model's numbers depend on besides the model: evaluation.* (but the list of models and the
    device), the judges' files (by content) and the data. A model row written with other settings is evaluated again."""
    from semvae.manifest import sha256

    e = as_plain(cfg.evaluation)
    judges = {"train": cfg.classifier.checkpoint, "heldout": cfg.evaluation.heldout_checkpoint}
    files = {f"judge_sha256.{name}": sha256(path) for name, path in judges.items() if name in e["judges"]}
    settings = {k: v for k, v in e.items() if k not in ("checkpoints", "device")}
    return settings | files | {"data.name": cfg.data.name.value}


def evaluate_models(cfg: Config, run_dir: str | Path, group: str | None = None) -> dict[str, Any]:
    """Compare the VAEs of ``evaluation.checkpoints`` on the test split; write the table, figures and, per model,
    ``models/<name>.json`` (metrics and the model's config) and ``models/<name>_latent_norms.npy``.

    Each model's row is written as soon as it is measured. Run again in the same run dir, the task keeps the rows
    of the same files measured with the same settings and evaluates only the others; a stop signal ends it after
    saving the rows it has (summary ``status: stopped``)."""
    import json

    import numpy as np

    from semvae import comparison
    from semvae.manifest import sha256
    from semvae.tracking import write_json_atomic

    run_dir = Path(run_dir)
    e = cfg.evaluation
    device = resolve_device(e.device)
    if cfg.trainer.num_threads is not None:
        torch.set_num_threads(cfg.trainer.num_threads)
    names = [Path(p).stem for p in e.checkpoints]
    if len(set(names)) != len(names):
        raise ConfigError(f"evaluation.checkpoints={e.checkpoints}: file names must differ (they name the rows)")
    # load everything first: a wrong file fails before any computation
    models = {name: checkpoints.load_vae(path, device) for name, path in zip(names, e.checkpoints, strict=True)}
    settings = evaluation_settings(cfg)
    files = {name: (str(path), sha256(path)) for name, path in zip(names, e.checkpoints, strict=True)}
    rows: dict[str, dict[str, Any]] = {}
    norms: dict[str, Tensor] = {}
    for name in names:  # rows of an earlier, stopped run of this evaluation
        record, norm_file = run_dir / "models" / f"{name}.json", run_dir / "models" / f"{name}_latent_norms.npy"
        if record.is_file() and norm_file.is_file():
            saved = json.loads(record.read_text())
            if (saved.get("checkpoint"), saved.get("checkpoint_sha256")) == files[name] and saved.get(
                "settings"
            ) == settings:
                rows[name] = {k: v for k, v in saved.items() if k not in ("config", "settings")}
                norms[name] = torch.from_numpy(np.load(norm_file))
    if rows:
        log.info("kept the rows already written in %s: %s", run_dir / "models", ", ".join(rows))
    bench = EvaluationBench.load(cfg, device)
    started = time.perf_counter()
    tracker = _tracker(cfg, run_dir, job_type="evaluate", group=group, extra={"models": names})
    try:
        bench.measure_factors()
        (run_dir / "models").mkdir(exist_ok=True)
        for name, (vae, state) in models.items():
            if name in rows:
                continue
            log.info("evaluating %s (%s), model %d of %d", name, state.get("variant", "?"), len(rows) + 1, len(names))
            metrics, images, norms[name] = bench.evaluate(vae)
            row = {
                "model": name,
                "variant": state.get("variant"),
                "epochs": state.get("summary", {}).get("epochs"),
                "checkpoint": files[name][0],
                "checkpoint_sha256": files[name][1],
                **metrics,
            }
            np.save(run_dir / "models" / f"{name}_latent_norms.npy", norms[name].numpy().astype(np.float32))
            # W&B keys interpolations/NAME put every model's grid in one panel section; files interpolations_NAME.png
            tracker.log_images({f"interpolations/{name}": images["interpolations"]}, 0, nrow=e.interpolation_steps)
            tracker.log_images({f"traversals/{name}": images["traversals"]}, 0, nrow=e.traversal_steps)
            record = row | {"config": state.get("config"), "settings": settings}
            write_json_atomic(record, run_dir / "models" / f"{name}.json")  # last: the row marks the model as done
            rows[name] = row
        rows_in_order = [rows[name] for name in names]
        import pandas as pd

        frame = pd.DataFrame(rows_in_order)
        frame.to_csv(run_dir / "comparison.csv", index=False)
        (run_dir / "comparison.md").write_text(comparison.markdown_table(rows_in_order))
        latent_dims = {r["model"]: r["latent_dim"] for r in rows_in_order}
        comparison.latent_norm_figure(norms, latent_dims, run_dir / "latent_norms.png")
        comparison.gsv_figure(rows_in_order, run_dir / "gsv.png")
        seconds = time.perf_counter() - started
        summary = {"status": "finished", "eval_seconds": round(seconds, 2), "n_test": len(bench.test), "models": names}
        summary |= {f"{r['model']}/{k}": v for r in rows_in_order for k, v in r.items() if isinstance(v, int | float)}
        tracker.update_summary(summary)
        tracker.log_table("comparison", frame)
        tracker.log_files({"latent_norms": run_dir / "latent_norms.png", "gsv": run_dir / "gsv.png"})
    except StopRequested as stopped:
        done = [name for name in names if name in rows]
        tracker.update_summary({"status": "stopped", "models": names, "evaluated": done})
        tracker.finish(exit_code=128 + stopped.signum)
        raise StopRequested(
            stopped.signum,
            f"{len(done)} of {len(names)} models evaluated, their rows saved in {run_dir / 'models'}; "
            "the same command in the same run dir evaluates the others",
        ) from None
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()
    log.info(
        "evaluated %d model%s on %d test images in %.1fs; table: %s\n%s",
        len(names),
        "" if len(names) == 1 else "s",
        len(bench.test),
        seconds,
        run_dir / "comparison.md",
        comparison.markdown_table(rows_in_order),
    )
    return summary


TASKS[TaskName.evaluate] = evaluate_models
TASKS[TaskName.reproduce] = reproduce
