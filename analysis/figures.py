"""Figures over a runs DataFrame (``analysis.collect``), drawn with seaborn and written as PNG.

Each function takes the frame and the file to write and returns that path. Figures are built on
``matplotlib.figure.Figure`` (rendered by Agg when saved), never through pyplot's global state, so they work headless
and leave a notebook's backend alone. A figure the data cannot support raises ``FigureSkipped`` with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from analysis.collect import read_array
from analysis.tables import comparison_table, is_false, raw_term, variant_rank
from semvae.evaluation.report import latent_norm_density, save_figure
from semvae.variants import run_name

BETA, SEMANTIC_WEIGHT = "loss.beta", "loss.semantic_weight"


class FigureSkipped(ValueError):
    """The runs do not hold what a figure needs; the message says what is missing."""


def seeds_note(counts: pd.Series | Sequence[int], confidence: float = 0.95) -> str:
    """What a figure's ± means, with its n: ``n = 3 seeds per setting; ± 95% t-interval``, ``n = 1-3 ...; ± only
    where n >= 2``, or ``n = 1 per setting: single runs, no interval``. A figure never says "interval over seeds"
    where a point is one run."""
    counts = [int(c) for c in pd.Series(counts).dropna()]
    low, high = (min(counts), max(counts)) if counts else (0, 0)
    n = f"n = {low}" if low == high else f"n = {low}-{high}"
    if high < 2:
        return f"{n} per setting: single runs, no interval"
    where = "" if low >= 2 else " only where n ≥ 2"
    return f"{n} seeds per setting; ± {confidence:.0%} t-interval{where}"


def _save(fig: Figure, path: str | Path) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)


def _hue_order(variants: pd.Series) -> list[str]:
    """Variants present, in the usual order (vae, beta, semantic, ...), unknown ones after."""
    return sorted(variants.dropna().unique(), key=lambda v: (variant_rank(v), v))


def grid_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """The runs of the beta x lambda grid: every run but those trained with the raw semantic term
    (``loss.semantic.normalize=false`` at lambda > 0, experiment=semantic_raw). The raw arm is another loss, so the
    heatmaps and the lambda trends never average it into a grid cell; ``pareto_settings`` draws it beside the grid."""
    return frame[~raw_term(frame)]


def setting_label(run: pd.Series) -> str:
    """A run's loss setting as its default run name (``VAE``, ``semanticVAE-l100``, ``semanticVAE-l400-raw``), or
    its variant when the run has no loss weights."""
    if pd.isna(run.get(BETA)) or pd.isna(run.get(SEMANTIC_WEIGHT)):
        return str(run.get("variant"))
    return run_name(float(run[BETA]), float(run[SEMANTIC_WEIGHT]), not is_false(run.get("loss.semantic.normalize")))


def metric_grid(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean of ``metric`` over seeds on the grid ``loss.beta`` (rows) x ``loss.semantic_weight`` (columns)."""
    return frame.pivot_table(index=BETA, columns=SEMANTIC_WEIGHT, values=metric, aggfunc="mean").sort_index()


def interval_grid(frame: pd.DataFrame, metric: str, confidence: float = 0.95) -> pd.DataFrame:
    """beta x semantic weight grid of the half-width of the metric's t-interval over seeds (NaN for one seed)."""
    table = comparison_table(frame, by=[BETA, SEMANTIC_WEIGHT], metrics=[metric], confidence=confidence)
    return table[(metric, "half_width")].unstack(SEMANTIC_WEIGHT).sort_index()


def setting_table(frame: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Per (beta, semantic weight): each metric's mean, t-interval half-width and n over seeds, in flat columns
    ``METRIC`` / ``METRIC half_width`` / ``METRIC n``; one row per setting."""
    missing = [key for key in (BETA, SEMANTIC_WEIGHT) if key not in frame]
    if missing:
        raise FigureSkipped(f"no {', '.join(missing)} column in the runs")
    present = [m for m in metrics if m in frame and pd.to_numeric(frame[m], errors="coerce").notna().any()]
    if not present:
        raise FigureSkipped(f"no run has any of {', '.join(metrics)}")
    table = comparison_table(frame, by=[BETA, SEMANTIC_WEIGHT], metrics=present)
    flat = pd.DataFrame(index=table.index)
    for metric in present:
        flat[metric] = table[(metric, "mean")]
        flat[f"{metric} half_width"] = table[(metric, "half_width")]
        flat[f"{metric} n"] = table[(metric, "n")]
    return flat.reset_index().sort_values([BETA, SEMANTIC_WEIGHT], ignore_index=True)


TREND_METRICS = (
    "test/mse",
    "test/gsv_norm_heldout",
    "test/gsv_norm_morpho",
    "test/gsv_change_heldout",
    "test/recon_accuracy",
    "test/recon_top_class_share",
    "test/active_units",
    "test/latent_norm_mean",
)


def lambda_trends(frame: pd.DataFrame, path: str | Path, metrics: Sequence[str] = TREND_METRICS) -> Path:
    """Each metric against the semantic weight lambda (symmetric-log axis, so lambda = 0 is on it), one line per
    beta: the mean over seeds with its 95% t-interval. Needs at least two values of lambda. Runs with the raw
    semantic term are left out (``grid_runs``)."""
    table = setting_table(grid_runs(frame), metrics)
    if table[SEMANTIC_WEIGHT].nunique() < 2:
        raise FigureSkipped(f"a single semantic weight ({table[SEMANTIC_WEIGHT].iloc[0]}): no trend to draw")
    present = [m for m in metrics if m in table]
    columns = min(3, len(present))
    rows = -(-len(present) // columns)
    fig = Figure(figsize=(4.2 * columns, 3.3 * rows))
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    weights = sorted(table[SEMANTIC_WEIGHT].unique())
    styles = list(zip(("o", "s", "^", "D", "v"), ("-", "--", ":", "-."), (9, 7, 5, 4), strict=False))
    for ax, metric in zip(axes, present, strict=False):
        # one style per beta, hollow markers of decreasing size: lines that coincide stay visible
        for (beta, group), (marker, line, size) in zip(table.groupby(BETA), styles * len(table), strict=False):
            ax.errorbar(
                group[SEMANTIC_WEIGHT],
                group[metric],
                yerr=group[f"{metric} half_width"].fillna(0),
                marker=marker,
                linestyle=line,
                markersize=size,
                fillstyle="none",
                capsize=3,
                label=f"beta = {beta:g}",
            )
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(weights, [f"{w:g}" for w in weights])  # 0, 1, 10, ... as numbers, not 10^0 beside 0
        ax.minorticks_off()
        ax.set_xlabel("semantic weight lambda")
        ax.set_title(metric, fontsize=9)
    for ax in axes[len(present) :]:
        ax.set_axis_off()
    axes[0].legend(fontsize=8)
    counts = table[[f"{m} n" for m in present]].max(axis=1)
    fig.suptitle(f"mean over seeds ({seeds_note(counts)})", fontsize=9)
    return _save(fig, path)


def pareto_settings(
    frame: pd.DataFrame,
    path: str | Path,
    x: str = "test/mse",
    ys: Sequence[str] = ("test/gsv_norm_heldout", "test/gsv_norm_morpho"),
) -> Path:
    """One point per (beta, lambda) setting: its mean over seeds with 95% t-intervals on both axes, the settings
    no other setting beats on both means ringed and joined; one panel per GSV judge. Lower is better on both.
    Settings trained with the raw semantic term are points of their own (squares, "raw" in their label)."""
    arms = [(grid_runs(frame), "", "o"), (frame[raw_term(frame)], ", raw term", "s")]
    tables = [setting_table(runs, [x, *ys]).assign(arm=arm, marker=marker) for runs, arm, marker in arms if len(runs)]
    table = pd.concat(tables, ignore_index=True)
    panels = [y for y in ys if y in table and x in table]
    if not panels or len(table.dropna(subset=[x])) < 2:
        raise FigureSkipped(f"fewer than 2 settings with {x} and any of {', '.join(ys)}")
    fig = Figure(figsize=(5.4 * len(panels), 4.4))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, y in zip(axes, panels, strict=True):
        points = table.dropna(subset=[x, y])
        front = points[pareto_mask(points, x, y)].sort_values(x)
        for (arm, marker, beta), group in points.groupby(["arm", "marker", BETA], sort=False):
            ax.errorbar(
                group[x],
                group[y],
                xerr=group[f"{x} half_width"].fillna(0),
                yerr=group[f"{y} half_width"].fillna(0),
                fmt=marker,
                capsize=3,
                label=f"beta = {beta:g}{arm}",
            )
        for _, row in points.iterrows():
            label = f"λ={row[SEMANTIC_WEIGHT]:g}" + (" raw" if row["arm"] else "")
            ax.annotate(label, (row[x], row[y]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.plot(front[x], front[y], color="black", lw=1, drawstyle="steps-post", zorder=1)
        ax.scatter(front[x], front[y], s=160, facecolors="none", edgecolors="black", lw=1.2, label="Pareto-optimal")
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.legend(fontsize=7)
    counts = table[[f"{v} n" for v in (x, *ys) if f"{v} n" in table]].max(axis=1)
    fig.suptitle(f"settings: mean over seeds ({seeds_note(counts)}); lower is better on both", fontsize=9)
    return _save(fig, path)


def heatmaps(
    frame: pd.DataFrame, path: str | Path, metrics: Sequence[str] = ("test/mse", "test/gsv_norm_heldout")
) -> Path:
    """One annotated heatmap per metric: its mean over seeds for each (beta, semantic weight) of a sweep.

    Needs at least two values of each loss weight among the runs that have the metric. Runs with the raw
    semantic term are left out (``grid_runs``).
    """
    missing = [key for key in (BETA, SEMANTIC_WEIGHT) if key not in frame]
    if missing:
        raise FigureSkipped(f"no {', '.join(missing)} column in the runs")
    frame = grid_runs(frame)
    grids, reasons = {}, []
    for metric in metrics:
        runs = frame.dropna(subset=[metric]) if metric in frame else frame.iloc[:0]
        if runs.empty:
            reasons.append(f"no run has {metric}")
            continue
        few = [f"{k} = {runs[k].dropna().unique().tolist()}" for k in (BETA, SEMANTIC_WEIGHT) if runs[k].nunique() < 2]
        if few:
            reasons.append(f"{metric}: a single value of {' and '.join(few)}")
            continue
        grids[metric] = metric_grid(runs, metric)
    if not grids:
        raise FigureSkipped("; ".join(reasons))
    fig = Figure(figsize=(4.6 * len(grids), 3.8))
    axes = np.atleast_1d(fig.subplots(1, len(grids)))
    for ax, (metric, grid) in zip(axes, grids.items(), strict=True):
        runs = frame.dropna(subset=[metric])
        half = interval_grid(runs, metric).reindex_like(grid)
        labels = grid.map(lambda v: f"{v:.3g}") + half.map(lambda h: f"\n± {h:.2g}" if np.isfinite(h) else "")
        sns.heatmap(grid, annot=labels, fmt="", cmap="viridis", cbar_kws={"label": metric}, ax=ax)
        ax.invert_yaxis()  # smallest beta at the bottom, as on a plot's y axis
        counts = runs.groupby([BETA, SEMANTIC_WEIGHT])[metric].count()
        ax.set_title(f"{metric}: mean\n({seeds_note(counts)})", fontsize=9)
        ax.set_xlabel("semantic weight")
        ax.set_ylabel("beta")
    return _save(fig, path)


def pareto_mask(frame: pd.DataFrame, x: str, y: str) -> pd.Series:
    """Which rows are Pareto-optimal when both ``x`` and ``y`` are to be minimised.

    A row is optimal when no other row is at least as low on both and strictly lower on one; equal points are all
    optimal; rows missing ``x`` or ``y`` are not.
    """
    points = frame[[x, y]].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    valid = ~np.isnan(points).any(axis=1)
    px, py = points[:, 0], points[:, 1]
    no_worse = (px[None, :] <= px[:, None]) & (py[None, :] <= py[:, None])  # [i, j]: j is as good as i on both
    better = (px[None, :] < px[:, None]) | (py[None, :] < py[:, None])
    dominated = (no_worse & better & valid[None, :]).any(axis=1)
    return pd.Series(valid & ~dominated, index=frame.index, name="pareto")


def pareto_front(frame: pd.DataFrame, path: str | Path, x: str = "test/mse", y: str = "test/gsv_norm_heldout") -> Path:
    """Every run as a point (colour: variant), the Pareto-optimal runs (lower is better on both) ringed and joined."""
    missing = [key for key in (x, y) if key not in frame]
    if missing:
        raise FigureSkipped(f"no run has {', '.join(missing)}")
    runs = frame.dropna(subset=[x, y])
    if len(runs) < 2:
        raise FigureSkipped(f"{len(runs)} run(s) with both {x} and {y}; a front needs at least 2")
    front = runs[pareto_mask(runs, x, y)].sort_values(x)
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.subplots()
    hue = "variant" if "variant" in runs else None
    order = _hue_order(runs["variant"]) if hue else None
    sns.scatterplot(data=runs, x=x, y=y, hue=hue, hue_order=order, s=45, alpha=0.85, ax=ax)
    ax.plot(front[x], front[y], color="black", lw=1, drawstyle="steps-post", zorder=1)
    ax.scatter(front[x], front[y], s=140, facecolors="none", edgecolors="black", lw=1.2, label="Pareto-optimal")
    ax.set_title(f"trade-off over runs, one point per run (n = {len(runs)}; lower is better on both)", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def load_latent_norms(frame: pd.DataFrame) -> pd.DataFrame:
    """The latent norms of every run of ``frame`` that has them, long format: run, variant, setting
    (``setting_label``), norm. A run's file is its ``latent_norms`` column (models of an evaluation folder) or
    ``latent_norms.npy`` in its run dir."""
    parts = []
    for _, run in frame.iterrows():
        file = run.get("latent_norms")
        if not isinstance(file, str) and isinstance(run.get("run_dir"), str):
            file = Path(run["run_dir"]) / "latent_norms.npy"
        if isinstance(file, str | Path) and Path(file).exists():
            norms = read_array(Path(file)).ravel()
            labels = {"run": run.get("run"), "variant": run.get("variant"), "setting": setting_label(run)}
            parts.append(pd.DataFrame({**labels, "norm": norms}))
    columns = ["run", "variant", "setting", "norm"]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def latent_norm_distributions(frame: pd.DataFrame, path: str | Path) -> Path:
    """Density of ||mu(x)|| per variant (pooled over the runs' ``latent_norms.npy``), or per loss setting
    (``setting_label``) when a variant spans several (a lambda sweep), with the prior's norm distribution chi(L) for
    each latent size L = ``model.latent_dim`` as a dashed reference."""
    norms = load_latent_norms(frame)
    if norms.empty:
        raise FigureSkipped("no run folder has a latent_norms.npy (written when a run is evaluated)")
    with_norms = frame[frame["run"].isin(set(norms["run"]))]
    dims = sorted(int(d) for d in with_norms.get("model.latent_dim", pd.Series(dtype=float)).dropna().unique())
    if norms.groupby("variant", dropna=False)["setting"].nunique().max() > 1:
        settings = with_norms.assign(
            setting=with_norms.apply(setting_label, axis=1), rank=with_norms["variant"].map(variant_rank)
        )
        settings = settings.sort_values(["rank", *[k for k in (BETA, SEMANTIC_WEIGHT) if k in settings], "setting"])
        hue, order = "setting", list(dict.fromkeys(settings["setting"]))
    else:
        hue, order = "variant", _hue_order(norms["variant"])
    fig = Figure(figsize=(6.4, 4.2))
    latent_norm_density(fig.subplots(), norms, hue, order, dims)
    return _save(fig, path)


def interpolations(frame: pd.DataFrame, path: str | Path) -> Path:
    """The interpolation grids of one model per loss setting (its lowest seed) stacked, one panel each: every
    model of an evaluation folder is drawn on the same test pairs, so the panels compare row by row."""
    if "interpolations" not in frame:
        raise FigureSkipped("no model has an interpolation grid (written by task=evaluate)")
    runs = frame[frame["interpolations"].map(lambda p: isinstance(p, str) and Path(p).exists())]
    if runs.empty:
        raise FigureSkipped("no model has an interpolation grid (written by task=evaluate)")
    runs = runs.sort_values("seed") if "seed" in runs else runs
    runs = runs.assign(raw=raw_term(runs))
    keys = ["variant"] + [k for k in (BETA, SEMANTIC_WEIGHT) if k in runs] + ["raw"]  # one grid per loss setting
    chosen = runs.groupby(keys, sort=False, dropna=False).head(1)
    order = {v: i for i, v in enumerate(_hue_order(chosen["variant"]))}
    chosen = chosen.sort_values(keys, key=lambda c: c.map(order) if c.name == "variant" else c).set_index("variant")
    import matplotlib.image

    grids = [matplotlib.image.imread(p) for p in chosen["interpolations"]]
    height = sum(g.shape[0] / g.shape[1] for g in grids) * 6.4
    fig = Figure(figsize=(6.4, height + 0.35 * len(grids)))
    axes = fig.subplots(len(grids), 1, squeeze=False)[:, 0]
    for ax, (variant, run), grid in zip(axes, chosen.iterrows(), grids, strict=True):
        ax.imshow(grid, cmap="gray", interpolation="nearest")
        label = run.get("model") if isinstance(run.get("model"), str) else variant
        seed = f", seed {int(run['seed'])}" if "seed" in run and pd.notna(run["seed"]) else ""
        weights = (
            f" (beta {run[BETA]:g}, lambda {run[SEMANTIC_WEIGHT]:g}{', raw term' if run['raw'] else ''})"
            if BETA in run and SEMANTIC_WEIGHT in run
            else ""
        )
        ax.set_title(f"{variant}{weights}: {label}{seed}", fontsize=9)
        ax.set_axis_off()
    return _save(fig, path)
