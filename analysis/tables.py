"""Comparison tables: per group of runs (a variant, a loss setting), the mean of each metric over seeds with the
half-width of its t-interval, as a DataFrame, Markdown or CSV.

    table = comparison_table(frame, by="variant", metrics=["test/mse", "test/gsv_norm_heldout"])
    print(to_markdown(table))
    table.to_csv("comparison.csv")
    print(to_markdown_by_metric(difference_table(frame, baseline="vae")))   # each variant minus the VAE
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from semvae.evaluation.report import markdown

# Reported when present, in this order: test-split evaluation first, validation losses as a fallback.
DEFAULT_METRICS = (
    "test/mse",
    "test/neg_elbo",
    "test/gsv_norm_train",
    "test/gsv_norm_heldout",
    "test/gsv_norm_morpho",
    "test/gsv_change_train",
    "test/gsv_change_heldout",
    "test/gsv_change_morpho",
    "test/gsv_raw_train",
    "test/gsv_raw_heldout",
    "test/gsv_raw_morpho",
    "test/latent_norm_mean",
    "test/latent_norm_std",
    "test/active_units",
    "test/recon_accuracy",
    "test/recon_top_class_share",
    "test/mig",
    "test/dci_disentanglement",
    "val/mse",
    "val/neg_elbo",
)
VARIANT_ORDER = ("vae", "beta", "semantic", "beta-semantic", "classifier")
STATS = ("mean", "half_width", "n")


def raw_term(frame: pd.DataFrame) -> pd.Series:
    """Which runs trained with the raw (unnormalised) semantic term: ``loss.semantic.normalize`` false (a bool, or
    its text as a W&B config may hold it) and lambda > 0. Runs without the key trained with the normalised term,
    the default since the first version."""
    if "loss.semantic.normalize" not in frame or "loss.semantic_weight" not in frame:
        return pd.Series(False, index=frame.index)
    off = frame["loss.semantic.normalize"].map(is_false)
    return off & (pd.to_numeric(frame["loss.semantic_weight"], errors="coerce") > 0)


def is_false(value: object) -> bool:
    """A config flag that is off: False, or "false" as text; a missing value (NaN, None) is not."""
    return isinstance(value, bool | np.bool_ | str) and str(value).lower() == "false"


def available_metrics(frame: pd.DataFrame, metrics: Sequence[str] = DEFAULT_METRICS) -> list[str]:
    """The metrics of ``metrics`` that at least one run of ``frame`` has a number for."""
    return [m for m in metrics if m in frame and pd.to_numeric(frame[m], errors="coerce").notna().any()]


def t_half_width(values: pd.Series, confidence: float = 0.95) -> float:
    """Half-width of the t-interval for the mean: t_{(1+c)/2, n-1} * s / sqrt(n); NaN for fewer than 2 values."""
    values = values.dropna()
    n = len(values)
    if n < 2:
        return math.nan
    return float(stats.t.ppf((1 + confidence) / 2, n - 1) * values.std(ddof=1) / math.sqrt(n))


def variant_rank(name: object) -> int:
    """Position of a variant in the usual order (vae, beta, semantic, beta-semantic, classifier); others last."""
    return VARIANT_ORDER.index(name) if name in VARIANT_ORDER else len(VARIANT_ORDER)


def _group_order(index: pd.Index) -> list:
    """Groups sorted with the variants in their usual order (vae, beta, semantic, ...), then by the other keys."""

    def key(label) -> tuple:
        labels = label if isinstance(label, tuple) else (label,)
        return (variant_rank(labels[0]), *[(str(type(v)), v) for v in labels])

    return sorted(index, key=key)


def comparison_table(
    frame: pd.DataFrame,
    by: str | Sequence[str] = "variant",
    metrics: Sequence[str] | None = None,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """One row per group of ``by``; columns ``(metric, stat)`` with stat in ("mean", "half_width", "n").

    ``half_width`` is that of the ``confidence`` t-interval over the group's runs (seeds), NaN for n = 1; ``n``
    counts the runs with a value for that metric. ``metrics`` defaults to the ``DEFAULT_METRICS`` present; runs
    with none of the metrics (e.g. classifiers in a VAE comparison) are left out.
    """
    by = [by] if isinstance(by, str) else list(by)
    metrics = available_metrics(frame) if metrics is None else list(metrics)
    data = frame[by + metrics].copy()
    if metrics:
        data[metrics] = data[metrics].apply(pd.to_numeric, errors="coerce")
        data = data.dropna(subset=metrics, how="all")
    if not metrics or data.empty:
        return pd.DataFrame(columns=pd.MultiIndex.from_product([metrics, STATS]), index=pd.Index([], name=by[0]))
    groups = data.groupby(by if len(by) > 1 else by[0], dropna=False)
    aggregations = {"mean": "mean", "half_width": lambda v: t_half_width(v, confidence), "n": "count"}
    table = pd.concat({metric: groups[metric].agg(**aggregations) for metric in metrics}, axis=1)
    return table.loc[_group_order(table.index)]


def welch_interval(a: pd.Series, b: pd.Series, confidence: float = 0.95) -> tuple[float, float]:
    """Difference of the means of ``a`` and ``b`` and the half-width of its Welch t-interval (unequal variances,
    Welch-Satterthwaite degrees of freedom): the runs of two variants are different models, not pairs. The half-width
    is NaN when either side has fewer than 2 values, and 0 when both sides are constant. It equals scipy's
    ``ttest_ind(equal_var=False).confidence_interval``, which warns of precision loss whenever one side is constant
    (the active units of three seeds, say), hence the formula here."""
    a, b = a.dropna().astype(float), b.dropna().astype(float)
    if len(a) == 0 or len(b) == 0:
        return math.nan, math.nan
    difference = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return difference, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return difference, 0.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return difference, float(stats.t.ppf((1 + confidence) / 2, df) * math.sqrt(va + vb))


def difference_table(
    frame: pd.DataFrame,
    baseline: str,
    by: str = "variant",
    metrics: Sequence[str] | None = None,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Each group of ``by`` minus the ``baseline`` group: one row per other group, columns ``(metric, stat)`` laid
    out as in ``comparison_table`` (so the same Markdown writers apply), where "mean" is the difference of the two
    means, "half_width" that of its Welch t-interval (``welch_interval``) and "n" the group's runs. An interval
    that leaves out 0 is a difference the seeds support at that confidence. Raises ValueError when no run belongs
    to ``baseline``."""
    metrics = available_metrics(frame) if metrics is None else list(metrics)
    data = frame[[by, *metrics]].copy()
    data[metrics] = data[metrics].apply(pd.to_numeric, errors="coerce")
    data = data.dropna(subset=metrics, how="all")
    groups = dict(tuple(data.groupby(by, dropna=False)))
    if baseline not in groups:
        raise ValueError(f"no run of {by}={baseline!r} to take differences from; groups: {sorted(map(str, groups))}")
    rows = {}
    for label in _group_order(pd.Index(list(groups), name=by)):
        if label == baseline:
            continue
        row = {}
        for metric in metrics:
            mean, half = welch_interval(groups[label][metric], groups[baseline][metric], confidence)
            row |= {(metric, "mean"): mean, (metric, "half_width"): half, (metric, "n"): groups[label][metric].count()}
        rows[label] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.columns = pd.MultiIndex.from_tuples(table.columns) if len(table.columns) else table.columns
    table.index.name = by
    return table


def _number(value: float, digits: int = 4) -> str:
    """``digits`` significant digits, without scientific notation for ordinary magnitudes."""
    if not np.isfinite(value):
        return "nan"
    return f"{value:.{digits}g}"


def _group_label(label, row: pd.Series, metrics: list[str]) -> tuple[tuple, int]:
    """A group's key values and its n: the most runs any metric of the row has."""
    labels = label if isinstance(label, tuple) else (label,)
    return labels, int(max(row[(m, "n")] for m in metrics)) if metrics else 0


def _cell(row: pd.Series, metric: str, n: int, digits: int) -> str:
    """ "mean ± half-width" of one metric in one group; "(n=k)" when fewer runs than the group's n have it."""
    mean, half, count = row[(metric, "mean")], row[(metric, "half_width")], int(row[(metric, "n")])
    cell = _number(mean, digits) if count else ""
    if np.isfinite(half):
        cell += f" ± {_number(half, 2)}"
    if 0 < count < n:
        cell += f" (n={count})"
    return cell


def to_markdown(table: pd.DataFrame, digits: int = 4) -> str:
    """A Markdown table of a ``comparison_table``: the group keys, ``n`` (the most runs any metric has), and one
    "mean ± half-width" cell per metric (the mean alone when n = 1; "(n=k)" added where a metric has fewer runs)."""
    keys = list(table.index.names)
    metrics = list(dict.fromkeys(table.columns.get_level_values(0)))
    rows = []
    for label, row in table.iterrows():
        labels, n = _group_label(label, row, metrics)
        rows.append([str(v) for v in labels] + [str(n)] + [_cell(row, metric, n, digits) for metric in metrics])
    return markdown([str(k) for k in keys] + ["n"] + metrics, rows)


def to_markdown_by_metric(table: pd.DataFrame, digits: int = 4) -> str:
    """The same cells as ``to_markdown`` turned a quarter: one row per metric, one column per group (with its n),
    which reads better than a wide table when a few groups are compared on many metrics."""
    metrics = list(dict.fromkeys(table.columns.get_level_values(0)))
    groups = []
    for label, row in table.iterrows():
        labels, n = _group_label(label, row, metrics)
        groups.append((" ".join(str(v) for v in labels) + f" (n={n})", row, n))
    rows = [[metric] + [_cell(row, metric, n, digits) for _, row, n in groups] for metric in metrics]
    return markdown(["metric"] + [g[0] for g in groups], rows)


# the judges whose reading of the reconstructions the preset rule requires (never phi, the loss's own reader)
RECOGNITION_JUDGES = ("heldout", "mlp", "cnn")


def recognisability(
    runs: pd.DataFrame, base: pd.DataFrame, judges: Sequence[str], drop: float, confidence: float = 0.95
) -> bool | None:
    """Whether ``runs`` read as digits to every judge of ``judges`` about as well as the ``base`` runs (lambda = 0):
    the upper end of the Welch interval of (base accuracy on reconstructions - runs' accuracy) at most ``drop``
    for each judge. False as soon as one judge shows a larger drop; None when a judge's accuracy is missing on
    either side or one side has one seed (no interval); True otherwise."""
    verdicts = []
    for judge in judges:
        key = f"test/recon_accuracy_{judge}"
        if key not in runs or key not in base:
            verdicts.append(None)
            continue
        ours = pd.to_numeric(runs[key], errors="coerce").dropna()
        theirs = pd.to_numeric(base[key], errors="coerce").dropna()
        loss, half = welch_interval(theirs, ours, confidence)
        verdicts.append(bool(loss + half <= drop) if np.isfinite(half) else None)
    if False in verdicts:
        return False
    return None if None in verdicts else True


def both(a: bool | None, b: bool | None) -> bool | None:
    """Three-valued and: False if either is False, None if either is undecided, else True."""
    if a is False or b is False:
        return False
    return None if a is None or b is None else True


def choose_semantic_weight(
    frame: pd.DataFrame,
    beta: float = 1.0,
    gsv: str = "test/gsv_norm_heldout",
    mse: str = "test/mse",
    tolerance: float = 0.10,
    confidence: float = 0.95,
    recognisable_under: Sequence[str] = RECOGNITION_JUDGES,
    accuracy_drop: float = 0.01,
) -> tuple[float | None, pd.DataFrame]:
    """The rule that picks the semantic preset's lambda, fixed before any sweep is read. Among the settings with
    this ``beta`` and lambda > 0, a setting qualifies when its MSE is, with ``confidence``, at most ``tolerance``
    above the lambda = 0 model's: the upper end of the Welch interval of (its MSE - the lambda = 0 MSE) is at most
    ``tolerance`` x the lambda = 0 mean MSE. Of the qualifying settings, the lowest mean ``gsv`` wins, unless a
    setting with one seed (no interval yet, so neither in nor out) has a lower mean ``gsv``: it could still win, and
    the choice waits for its second seed.

    The preset is a weight of the normalised term, so runs with the raw term (``raw_term``) are left out.

    Recognisability, decided before any lambda = 30 result existed: a setting qualifies only if, besides the MSE,
    its reconstructions stay recognisable to every judge of ``recognisable_under`` (by default the held-out ResNet
    and the judges of other architecture families, never phi, which the loss trains against and which may be fooled
    either way): for each, the upper end of the Welch interval of (the lambda = 0 accuracy on reconstructions - its
    own) is at most ``accuracy_drop`` (one percentage point). A setting whose runs, or the lambda = 0 runs, lack a
    judge's ``test/recon_accuracy_<judge>`` (not evaluated with that judge yet) or have one seed is neither in nor
    out (None): the rule waits for that evaluation rather than pass it unread.

    Returns (lambda, or None when no setting qualifies or the choice waits; the table the rule read, one row per
    lambda > 0: means, the MSE difference with its half-width, the allowed excess, whether it qualifies: None where a
    side has one seed, so that no interval can be formed)."""
    runs = frame[(pd.to_numeric(frame["loss.beta"], errors="coerce") == beta) & ~raw_term(frame)]
    weights = pd.to_numeric(runs["loss.semantic_weight"], errors="coerce")
    base = pd.to_numeric(runs.loc[weights == 0, mse], errors="coerce").dropna()
    if base.empty:
        raise ValueError(f"no run with beta = {beta:g} and lambda = 0 to compare the MSE with")
    rows = {}
    for weight in sorted(weights[weights > 0].unique()):
        group = runs[weights == weight]
        values = pd.to_numeric(group[mse], errors="coerce").dropna()
        difference, half = welch_interval(values, base, confidence)
        allowed = tolerance * base.mean()
        rows[float(weight)] = {
            mse: values.mean(),
            gsv: pd.to_numeric(group[gsv], errors="coerce").mean(),
            f"{gsv} half_width": t_half_width(pd.to_numeric(group[gsv], errors="coerce"), confidence),
            "mse_excess": difference,
            "mse_excess half_width": half,
            "allowed_excess": allowed,
            "qualifies": bool(difference + half <= allowed) if np.isfinite(half) else None,  # None: one seed
        }
        recognisable = recognisability(group, runs[weights == 0], recognisable_under, accuracy_drop, confidence)
        rows[float(weight)]["recognisable"] = recognisable
        rows[float(weight)]["qualifies"] = both(rows[float(weight)]["qualifies"], recognisable)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "loss.semantic_weight"
    qualified = table[table["qualifies"] == True] if not table.empty else table  # noqa: E712 - None is not True
    if qualified.empty:
        return None, table
    best = qualified[gsv].idxmin()
    if (table["qualifies"].isna() & (table[gsv] < table.loc[best, gsv])).any():  # could still beat the best
        return None, table
    return float(best), table
