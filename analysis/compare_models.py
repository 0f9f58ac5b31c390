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
# # Comparing the VAE variants
#
# Every finished run below `$SEMVAE_RUNS` (default `outputs/`; `wandb:ENTITY/PROJECT` reads W&B instead), grouped by
# variant and loss weights: the mean of each test metric over seeds with the half-width of its 95% t-interval, then
# the distribution of the encoder means' norms ||mu(x)|| against the prior's chi distribution.
# Run with `python -m analysis.notebooks compare_models [--runs DIR]` (writes outputs/analysis/compare_models.ipynb),
# or open as a notebook in Jupyter / VS Code with jupytext.

# %%
import sys
from pathlib import Path

from IPython.display import Image, Markdown, display

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "analysis" / "collect.py").is_file())
sys.path.insert(0, str(ROOT))

from analysis import figures  # noqa: E402
from analysis.notebooks import figures_dir, load_vae_runs  # noqa: E402
from analysis.report import grouping_keys  # noqa: E402
from analysis.tables import comparison_table, to_markdown  # noqa: E402

RUNS, vaes = load_vae_runs()  # $SEMVAE_RUNS, relative to the repository root; refuses a folder without runs
FIGURES = figures_dir()

# %% [markdown]
# ## Runs

# %%
print(f"{len(vaes)} finished VAE runs in {RUNS}")
display(vaes.groupby(grouping_keys(vaes), dropna=False).size().rename("runs").to_frame())

# %% [markdown]
# ## Comparison over seeds

# %%
table = comparison_table(vaes, by=grouping_keys(vaes))
display(Markdown(to_markdown(table)))

# %% [markdown]
# ## Latent norms
#
# Under the prior N(0, I_L), ||z|| follows a chi distribution with L degrees of freedom (mean about sqrt(L)); an
# encoder whose means sit well inside it leaves parts of the prior that samples come from unused.

# %%
norm_columns = ["test/latent_norm_mean", "test/latent_norm_std", "test/prior_norm_mean"]
display(Markdown(to_markdown(comparison_table(vaes, by="variant", metrics=[c for c in norm_columns if c in vaes]))))
try:
    display(Image(filename=str(figures.latent_norm_distributions(vaes, FIGURES / "latent_norms.png"))))
except figures.FigureSkipped as skipped:
    print(f"latent norms: skipped: {skipped}")
