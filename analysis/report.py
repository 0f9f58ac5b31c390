"""One report over a folder of runs: ``report.md`` (counts, comparison table, figures) plus the table as CSV and
the figures as PNG.

    python -m analysis.report outputs/multirun/2026-11-25/12-00-00            # writes into its report/ folder
    python -m analysis.report outputs --out reports/all                       # every run below outputs/
    python -m analysis.report wandb:ENTITY/PROJECT --out reports/wandb         # the runs of a W&B project
    python -m analysis.report outputs/reproduce/evaluation --by-metric        # the models of an evaluation

A figure the runs cannot support (a single beta for the heatmaps, no ``latent_norms.npy``) is skipped and the
report says why.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import figures
from analysis.collect import failed_runs, load_runs
from analysis.tables import (
    choose_semantic_weight,
    comparison_table,
    difference_table,
    raw_term,
    to_markdown,
    to_markdown_by_metric,
    variant_rank,
)
from semvae.evaluation.report import markdown

# Config keys that split runs into rows when they differ: the loss, the model, the data and how long and how it trained
# (a 6-step smoke run is never averaged with a 50-epoch run)
GROUP_CANDIDATES = (
    "loss.beta",
    "loss.semantic_weight",
    "loss.semantic.normalize",
    "loss.semantic.step",
    "loss.semantic.n_directions",
    "loss.semantic.directions",
    "model.latent_dim",
    "data.name",
    "trainer.epochs",
    "trainer.limit_train_batches",
    "trainer.batch_size",
    "trainer.lr",
)
FIGURES: dict[str, Callable[[pd.DataFrame, Path], Path]] = {
    "heatmaps": figures.heatmaps,
    "lambda_trends": figures.lambda_trends,
    "pareto_settings": figures.pareto_settings,
    "pareto_front": figures.pareto_front,
    "latent_norms": figures.latent_norm_distributions,
    "interpolations": figures.interpolations,
}


def grouping_keys(frame: pd.DataFrame, candidates: Sequence[str] = GROUP_CANDIDATES) -> list[str]:
    """``variant`` plus each candidate config key that varies among the runs, so that runs of one row differ only in
    their seed."""
    return ["variant"] + [key for key in candidates if key in frame and frame[key].nunique(dropna=False) > 1]


def _counts(source: str, runs: pd.DataFrame, failed: pd.DataFrame) -> list[str]:
    """The report's header lines: what was read and how many runs, failures and seeds it holds."""
    finished = runs[runs["status"] == "finished"]
    unfinished = runs[runs["status"] != "finished"]
    seeds = sorted(finished["seed"].dropna().unique()) if "seed" in finished else []
    seeds = [int(s) if float(s).is_integer() else s for s in seeds]
    counts = finished["variant"].value_counts()
    variants = sorted(counts.items(), key=lambda item: (variant_rank(item[0]), item[0]))
    lines = [
        f"Runs read from `{source}`.",
        "",
        f"- finished runs: {len(finished)}" + (f" ({', '.join(f'{k}: {v}' for k, v in variants)})" if variants else ""),
        f"- unfinished runs (left out): {len(unfinished)}"
        + (f" ({', '.join(sorted(unfinished['status'].astype(str).unique()))})" if len(unfinished) else ""),
        f"- failed jobs (error.txt): {len(failed)}",
        f"- seeds: {len(seeds)}" + (f" ({', '.join(str(s) for s in seeds)})" if seeds else ""),
    ]
    return lines


def _seeds(table: pd.DataFrame) -> pd.Series:
    """The runs (seeds) of each group of a comparison table: the most that any metric has."""
    return table.xs("n", axis=1, level=1).max(axis=1)


def _failures(failed: pd.DataFrame, root: Path) -> list[str]:
    if failed.empty:
        return []
    lines = ["", "## Failed jobs", ""]
    for _, job in failed.iterrows():
        where = Path(job["run_dir"])
        lines.append(f"- `{where.relative_to(root) if where.is_relative_to(root) else where}`: {job['error']}")
    return lines


def _differences(
    vaes: pd.DataFrame, by: list[str], baseline: str, confidence: float, render: Callable, out: Path
) -> list[str]:
    """The section of each variant minus ``baseline`` (``differences_from_<baseline>.csv`` beside it), when each
    variant is one group (its loss settings fixed, as in experiment=reproduce) and ``baseline`` is among them; a
    sweep's variants span several loss settings and have no single baseline."""
    variants = vaes["variant"].nunique()
    if baseline not in set(vaes["variant"]) or variants < 2 or vaes.groupby(by, dropna=False).ngroups != variants:
        return []
    table = difference_table(vaes, baseline=baseline, confidence=confidence)
    csv = out / f"differences_from_{baseline}.csv"
    table.to_csv(csv)
    return [
        "",
        f"## Differences from {baseline} (difference of means ± {confidence:.0%} Welch t-interval half-width)",
        "",
        "An interval that leaves out 0 is a difference the seeds support; one that holds 0 is not.",
        "",
        render(table).rstrip("\n"),
        "",
        f"As CSV: [{csv.name}]({csv.name})",
    ]


def _difference(value: float, half_width: float) -> str:
    """``+0.0043 ± 0.0028``, or the difference alone, said to have no interval, where a side has one seed."""
    if not np.isfinite(half_width):
        return f"{value:+.2g} (one seed on a side: no interval)"
    return f"{value:+.2g} ± {half_width:.2g}"


def _single_runs(table: pd.DataFrame) -> list[str]:
    """A warning where groups hold one run: their values are single runs', with no interval."""
    if table.empty:
        return []
    counts = table.xs("n", axis=1, level=1).max(axis=1)
    single = int((counts < 2).sum())
    if not single:
        return []
    which = "Every group holds" if single == len(counts) else f"{single} of {len(counts)} groups hold"
    which = which + "s" if single == 1 and single != len(counts) else which
    return [
        f"{which} one run: its values are that run's, without an interval, and a difference between such groups "
        "is not a finding (train more seeds: `seed=0,1,2`).",
        "",
    ]


# the evaluation behind docs/results.md; a run evaluated otherwise is not comparable with it
RESULTS_EVALUATION = {"n_points": 1000, "morpho_points": 200, "n_random_directions": 64, "limit_test": None}


def _evaluation_settings(vaes: pd.DataFrame) -> list[str]:
    """The evaluation settings of the runs where they are not those of docs/results.md, which their values cannot
    then be read against."""
    found = []
    for key, default in RESULTS_EVALUATION.items():
        column = f"evaluation.{key}"
        if column not in vaes or vaes.filter(like="test/").empty:
            continue
        values = {None if pd.isna(v) else v for v in vaes[column]}
        if values != {default}:
            listed = ", ".join("null" if v is None else f"{v:g}" for v in sorted(values, key=lambda v: (v is None, v)))
            found.append(f"`{column}={listed}`")
    if not found:
        return []
    return [
        f"Evaluated with {', '.join(found)}: not the settings of docs/results.md, so these values are not "
        "comparable with its numbers (a smaller evaluation has a larger error; docs/evaluation.md).",
        "",
    ]


def _preset_rule(vaes: pd.DataFrame, confidence: float) -> list[str]:
    """The semantic preset's lambda by the rule of ``choose_semantic_weight``, when the runs hold beta = 1 with
    lambda = 0 and some lambda > 0 (a lambda sweep)."""
    if "loss.beta" not in vaes or "loss.semantic_weight" not in vaes:
        return []
    at_one = vaes[(pd.to_numeric(vaes["loss.beta"], errors="coerce") == 1) & ~raw_term(vaes)]
    weights = set(pd.to_numeric(at_one["loss.semantic_weight"], errors="coerce").dropna())
    if 0 not in weights or len(weights) < 2 or "test/gsv_norm_heldout" not in at_one or "test/mse" not in at_one:
        return []
    chosen, table = choose_semantic_weight(at_one, confidence=confidence)
    if chosen is not None:
        verdict = f"lambda = {chosen:g}"
    elif table["qualifies"].isna().any():
        pending = ", ".join(f"{w:g}" for w in table.index[table["qualifies"].isna()])
        verdict = (
            f"undecided: no MSE interval yet for lambda = {pending} (one seed on a side of the comparison), or its "
            "accuracy on reconstructions not yet read by every judge of the rule (held-out, mlp, cnn)"
        )
    else:
        verdict = "none qualifies: keep lambda = 0 (no semantic term)"
    rows = [
        [
            f"{weight:g}",
            f"{row['test/mse']:.4g}",
            _difference(row["mse_excess"], row["mse_excess half_width"]),
            f"{row['allowed_excess']:.2g}",
            f"{row['test/gsv_norm_heldout']:.4g}",
            {True: "yes", False: "no"}.get(row["qualifies"], "needs 2+ seeds"),
        ]
        for weight, row in table.iterrows()
    ]
    header = ["lambda", "MSE", "MSE - MSE(lambda=0)", "allowed", "GSV norm (held-out)", "qualifies"]
    return [
        "",
        "## The semantic preset's lambda (beta = 1)",
        "",
        "Rule, fixed before the sweep: the lowest mean held-out normalised GSV among the lambdas whose MSE excess over "
        f"lambda = 0 stays, with {confidence:.0%} confidence (upper end of its Welch interval), within 10% of the "
        "lambda = 0 MSE, and whose accuracy on reconstructions under each of the held-out, mlp and cnn judges (never "
        "phi alone) stays, with the same confidence, within 1 percentage point of lambda = 0's.",
        "",
        markdown(header, rows).rstrip("\n"),
        "",
        f"Chosen: {verdict}.",
    ]


def _evaluate_hint(vaes: pd.DataFrame, skipped: Exception) -> str:
    """What to do when a figure lacks the test-split metrics: the runs were not evaluated."""
    if "test/" not in str(skipped) and "latent_norms" not in str(skipped) and "interpolation" not in str(skipped):
        return ""
    if any(c.startswith("test/") for c in vaes.columns):
        return ""
    return (
        " (the runs were not evaluated: run the sweep with `task.evaluate=true`, and `evaluation=smoke` for a "
        "quick look, or `python run.py task=evaluate 'evaluation.checkpoints=[...]'` on their model.pth)"
    )


def write_report(
    source: str | Path,
    out: str | Path | None = None,
    confidence: float = 0.95,
    by_metric: bool = False,
    baselines: Sequence[str] | None = None,
) -> Path:
    """Write ``report.md``, ``comparison.csv`` and the figures' PNGs for the runs of ``source`` (a folder, or
    ``wandb:ENTITY/PROJECT``) into ``out`` (default: the folder's ``report/``, so that an evaluation's own
    ``comparison.csv`` and figures are never overwritten); return the report's path. ``by_metric`` writes
    the table with one row per metric and one column per group (few groups, many metrics). When the runs differ
    only in variant and seed, the report adds each variant minus each of ``baselines`` (default: vae, when there
    is one) as ``differences_from_<baseline>.csv``; a baseline given that names no variant of the runs raises
    ValueError before anything is written."""
    source = str(source)
    local = not source.startswith("wandb:")
    if out is None and not local:
        raise ValueError("a W&B source needs an output folder")
    out = Path(out if out is not None else Path(source) / "report")
    runs = load_runs(source, include_unfinished=True)
    failed = failed_runs(source) if local else pd.DataFrame(columns=["run_dir", "error"])
    vaes = runs[(runs["status"] == "finished") & (runs["variant"] != "classifier")]
    variants = sorted(set(vaes["variant"].dropna()), key=variant_rank)
    for baseline in baselines or ():
        if baseline not in variants:
            raise ValueError(f"--baseline {baseline}: no finished run of that variant; variants: {', '.join(variants)}")
    baselines = baselines if baselines is not None else ["vae"]
    out.mkdir(parents=True, exist_ok=True)

    lines = ["# Run report", "", *_counts(source, runs, failed), ""]
    by = grouping_keys(vaes)
    table = comparison_table(vaes, by=by, confidence=confidence)
    lines += [f"## Comparison (mean ± {confidence:.0%} t-interval half-width over seeds where n ≥ 2; n = runs)", ""]
    lines += _single_runs(table) + _evaluation_settings(vaes)
    if table.empty:
        lines.append("No finished VAE run with metrics to compare.")
    else:
        table.to_csv(out / "comparison.csv")
        render = to_markdown_by_metric if by_metric else to_markdown
        varied = f" and value of {', '.join(by[1:])}, the settings that differ between the runs" if by[1:] else ""
        lines += [f"One group per variant{varied}.", ""]
        lines += [render(table).rstrip("\n"), "", "As CSV: [comparison.csv](comparison.csv)"]
        single = [" ".join(map(str, k if isinstance(k, tuple) else (k,))) for k in table.index[_seeds(table) == 1]]
        if single:
            lines += ["", f"Read from one seed, so the mean alone and no interval: {', '.join(single)}."]
        for baseline in baselines:
            lines += _differences(vaes, by, baseline, confidence, render, out)

    lines += _preset_rule(vaes, confidence)
    lines += ["", "## Figures", ""]
    raw = vaes[raw_term(vaes)]
    if len(raw):
        settings = ", ".join(sorted(set(raw.apply(figures.setting_label, axis=1))))
        lines += [
            f"{len(raw)} run(s) trained with the raw semantic term ({settings}): their own rows in the comparison and "
            "their own points (squares) in pareto_settings; the heatmaps, lambda_trends and the preset rule read the "
            "runs with the normalised term.",
            "",
        ]
    for name, draw in FIGURES.items():
        try:
            written = draw(vaes, out / f"{name}.png")
        except figures.FigureSkipped as skipped:
            lines += [f"### {name}", "", f"Skipped: {skipped}{_evaluate_hint(vaes, skipped)}.", ""]
        else:
            lines += [f"### {name}", "", f"![{name}]({written.name})", ""]
    lines += _failures(failed, Path(source))

    report = out / "report.md"
    report.write_text("\n".join(lines).rstrip("\n") + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write report.md, comparison.csv and figures for a folder of runs.")
    parser.add_argument("path", help="a run, a sweep folder, outputs/, or wandb:ENTITY/PROJECT")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: PATH/report; needed for W&B)")
    parser.add_argument("--confidence", type=float, default=0.95, help="of the t-intervals (default: 0.95)")
    parser.add_argument("--by-metric", action="store_true", help="one table row per metric, a column per group")
    parser.add_argument(
        "--baseline",
        action="append",
        help="a variant to take differences from; repeat for several (default: vae, when there is one)",
    )
    args = parser.parse_args(argv)
    if args.path.startswith("wandb:"):
        if args.out is None:
            parser.error("--out is needed with a W&B source")
    elif not Path(args.path).is_dir():
        parser.error(f"{args.path}: no such folder")
    try:
        print(write_report(args.path, args.out, args.confidence, args.by_metric, args.baseline))
    except ValueError as error:  # a run file that cannot be read (RunFileError), a --baseline of no run: one line
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
