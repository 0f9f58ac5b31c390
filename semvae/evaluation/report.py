"""What an evaluation writes besides its rows: the Markdown comparison table and the figures of one evaluation
folder (``analysis/`` draws the same kinds of figure over many runs with these functions)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pandas and matplotlib are imported where a table or figure is made; torch never (analysis/)
    import pandas as pd
    from matplotlib.figure import Figure

# columns of the comparison table: (metric, label); a metric with a standard error is shown as mean ± se (see
# ``markdown_table`` for which). Per judge: the raw and normalised GSV, the shuffled-direction reference beside the
# normalised GSV and the GSV relative to it, and Δ², how much the judge's reading changes (sum over features of the
# mean squared change, the normalised GSV's denominator): read every normalised GSV beside its reference and Δ².
JUDGE_LABELS = {"train": "train", "heldout": "held-out", "mlp": "mlp", "cnn": "cnn", "morpho": "morpho"}
GSV_COLUMNS = [
    ("gsv_raw_{}", "GSV raw ({})"),
    ("gsv_norm_{}", "GSV norm ({})"),
    ("gsv_shuffled_{}", "shuffled ref. ({})"),
    ("gsv_relative_{}", "GSV / ref. ({})"),
    ("gsv_change_{}", "Δ² ({})"),
]
TABLE_COLUMNS = [
    ("mse", "MSE"),
    ("neg_elbo", "-ELBO"),
    *[(key.format(judge), label.format(name)) for judge, name in JUDGE_LABELS.items() for key, label in GSV_COLUMNS],
    ("latent_norm_mean", "mean ‖μ‖"),
    ("latent_norm_std", "sd ‖μ‖"),
    ("prior_norm_mean", "prior E‖z‖"),
    ("active_units", "active units"),
    ("recon_accuracy", "acc. on recon. (train)"),
    ("recon_top_class_share", "top class share (train)"),
    *[
        column
        for judge in ("heldout", "mlp", "cnn")
        for column in (
            (f"recon_accuracy_{judge}", f"acc. on recon. ({JUDGE_LABELS[judge]})"),
            (f"recon_top_class_share_{judge}", f"top class share ({JUDGE_LABELS[judge]})"),
        )
    ],
    ("mig", "MIG"),
    ("dci_disentanglement", "DCI D"),
    ("dci_completeness", "DCI C"),
    ("dci_informativeness", "DCI I"),
]
# the error a table shows beside a GSV: the two-way bootstrap's where a row has it, else the points-only one
ERROR_NOTE = (
    "± : standard error; for a GSV, over the draw of the starting points and of the random directions together "
    "(two-way bootstrap, `_se_two_way`), or over the starting points alone (`_se`) in a row that lacks it; for MSE "
    "and -ELBO, over the test images."
)


def _format(value: Any, se: Any = None) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, float) or not math.isfinite(value):
        return "" if value is None else str(value)
    digits = 4 if abs(value) < 10 else 2
    text = f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    if isinstance(se, float) and math.isfinite(se):
        text += f" ± {se:.2g}"
    return text


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table from its header and rows of cell strings: the one renderer of every table the project
    writes (``analysis/tables.py`` renders its tables over seeds with it too)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table with one row per model; metrics with a standard error show as ``mean ± se`` (``error_of``),
    followed by the note that says which error that is."""
    columns = [(key, label) for key, label in TABLE_COLUMNS if any(key in row for row in rows)]
    cells = [[str(row["model"])] + [_format(row.get(key), error_of(row, key)) for key, _ in columns] for row in rows]
    return markdown(["model"] + [label for _, label in columns], cells) + "\n" + ERROR_NOTE + "\n"


def error_of(row: dict[str, Any], key: str) -> Any:
    """The standard error shown beside ``key``: the two-way bootstrap's (points and directions) when the row has
    it, else the points-only one (``ERROR_NOTE``)."""
    two_way = row.get(f"{key}_se_two_way")
    return two_way if isinstance(two_way, float) and math.isfinite(two_way) else row.get(f"{key}_se")


def differences_table(differences: list[dict[str, Any]]) -> str:
    """Paired differences of models (``suite.paired_differences``) as Markdown: one row per model and metric, the
    difference ± its two-way bootstrap standard error (starting points and random directions)."""
    header = ["model", "minus", "metric", "difference ± s.e. (two-way bootstrap)"]
    cells = [[d["model"], d["baseline"], d["metric"], _format(d["difference"], d["se"])] for d in differences]
    return markdown(header, cells)


def prior_norm(latent_dim: int):
    """The distribution of ||z|| for z ~ N(0, I_L) under the prior: chi with L degrees of freedom (scipy); its mean
    is the table's "prior E||z||" and its density is drawn in every latent-norm figure."""
    from scipy import stats

    return stats.chi(latent_dim)


def latent_norm_density(ax, norms: pd.DataFrame, hue: str, hue_order: list[str], latent_dims: list[int]) -> None:
    """On ``ax``: the density of ||mu(x)|| (column "norm") per ``hue``, with the prior's norm distribution chi(L)
    dashed for every latent size L, in one legend."""
    import seaborn as sns

    sns.kdeplot(data=norms, x="norm", hue=hue, hue_order=hue_order, common_norm=False, fill=True, alpha=0.2, ax=ax)
    top = max([float(norms["norm"].max())] + [2 * math.sqrt(d) for d in latent_dims])
    r = np.linspace(0, top * 1.05, 400)
    handles, labels = [], []
    legend = ax.get_legend()
    if legend is not None:  # seaborn's hue legend, merged with the prior lines
        handles, labels = list(legend.legend_handles), [t.get_text() for t in legend.get_texts()]
        legend.remove()
    for dim in sorted(set(latent_dims)):
        (line,) = ax.plot(r, prior_norm(dim).pdf(r), "k--", lw=1)
        handles.append(line)
        labels.append(f"prior: chi({dim})")
    ax.legend(handles, labels, fontsize=8)
    ax.set_xlabel("||mu(x)|| on the test split")
    ax.set_ylabel("density")


def save_figure(fig: Figure, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def latent_norm_figure(norms: dict[str, np.ndarray], latent_dims: dict[str, int], path: Path) -> Path:
    """Density of ||mu(x)|| per model of an evaluation, overlaid, with the prior for each latent size."""
    import pandas as pd
    from matplotlib.figure import Figure

    frame = pd.concat([pd.DataFrame({"model": name, "norm": np.asarray(v)}) for name, v in norms.items()])
    fig = Figure(figsize=(7, 4))
    latent_norm_density(fig.subplots(), frame, "model", list(norms), list(latent_dims.values()))
    return save_figure(fig, path)


def gsv_figure(rows: list[dict[str, Any]], path: Path) -> Path:
    """Normalised GSV per judge and model; the bars are 95% intervals of the evaluation (1.96 standard errors,
    two-way where the row has them: ``error_of``)."""
    from matplotlib.figure import Figure

    judges = [j for j in JUDGE_LABELS if any(f"gsv_norm_{j}" in r for r in rows)]
    fig = Figure(figsize=(2 + 2 * len(judges), 4))
    ax = fig.subplots()
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        x = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(judges))]
        y = [row.get(f"gsv_norm_{j}", float("nan")) for j in judges]
        err = [1.96 * (error_of(row, f"gsv_norm_{j}") or 0.0) for j in judges]
        ax.bar(x, y, width, yerr=err, capsize=3, label=row["model"])
    ax.set_xticks(range(len(judges)), [f"judge: {j}" for j in judges])
    ax.set_ylabel("GSV, normalised (lower: more consistent)")
    ax.set_title("error bars: 95% interval of the evaluation (1.96 SE, points and directions)", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def image_grid(
    images, n_columns: int, row_labels: list[str], column_labels: list[str], title: str, path: str | Path
) -> Path:
    """Images (R * C, 1, H, W) in [0, 1] as an R x C grid with its rows and columns labelled, saved as PNG."""
    from matplotlib.figure import Figure

    images = np.asarray(images, dtype=np.float32)
    rows = len(images) // n_columns
    side = images.shape[-1]
    canvas = np.ones((rows * (side + 2), n_columns * (side + 2)), dtype=np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, n_columns)
        canvas[r * (side + 2) + 1 : r * (side + 2) + 1 + side, c * (side + 2) + 1 : c * (side + 2) + 1 + side] = image[
            0
        ]
    fig = Figure(figsize=(1.2 + 0.5 * n_columns, 0.8 + 0.5 * rows))
    ax = fig.subplots()
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    centres = lambda n: [(side + 2) * k + 1 + side / 2 for k in range(n)]  # noqa: E731
    ax.set_xticks(centres(n_columns), column_labels, fontsize=7)
    ax.set_yticks(centres(rows), row_labels, fontsize=7)
    ax.tick_params(length=0)
    ax.set_title(title, fontsize=9)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return save_figure(fig, path)


def interpolation_grid(images, n_steps: int, title: str, path: str | Path) -> Path:
    """One row per test pair, decoding (1 - t) mu(x_a) + t mu(x_b) for t from 0 to 1."""
    t = np.linspace(0, 1, n_steps)
    rows = len(images) // n_steps
    return image_grid(images, n_steps, [f"pair {i + 1}" for i in range(rows)], [f"t={v:.2g}" for v in t], title, path)


def traversal_grid(images, values, title: str, path: str | Path) -> Path:
    """One row per latent dim j, decoding mu(x) with z_j set to each value."""
    values = np.asarray(values)
    rows = len(images) // len(values)
    return image_grid(images, len(values), [f"z{j}" for j in range(rows)], [f"{v:+.3g}" for v in values], title, path)
