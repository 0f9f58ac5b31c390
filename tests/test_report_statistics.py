"""Honest n in reports and figures: no interval from one run, n in every title, the settings of a quick evaluation
named, and what to do when a sweep was not evaluated."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from analysis import figures
from analysis.report import _difference, write_report


def _run(root, name, seed, beta, weight, summary, evaluation=None):
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = {"seed": seed, "loss": {"beta": beta, "semantic_weight": weight}, "model": {"latent_dim": 16}}
    if evaluation is not None:
        config["evaluation"] = evaluation
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "summary.json").write_text(json.dumps({"status": "finished", **summary}))


@pytest.mark.parametrize(
    "counts, note",
    [
        ([3, 3], "n = 3 seeds per setting; ± 95% t-interval"),
        ([1, 3], "n = 1-3 seeds per setting; ± 95% t-interval only where n ≥ 2"),
        ([1, 1], "n = 1 per setting: single runs, no interval"),
    ],
)
def test_a_figure_says_its_n_and_never_an_interval_from_one_run(counts, note):
    assert figures.seeds_note(pd.Series(counts)) == note


def test_a_difference_with_one_seed_on_a_side_has_no_interval():
    assert _difference(0.0036, float("nan")) == "+0.0036 (one seed on a side: no interval)"
    assert _difference(-0.0043, 0.0028) == "-0.0043 ± 0.0028"


def test_a_single_seed_evaluated_sweep_is_reported_as_single_runs_with_its_evaluation_settings(tmp_path):
    runs = tmp_path / "sweep"
    quick = {"n_points": 16, "morpho_points": 4, "n_random_directions": 2, "limit_test": 256}
    for i, (beta, weight) in enumerate([(1.0, 0.0), (1.0, 1.0), (5.0, 0.0), (5.0, 1.0)]):
        metrics = {"test/mse": 0.2 + 0.001 * i, "test/gsv_norm_heldout": 0.01 - 0.001 * i, "val/mse": 0.2}
        _run(runs, str(i), 0, beta, weight, metrics, quick)
    report = write_report(runs).read_text()
    assert "Every group holds one run: its values are that run's, without an interval" in report
    assert "`evaluation.n_points=16`" in report and "not comparable with its numbers" in report
    assert "± nan" not in report and "+0.001 (one seed on a side: no interval)" in report


def test_a_sweep_without_evaluation_is_told_how_to_get_its_figures(tmp_path):
    runs = tmp_path / "sweep"
    for i, (beta, weight) in enumerate([(1.0, 0.0), (1.0, 1.0), (5.0, 0.0), (5.0, 1.0)]):
        _run(runs, str(i), 0, beta, weight, {"val/mse": 0.2, "val/neg_elbo": 500.0})
    report = write_report(runs).read_text()
    skipped = [line for line in report.splitlines() if line.startswith("Skipped: ")]
    assert len(skipped) == 6
    assert all("task.evaluate=true" in line and "evaluation=smoke" in line for line in skipped)


def test_lambda_trends_label_lambda_as_numbers_and_state_n(tmp_path, monkeypatch):
    frame = pd.DataFrame(
        {
            "variant": ["vae", "semantic", "semantic", "vae", "semantic"],
            "loss.beta": [1.0, 1.0, 1.0, 1.0, 1.0],
            "loss.semantic_weight": [0.0, 1.0, 10.0, 0.0, 10.0],
            "seed": [0, 0, 0, 1, 1],
            "test/mse": [0.2, 0.21, 0.22, 0.2, 0.23],
        }
    )
    drawn = {}
    real_save = figures._save

    def keep(fig, path):
        drawn["fig"] = fig
        return real_save(fig, path)

    monkeypatch.setattr(figures, "_save", keep)
    figures.lambda_trends(frame, tmp_path / "t.png", metrics=("test/mse",))
    fig = drawn["fig"]
    assert fig._suptitle.get_text() == "mean over seeds (n = 1-2 seeds per setting; ± 95% t-interval only where n ≥ 2)"
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "10"]
    assert np.allclose(ax.get_xticks(), [0, 1, 10])
