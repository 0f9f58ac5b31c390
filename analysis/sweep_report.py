# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A loss-weight sweep: reconstruction against semantic consistency
#
# The runs of a sweep over `loss.beta` × `loss.semantic_weight` (folder in `$SEMVAE_RUNS`, default `outputs/`):
# each metric's mean over seeds on that grid, then every run on the plane (test MSE, held-out normalised GSV), where
# lower is better on both and the Pareto-optimal runs are the ones no other run beats on both at once.

# %%
import sys
from pathlib import Path

from IPython.display import Image, display

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "analysis" / "collect.py").is_file())
sys.path.insert(0, str(ROOT))

from analysis import figures  # noqa: E402
from analysis.notebooks import figures_dir, load_vae_runs  # noqa: E402

RUNS, vaes = load_vae_runs()  # $SEMVAE_RUNS, relative to the repository root; refuses a folder without runs
FIGURES = figures_dir()
X, Y = "test/mse", "test/gsv_norm_heldout"

# %%
print(f"{len(vaes)} finished VAE runs in {RUNS}")

# %% [markdown]
# ## Mean over seeds on the (beta, semantic weight) grid

# %%
try:
    display(Image(filename=str(figures.heatmaps(vaes, FIGURES / "heatmaps.png", metrics=(X, Y)))))
except figures.FigureSkipped as skipped:
    print(f"heatmaps: skipped: {skipped}")

# %% [markdown]
# ## Pareto front

# %%
try:
    display(Image(filename=str(figures.pareto_front(vaes, FIGURES / "pareto_front.png", x=X, y=Y))))
    optimal = vaes[figures.pareto_mask(vaes, X, Y)]
    display(optimal[["variant", "loss.beta", "loss.semantic_weight", "seed", X, Y]].sort_values(X))
except figures.FigureSkipped as skipped:
    print(f"Pareto front: skipped: {skipped}")
