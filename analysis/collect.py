"""Gather runs into a pandas DataFrame: one row per run, config keys flattened, summary metrics beside them.

    from analysis.collect import load_runs
    frame = load_runs("outputs/multirun/2026-11-25/12-00-00")   # local run folders (no W&B, no network)
    frame = load_runs("wandb:my-team/semvae")                   # the same columns, through W&B's public API

Locally only the files every run writes are read (``config.json``, ``summary.json``), plus, in the folder of a
``task=evaluate`` run (or the ``evaluation`` stage of ``experiment=reproduce``), one row per evaluated model from
``models/<name>.json``: its training config and its metrics as ``test/*``. Every frame has the columns
``source`` ("local" or "wandb"), ``run`` (the run's folder, or ``ENTITY/PROJECT/ID`` on W&B), ``run_dir`` (the local
folder, None for W&B runs), ``status``, ``variant``, the flattened config (``loss.beta``, ``seed``, ...) and the
summary's metrics (``val/mse``, ``test/gsv_norm_heldout``, ...).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from semvae.variants import variant_of

BASE_COLUMNS = ["source", "run", "run_dir", "status", "variant"]
log = logging.getLogger(__name__)

# Config keys that say where and how a run was kept, not what was trained: two runs that differ only in these (and
# derived counts) with the same seed are one measurement, counted once (``drop_duplicate_runs``).
NOT_SETTINGS = (
    "name",
    "objectives",
    "n_train",
    "n_val",
    "paths.",
    "logger.",
    "reproduce.",
    "evaluation.",
    "task.export",
    "task.overwrite",
    "task.evaluate",
    "runtime.device",
    "runtime.num_threads",
    "runtime.channels_last",
    "data.root",
    "data.mirror",
    "data.download",
    "trainer.resume",
    "trainer.progress",
    "trainer.log_every",
    "trainer.checkpoint_every",
    "trainer.n_image_samples",
    "classifier.checkpoint",
    "seed",
)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"loss": {"beta": 1}} -> {"loss.beta": 1}; lists become tuples so that columns stay hashable."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = tuple(value) if isinstance(value, list) else value
    return flat


def _row(source: str, run: str, run_dir: str | None, config: dict[str, Any], summary: dict[str, Any]) -> dict:
    """One run as a flat row; a training run without a recorded variant gets the one its loss weights define."""
    flat = flatten(config)
    settings = {k: v for k, v in flat.items() if not k.startswith(NOT_SETTINGS)}
    identity = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    row = {"source": source, "run": run, "run_dir": run_dir, **flat, **flatten(summary)}
    row["settings_id"] = identity if settings else None  # shared by the runs that differ only in their seed
    task = row.get("task.name", "train_vae")  # "train" before the tasks were named train_vae / train_classifier
    trains_a_vae = task in ("train", "train_vae") and "loss.beta" in row and "loss.semantic_weight" in row
    if row.get("variant") is None and trains_a_vae:
        row["variant"] = variant_of(row["loss.beta"], row["loss.semantic_weight"])
    return row


def _frame(rows: Iterable[dict[str, Any]], include_unfinished: bool) -> pd.DataFrame:
    """Rows as a DataFrame with the base columns first; unfinished runs dropped unless asked for."""
    frame = pd.DataFrame(list(rows))
    for column in BASE_COLUMNS:
        if column not in frame:
            frame[column] = None
    frame = drop_duplicate_runs(frame)
    if not include_unfinished:
        frame = frame[frame["status"] == "finished"].reset_index(drop=True)
    return frame[BASE_COLUMNS + [c for c in frame.columns if c not in BASE_COLUMNS]]


def drop_duplicate_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (settings, seed) among the finished runs: a sweep run again into a new folder, or a training run
    beside the evaluation of its model, is one measurement, not two seeds. Of runs that share ``settings_id`` and
    ``seed``, the first by ``run`` (its folder; for W&B its path) is kept: chosen from names alone, so the report is the
    same on every copy of the folders (file times are not kept by every copy), and with Hydra's dated folders it is
    the earliest launch. The kept row takes the values it lacks from the others (the test metrics of an evaluation
    of its model, say). Each row left out is named in a warning beside the row kept."""
    if "settings_id" not in frame or "seed" not in frame or frame.empty:
        return frame
    finished = frame["status"].eq("finished") & frame["settings_id"].notna() & frame["seed"].notna()
    dropped = []
    for _, group in frame[finished].sort_values("run").groupby(["settings_id", "seed"], sort=False):
        if len(group) < 2:
            continue
        kept = group.index[0]
        frame.loc[kept] = group.bfill().iloc[0]
        for other in group.index[1:]:
            log.warning(
                "%s and %s hold the same settings and seed %s: counted once, as %s",
                group.at[kept, "run"],
                group.at[other, "run"],
                group.at[kept, "seed"],
                group.at[kept, "run"],
            )
            dropped.append(other)
    return frame.drop(index=dropped).reset_index(drop=True)


class RunFileError(ValueError):
    """A run's config.json, summary.json or model row cannot be read; the message names the file."""


def read_json(path: Path) -> dict[str, Any]:
    """A run file as a dict, with the non-finite numbers that runs write as "nan", "inf", "-inf" made floats again."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunFileError(f"cannot read {path}: {error}") from None
    except RecursionError:  # Python's parser recurses once per level
        raise RunFileError(f"cannot read {path}: nested too deeply (no run writes more than a few levels)") from None
    if not isinstance(record, dict):
        raise RunFileError(f"cannot read {path}: not a JSON object")
    return {key: _number(value) for key, value in record.items()}


def read_array(path: Path) -> np.ndarray:
    """A run's ``.npy`` file (``latent_norms.npy``) as a float array; RunFileError naming it when it cannot be read
    or holds Python objects (which ``allow_pickle=False`` refuses to unpickle) or anything but numbers."""
    try:
        with path.open("rb") as f:
            array = np.load(f, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise RunFileError(f"cannot read {path}: {error}") from None
    if not isinstance(array, np.ndarray) or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise RunFileError(f"cannot read {path}: not an array of numbers")
    return array.astype(float)


def _number(value: Any) -> Any:
    return float(value) if value in ("nan", "inf", "-inf") else value


def collect_runs(path: str | Path, include_unfinished: bool = False) -> pd.DataFrame:
    """Every run below ``path`` (a run dir, a sweep dir or outputs/) that wrote a summary.json.

    Runs whose summary's ``status`` is not "finished" (e.g. "stopped" by a signal) are left out unless
    ``include_unfinished``; summaries written before the ``status`` key existed count as finished. Runs without a
    summary (still running, or failed: see ``failed_runs``) are never included. In an evaluation folder, a model
    listed in its config but without a row (the evaluation was stopped or killed first) is an unfinished row.
    A file that cannot be read raises RunFileError naming it.
    """
    rows = [_evaluated_row(file) for file in sorted(Path(path).rglob("models/*.json"))]
    for summary_path in sorted(Path(path).rglob("summary.json")):
        run_dir = summary_path.parent
        config_path = run_dir / "config.json"
        config = read_json(config_path) if config_path.exists() else {}
        summary = read_json(summary_path)
        if (run_dir / "models").is_dir():  # an evaluation: its models are the rows above, the missing ones here
            rows += _unevaluated_rows(run_dir, config, summary)
            continue
        summary.setdefault("status", "finished")
        if (run_dir / "interpolations.png").is_file():  # a training job evaluated with task.evaluate=true
            summary.setdefault("interpolations", str(run_dir / "interpolations.png"))
        rows.append(_row("local", str(run_dir), str(run_dir), config, summary))
    return _frame(rows, include_unfinished)


def _unevaluated_rows(run_dir: Path, config: dict[str, Any], summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The models an evaluation lists but has no row for, with the evaluation's status (e.g. "stopped")."""
    listed = [Path(p).stem for p in config.get("evaluation", {}).get("checkpoints", [])]
    status = summary.get("status", "finished")
    status = "unfinished" if status == "finished" else status
    return [
        {
            "source": "local",
            "run": str(run_dir / "models" / f"{name}.json"),
            "run_dir": str(run_dir),
            "model": name,
            "status": status,
            "variant": None,
        }
        for name in listed
        if not (run_dir / "models" / f"{name}.json").exists()
    ]


def _evaluated_row(file: Path) -> dict[str, Any]:
    """One model of an evaluation folder (``models/<name>.json``) as a run row: the config it was trained with,
    its evaluation metrics as ``test/<metric>`` (the keys a run's own evaluation writes), its latent norms file."""
    record = read_json(file)
    record.pop("settings", None)
    record.pop("checkpoint_sha256", None)
    config = record.pop("config", None) or {}
    summary = {"status": "finished", "model": record.pop("model", file.stem), "variant": record.pop("variant", None)}
    summary |= {k: record.pop(k) for k in ("epochs", "checkpoint") if k in record}
    summary |= {f"test/{k}": v for k, v in record.items()}
    norms = file.with_name(f"{file.stem}_latent_norms.npy")
    summary["latent_norms"] = str(norms) if norms.exists() else None
    grid = file.parent.parent / f"interpolations_{file.stem}.png"
    summary["interpolations"] = str(grid) if grid.exists() else None
    return _row("local", str(file), str(file.parent.parent), config, summary)


def failed_runs(path: str | Path) -> pd.DataFrame:
    """Jobs below ``path`` that failed: they left an ``error.txt`` (first line: the error) and no summary."""
    rows = [
        {"run_dir": str(error.parent), "error": (error.read_text().splitlines() or [""])[0]}
        for error in sorted(Path(path).rglob("error.txt"))
        if not (error.parent / "summary.json").exists()
    ]
    return pd.DataFrame(rows, columns=["run_dir", "error"])


def _wandb_summary(summary: Any) -> dict[str, Any]:
    """A W&B run summary as plain values: W&B's own keys (``_step``, ``_runtime``, ...) and media are dropped."""
    values = dict(getattr(summary, "_json_dict", summary))
    return {
        key: value
        for key, value in values.items()
        if not key.startswith("_") and not (isinstance(value, dict) and "_type" in value)
    }


def collect_wandb(
    project: str,
    entity: str | None = None,
    filters: dict[str, Any] | None = None,
    include_unfinished: bool = False,
) -> pd.DataFrame:
    """The runs of a W&B project through the public API, with the same columns as ``collect_runs``.

    ``filters`` is W&B's MongoDB-style run filter, e.g. ``{"config.loss.beta": 5}``. A run's status is its
    summary's ``status`` when it logged one, else W&B's run state ("finished", "crashed", "failed", "running").
    """
    import wandb

    path = f"{entity}/{project}" if entity else project
    rows = []
    for run in wandb.Api().runs(path, filters=filters):
        config = {key: value for key, value in dict(run.config).items() if not key.startswith("_")}
        summary = _wandb_summary(run.summary)
        summary.setdefault("status", run.state)
        rows.append(_row("wandb", "/".join(run.path), None, config, summary))
    return _frame(rows, include_unfinished)


def load_runs(source: str | Path, include_unfinished: bool = False) -> pd.DataFrame:
    """Runs from a local folder, or from W&B when ``source`` is ``wandb:ENTITY/PROJECT`` (or ``wandb:PROJECT``).
    A folder that does not exist raises RunFileError: a report on nothing would look like a report on no runs."""
    text = str(source)
    if text.startswith("wandb:"):
        entity, _, project = text.removeprefix("wandb:").rpartition("/")
        return collect_wandb(project, entity=entity or None, include_unfinished=include_unfinished)
    if not Path(source).is_dir():
        raise RunFileError(f"no such folder of runs: {Path(source).resolve()}")
    return collect_runs(source, include_unfinished=include_unfinished)
