"""task=evaluate: compare trained VAEs on the test split; and the evaluation of a model a training job has just made
(``task.evaluate=true``). The metrics are in ``semvae/evaluation/``; this module runs them and writes the results."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from semvae import checkpoints
from semvae.checkpoints import write_atomic, write_json_atomic
from semvae.config import CLASSIFIER_JUDGES, Config, ConfigError, as_plain
from semvae.evaluation import report
from semvae.evaluation.suite import METRICS_VERSION, EvaluationBench, judge_checkpoint, paired_differences
from semvae.manifest import sha256
from semvae.models import ResNetVAE
from semvae.stopping import StopRequested
from semvae.tasks.common import make_tracker, setup
from semvae.tracking import Tracker

log = logging.getLogger(__name__)


def evaluate_trained(cfg: Config, vae: ResNetVAE, device: torch.device, run_dir: Path, tracker: Tracker) -> dict:
    """The evaluation of docs/METHOD.md for the model a job has just trained: ``test/*`` metrics for its summary,
    ``latent_norms.npy`` (||mu(x)|| over the test split), interpolation and traversal grids."""
    log.info("evaluating the trained model on the test split")
    vae.eval()
    metrics, images, norms = EvaluationBench.prepare(cfg, device).evaluate(vae)
    metrics.pop("replicates", None)  # for differences between models of one evaluation; a training has one
    np.save(run_dir / "latent_norms.npy", norms.numpy().astype(np.float32))
    save_grids(cfg, images, cfg.name, run_dir / "interpolations.png", run_dir / "traversals.png")
    tracker.log_files(
        {"test/interpolations": run_dir / "interpolations.png", "test/traversals": run_dir / "traversals.png"}
    )
    return {f"test/{k}": v for k, v in metrics.items()}


def save_grids(cfg: Config, images: dict[str, Tensor], name: str, interpolations: Path, traversals: Path) -> None:
    """The interpolation and traversal grids of one model as labelled PNGs."""
    e = cfg.evaluation
    report.interpolation_grid(
        images["interpolations"], e.interpolation_steps, f"{name}: interpolations", interpolations
    )
    values = torch.linspace(-e.traversal_range, e.traversal_range, e.traversal_steps)
    report.traversal_grid(images["traversals"], values, f"{name}: latent traversals", traversals)


def save_replicates(replicates: dict[str, dict[str, Tensor]], path: Path) -> None:
    """A model's two-way bootstrap replicates (judge -> form -> (B,)) as ``judge/form`` arrays of one .npz, written
    atomically."""
    arrays = {f"{judge}/{form}": v.numpy() for judge, forms in replicates.items() for form, v in forms.items()}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(buffer.getvalue(), path)


def load_replicates(path: Path) -> dict[str, dict[str, Tensor]]:
    """What ``save_replicates`` wrote; empty when there is no such file (a row of an evaluation without them)."""
    if not path.is_file():
        return {}
    out: dict[str, dict[str, Tensor]] = {}
    with np.load(path) as arrays:
        for key in arrays.files:
            judge, form = key.split("/")
            out.setdefault(judge, {})[form] = torch.from_numpy(arrays[key])
    return out


def evaluation_settings(cfg: Config) -> dict[str, Any]:
    """What an evaluated model's numbers depend on besides the model: evaluation.* (but the list of models and where
    the files lie), the judges' files (by content, not by path: see ``kept_rows``), the data and the version of what
    is measured (``METRICS_VERSION``). A model row written with other settings is evaluated again."""
    e = as_plain(cfg.evaluation)
    judges = {name: judge_checkpoint(cfg, name) for name in CLASSIFIER_JUDGES if name in e["judges"]}
    files = {f"judge_sha256.{name}": sha256(path) for name, path in judges.items()}
    paths = [key.split(".")[1] for key in CLASSIFIER_JUDGES.values() if key.startswith("evaluation.")]
    settings = {k: v for k, v in e.items() if k not in ("checkpoints", *paths)}
    return settings | files | {"data.name": cfg.data.name.value, "metrics_version": METRICS_VERSION}


def kept_rows(
    models_dir: Path, files: dict[str, tuple[str, str]], settings: dict[str, Any]
) -> tuple[dict[str, dict[str, Any]], dict[str, Tensor]]:
    """The rows (and latent norms) already in ``models_dir`` that still hold: same model name, same file content
    (``files``: name -> (path, SHA-256)) and the same ``settings``. Where the file lies does not matter (a folder of
    rows committed on one checkout is kept on another); a kept row records the path it is given now."""
    rows: dict[str, dict[str, Any]] = {}
    norms: dict[str, Tensor] = {}
    for name, (path, digest) in files.items():
        record, norm_file = models_dir / f"{name}.json", models_dir / f"{name}_latent_norms.npy"
        if not (record.is_file() and norm_file.is_file()):
            continue
        saved = _readable(record, _json_object)
        if saved is None or saved.get("checkpoint_sha256") != digest or saved.get("settings") != settings:
            continue
        norm = _readable(norm_file, lambda file: np.load(file, allow_pickle=False).astype(np.float32))
        if norm is not None:
            rows[name] = {k: v for k, v in saved.items() if k not in ("config", "settings")} | {"checkpoint": path}
            norms[name] = torch.from_numpy(norm)
    return rows, norms


def _json_object(path: Path) -> dict[str, Any]:
    record = json.loads(path.read_text())
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    return record


def _readable(path: Path, read: Callable[[Path], Any]) -> Any:
    """``read(path)``, or None with a warning naming the file when it is damaged (a torn copy, a crafted file): its
    model is then evaluated again and the file replaced."""
    try:
        return read(path)
    except (OSError, ValueError, RecursionError) as error:  # JSONDecodeError and numpy's refusals are ValueErrors
        log.warning("%s cannot be read (%s); its model is evaluated again", path, error)
        return None


def evaluation_eta(done: int, left: int, seconds: float) -> str:
    """The evaluation's overall progress after a model: ``2 models in 9m40s; 1 left, about 4m50s``."""
    from semvae.training.trainer import duration

    text = f"{done} model{'s' * (done != 1)} in {duration(seconds)}"
    return text + (f"; {left} left, about {duration(seconds / done * left)}" if left else "; all evaluated")


def evaluate_models(cfg: Config, run_dir: str | Path, group: str | None = None) -> dict[str, Any]:
    """Compare the VAEs of ``evaluation.checkpoints`` on the test split; write the table, figures and, per model,
    ``models/<name>.json`` (metrics and the model's config) and ``models/<name>_latent_norms.npy``.

    Each model's row is written as soon as it is measured. Run again in the same run dir, the task keeps the rows
    of the same files measured with the same settings and evaluates only the others; a stop signal ends it after
    saving the rows it has (summary ``status: stopped``)."""
    import pandas as pd

    run_dir = Path(run_dir)
    e = cfg.evaluation
    device = setup(cfg, seed=False)
    names = [Path(p).stem for p in e.checkpoints]
    if len(set(names)) != len(names):
        raise ConfigError(f"evaluation.checkpoints={e.checkpoints}: file names must differ (they name the rows)")
    # load everything first: a wrong file fails before any computation
    models = {name: checkpoints.load_vae(path, device) for name, path in zip(names, e.checkpoints, strict=True)}
    settings = evaluation_settings(cfg)
    files = {name: (str(path), sha256(path)) for name, path in zip(names, e.checkpoints, strict=True)}
    rows, norms = kept_rows(run_dir / "models", files, settings)  # of an earlier, stopped run of this evaluation
    replicates = {name: load_replicates(run_dir / "models" / f"{name}_replicates.npz") for name in rows}
    replicates = {name: value for name, value in replicates.items() if value}
    kept = len(rows)
    if rows:
        log.info("kept the rows already written in %s: %s", run_dir / "models", ", ".join(rows))
    bench = EvaluationBench.load(cfg, device)
    started = time.perf_counter()
    tracker = make_tracker(cfg, run_dir, job_type="evaluate", group=group, extra={"models": names})
    try:
        bench.measure_factors()
        (run_dir / "models").mkdir(exist_ok=True)
        for name, (vae, state) in models.items():
            if name in rows:
                continue
            log.info("evaluating %s (%s), model %d of %d", name, state.get("variant", "?"), len(rows) + 1, len(names))
            metrics, images, norms[name] = bench.evaluate(vae)
            if "replicates" in metrics:  # saved before the row, which marks the model as done
                replicates[name] = metrics.pop("replicates")
                save_replicates(replicates[name], run_dir / "models" / f"{name}_replicates.npz")
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
            grids = run_dir / f"interpolations_{name}.png", run_dir / f"traversals_{name}.png"
            save_grids(cfg, images, name, *grids)
            tracker.log_files({f"interpolations/{name}": grids[0], f"traversals/{name}": grids[1]})
            record = row | {"config": state.get("config"), "settings": settings}
            # last: the row marks the model as done; in the order measured, which a kept row gives the table too
            write_json_atomic(record, run_dir / "models" / f"{name}.json", sort_keys=False)
            rows[name] = row
            log.info("%s", evaluation_eta(len(rows) - kept, len(names) - len(rows), time.perf_counter() - started))
        rows_in_order = [rows[name] for name in names]
        frame = pd.DataFrame(rows_in_order)
        frame.to_csv(run_dir / "comparison.csv", index=False)
        (run_dir / "comparison.md").write_text(report.markdown_table(rows_in_order))
        differences = paired_differences(rows, replicates, baseline=names[0])
        if differences:  # every model minus the first listed, on the same points and directions
            pd.DataFrame(differences).to_csv(run_dir / "differences.csv", index=False)
            (run_dir / "differences.md").write_text(report.differences_table(differences))
        latent_dims = {r["model"]: r["latent_dim"] for r in rows_in_order}
        report.latent_norm_figure(norms, latent_dims, run_dir / "latent_norms.png")
        report.gsv_figure(rows_in_order, run_dir / "gsv.png")
        seconds = time.perf_counter() - started
        summary = {"status": "finished", "eval_seconds": round(seconds, 2), "n_test": len(bench.test), "models": names}
        summary |= {f"{r['model']}/{k}": v for r in rows_in_order for k, v in r.items() if isinstance(v, int | float)}
        tracker.update_summary(summary)
        tracker.log_table("comparison", frame)
        tracker.log_files({"latent_norms": run_dir / "latent_norms.png", "gsv": run_dir / "gsv.png"})
    except StopRequested as stopped:
        done = [name for name in names if name in rows]
        tracker.update_summary({"status": "stopped", "models": names, "evaluated": done})
        tracker.stopped()
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
        "%d model%s on %d test images (%d measured, %d kept from an earlier run) in %.1fs; table: %s\n%s",
        len(names),
        "" if len(names) == 1 else "s",
        len(bench.test),
        len(names) - kept,
        kept,
        seconds,
        run_dir / "comparison.md",
        report.markdown_table(rows_in_order),
    )
    return summary
