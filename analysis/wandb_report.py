"""A W&B Report comparing the runs of a folder (a sweep, ``experiment=reproduce``, any runs), built with W&B's own
report API (``wandb-workspaces``):

    python -m analysis.wandb_report outputs/multirun/2026-11-29/10-00-00_ab12cd            # print the report's outline
    python -m analysis.wandb_report outputs/multirun/... --entity ME --save                # create it on W&B

The report holds: the comparison table over seeds (the one of ``python -m analysis.report``), a parallel-coordinates
plot from the loss weights (β, λ) to the test MSE and the normalised GSV under every judge, the MSE-against-GSV
scatter per judge, the interpolation grids, and, for an evaluation run, its per-model ``comparison`` table.
Its run set holds exactly the W&B runs of the folder (by the ids in each run dir's ``wandb.json``), so the runs must
be on W&B first: ``wandb sync FOLDER/**/wandb/offline-run-*`` for offline runs. ``--save`` needs a W&B account
(``wandb login``); without it the command only builds the report and prints what it holds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.collect import RunFileError, load_runs
from analysis.report import grouping_keys
from analysis.tables import available_metrics, comparison_table, to_markdown

JUDGES = ("train", "heldout", "morpho")


class NothingToReport(ValueError):
    """The folder holds no run that was logged to W&B."""


def wandb_runs(folder: Path) -> list[dict[str, Any]]:
    """The ``wandb.json`` of every run dir below ``folder`` (written when the run logged to W&B), with its run dir."""
    records = []
    for path in sorted(folder.rglob("wandb.json")):
        record = json.loads(path.read_text())
        records.append(record | {"run_dir": str(path.parent)})
    return records


def build(folder: str | Path, entity: str | None = None, project: str | None = None, title: str | None = None):
    """The Report (``wandb_workspaces.reports.v2.Report``) for the runs of ``folder``; nothing is sent to W&B."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    folder = Path(folder)
    logged = wandb_runs(folder)
    if not logged:
        raise NothingToReport(
            f"no run below {folder} was logged to W&B (no wandb.json): runs with logger=none cannot be reported"
        )
    projects = sorted({r["project"] for r in logged if r.get("project")})
    project = project or (projects[0] if projects else "semvae")
    entity = entity or next((r["entity"] for r in logged if r.get("entity")), None) or "ENTITY"
    ids = [r["id"] for r in logged]
    runs = load_runs(folder)
    runs = runs[runs["run_dir"].isin({r["run_dir"] for r in logged})]  # the table holds the runs of the run set
    vaes = runs[runs["variant"].notna() & (runs["variant"] != "classifier")]
    metrics = available_metrics(vaes)
    judges = [j for j in JUDGES if f"test/gsv_norm_{j}" in vaes]

    runset = wr.Runset(entity=entity, project=project, name=folder.name, filters=expr.And(expr.Metric("ID").isin(ids)))
    columns = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(key)) for key in ("loss.beta", "loss.semantic_weight")]
    outcomes = [key for key in ["test/mse"] + [f"test/gsv_norm_{j}" for j in judges] if key in vaes]
    outcomes = outcomes or ["val/mse", "val/neg_elbo"]  # runs trained without task.evaluate=true
    columns += [wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(key)) for key in outcomes]
    panels: list[Any] = [wr.ParallelCoordinatesPlot(columns=columns, layout=wr.Layout(w=24, h=8))]
    panels += [
        wr.ScatterPlot(
            title=f"MSE against normalised GSV ({judge} judge)",
            x=wr.SummaryMetric("test/mse"),
            y=wr.SummaryMetric(f"test/gsv_norm_{judge}"),
        )
        for judge in judges
    ]
    if "interpolations" in vaes and vaes["interpolations"].notna().any():  # jobs evaluated with task.evaluate=true
        panels.append(wr.MediaBrowser(title="interpolations", media_keys=["test/interpolations"], num_columns=3))
    evaluations = [r for r in logged if r.get("job_type") == "evaluate"]
    if evaluations:  # task=evaluate runs log their rows as a W&B table named "comparison"
        panels.append(wr.WeavePanelSummaryTable(table_name="comparison", layout=wr.Layout(w=24, h=10)))
        names = runs["model"].dropna().unique() if "model" in runs else []
        panels.append(wr.MediaBrowser(title="interpolations", media_keys=[f"interpolations/{n}" for n in names]))

    table = ""
    if metrics and not vaes.empty:
        table = to_markdown(comparison_table(vaes, by=grouping_keys(vaes), metrics=metrics))
    blocks = [
        wr.MarkdownBlock(
            text=f"Runs of `{folder}` ({len(ids)} W&B runs). Each cell of the table is the mean over seeds ± the "
            "half-width of its 95% t-interval; lower MSE and lower normalised GSV are better, and a normalised GSV is "
            "read beside how much the judge's reading changes (`test/gsv_change_*`)."
        ),
        wr.H2("Comparison over seeds"),
        wr.MarkdownBlock(text=table or "(no finished VAE run with test metrics)"),
        wr.H2("Loss weights, reconstruction and semantic consistency"),
        wr.PanelGrid(runsets=[runset], panels=panels),
    ]
    return wr.Report(
        entity=entity,
        project=project,
        title=title or f"semvae: {folder.name}",
        description=f"Made by python -m analysis.wandb_report {folder}",
        blocks=blocks,
    )


def outline(report) -> str:
    """What the report holds, block by block and panel by panel, as text."""
    lines = [f"W&B report '{report.title}' in {report.entity}/{report.project}"]
    for block in report.blocks:
        name = type(block).__name__
        if name == "PanelGrid":
            for runset in block.runsets:
                lines.append(f"  runset '{runset.name}' ({runset.entity}/{runset.project}): {runset.filters}")
            for panel in block.panels:
                lines.append(f"  panel {_describe(panel)}")
        else:
            text = getattr(block, "text", "")
            first = text.splitlines()[0] if text else ""
            lines.append(f"  {name}: {first[:100]}")
    return "\n".join(lines)


def _describe(panel) -> str:
    name = type(panel).__name__
    if name == "ParallelCoordinatesPlot":
        return f"{name}: " + " -> ".join(c.metric.name for c in panel.columns)
    if name == "ScatterPlot":
        return f"{name}: x={panel.x.name}, y={panel.y.name}"
    if name == "MediaBrowser":
        return f"{name}: {', '.join(panel.media_keys)}"
    if name == "WeavePanelSummaryTable":
        return f"{name}: {panel.table_name}"
    return name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a sweep, reproduce, evaluation or outputs folder")
    parser.add_argument("--entity", help="W&B entity (default: the runs' logger.entity, else your default entity)")
    parser.add_argument("--project", help="W&B project (default: the runs' logger.project)")
    parser.add_argument("--title")
    parser.add_argument("--save", action="store_true", help="create the report on W&B (needs `wandb login`)")
    parser.add_argument("--draft", action="store_true", help="with --save: save it as a draft")
    args = parser.parse_args(argv)
    entity = args.entity
    try:
        if args.save and entity is None and not any(r.get("entity") for r in wandb_runs(args.folder)):
            import wandb

            try:
                entity = wandb.Api().default_entity
            except Exception as error:  # noqa: BLE001 - not logged in
                print(f"error: W&B: {error}; `wandb login` first, or pass --entity", file=sys.stderr)
                raise SystemExit(1) from None
        report = build(args.folder, entity=entity, project=args.project, title=args.title)
    except (NothingToReport, RunFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(outline(report))
    if args.save:
        try:
            report.save(draft=args.draft)
        except Exception as error:  # noqa: BLE001 - no key, no network, no such entity: W&B's message, one line
            print(
                f"error: W&B did not save the report ({type(error).__name__}: {error}); `wandb login` first",
                file=sys.stderr,
            )
            raise SystemExit(1) from None
        print(f"saved: {report.url}")
    else:
        print("not saved: pass --save (with a W&B account) to create it")


if __name__ == "__main__":
    pd.set_option("display.width", 200)
    main()
