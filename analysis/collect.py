"""Gather runs into a pandas DataFrame: one row per run, config keys flattened, summary metrics beside them.

    from analysis.collect import collect_runs
    frame = collect_runs("outputs/multirun/2026-11-25/12-00-00")

Reads only the files every run writes (``config.json``, ``summary.json``), so it needs no W&B and no network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd


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


def collect_runs(path: str | Path) -> pd.DataFrame:
    """Every run below ``path`` (a run dir, a sweep dir or outputs/) that finished with a summary.json.

    Columns: ``run_dir``, the flattened config (``loss.beta``, ``seed``, ...) and the summary's metrics
    (``val/mse``, ...). Runs without a summary (still running, or failed) are left out.
    """
    rows = []
    for summary_path in sorted(Path(path).rglob("summary.json")):
        run_dir = summary_path.parent
        config_path = run_dir / "config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        rows.append({"run_dir": str(run_dir), **flatten(config), **json.loads(summary_path.read_text())})
    return pd.DataFrame(rows)
