"""Execute a notebook of analysis/ (a jupytext percent-format .py file) and write it with its outputs.

It needs only what the install provides (jupytext, nbclient, ipykernel; no nbconvert):

    python -m analysis.notebooks compare_models                    # runs under outputs/
    python -m analysis.notebooks sweep_report --runs outputs/multirun/2026-11-29/10-00-00_ab12cd

The executed notebook, outputs included, goes to ``outputs/analysis/NAME.ipynb`` (``--out``), its figures beside it;
a notebook that fails goes to ``NAME.failed.ipynb`` beside it, so the last good one stays.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import pandas as pd

from analysis.collect import load_runs

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("compare_models", "sweep_report")


class NoRuns(ValueError):
    """A notebook was pointed at runs that are not there; it refuses to report on nothing."""


def runs_source() -> str:
    """``$SEMVAE_RUNS``: a folder (a relative one is read from the repository root, wherever the kernel runs) or
    ``wandb:ENTITY/PROJECT``; default ``outputs/``."""
    source = os.environ.get("SEMVAE_RUNS", "outputs")
    if source.startswith("wandb:"):
        return source
    path = Path(source).expanduser()
    return str(path if path.is_absolute() else ROOT / path)


def figures_dir() -> Path:
    path = Path(os.environ.get("SEMVAE_FIGURES", "outputs/analysis")).expanduser()
    return path if path.is_absolute() else ROOT / path


def load_vae_runs() -> tuple[str, pd.DataFrame]:
    """The finished VAE runs of ``runs_source()``; NoRuns if there are none."""
    source = runs_source()
    frame = load_runs(source)
    vaes = frame[frame["variant"] != "classifier"] if "variant" in frame else frame
    if vaes.empty:
        raise NoRuns(f"no finished VAE runs in {source}: set SEMVAE_RUNS to a run, sweep or evaluation folder")
    return source, vaes


def execute(name: str, runs: str | None = None, out: Path | None = None, timeout: int = 600) -> Path:
    """Execute ``analysis/NAME.py`` in a kernel started in the repository root and write it with its outputs."""
    import jupytext
    import nbclient

    if runs is not None:
        os.environ["SEMVAE_RUNS"] = str(Path(runs).resolve()) if not runs.startswith("wandb:") else runs
    out = out or figures_dir() / f"{name}.ipynb"
    notebook = jupytext.read(ROOT / "analysis" / f"{name}.py")
    client = nbclient.NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        client.execute()
    except Exception:
        jupytext.write(notebook, out.with_suffix(".failed.ipynb"), fmt="ipynb")  # the last good notebook stays
        raise
    jupytext.write(notebook, out, fmt="ipynb")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=NOTEBOOKS)
    parser.add_argument("--runs", help="folder of runs (or wandb:ENTITY/PROJECT); default $SEMVAE_RUNS or outputs/")
    parser.add_argument("--out", type=Path, help="executed notebook (default outputs/analysis/NAME.ipynb)")
    args = parser.parse_args(argv)
    from nbclient.exceptions import CellExecutionError

    try:
        path = execute(args.name, args.runs, args.out)
    except CellExecutionError as error:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # the kernel colours its tracebacks
        last = [line for line in plain.strip().splitlines() if line.strip()][-1]
        print(f"error: the notebook {args.name} failed: {last}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"executed notebook: {path}")


if __name__ == "__main__":
    main()
