"""What the lambda study's analysis draws from a sweep folder (fixture runs with known numbers): settings with
their seed intervals, trends over lambda, the Pareto front of settings, and the rule that picks the semantic
preset's lambda."""

import math

import pandas as pd
import pytest

from analysis import figures
from analysis.collect import collect_runs
from analysis.report import write_report
from analysis.tables import choose_semantic_weight
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "runs"
T_95_2DF = 4.302652729911275  # t_{0.975, 2}: three seeds a setting


@pytest.fixture(scope="module")
def runs():
    return collect_runs(FIXTURES)


def test_each_setting_has_its_mean_and_seed_interval(runs):
    table = figures.setting_table(runs, ["test/mse", "test/gsv_norm_heldout"])
    assert list(zip(table["loss.beta"], table["loss.semantic_weight"], strict=True)) == [
        (1.0, 0.0),
        (1.0, 10.0),
        (5.0, 0.0),
        (5.0, 10.0),
    ]
    assert list(table["test/mse"]) == pytest.approx([0.011, 0.016, 0.051, 0.056])
    assert list(table["test/mse n"]) == [3, 3, 3, 3]
    # the fixtures' three seeds are mean - 0.001, mean, mean + 0.001: sd 0.001
    assert table["test/mse half_width"].iloc[0] == pytest.approx(T_95_2DF * 0.001 / math.sqrt(3))


def test_trends_need_two_lambdas_and_the_front_joins_the_settings_no_other_beats(runs, tmp_path):
    assert figures.lambda_trends(runs, tmp_path / "trends.png").stat().st_size > 20_000
    single = runs[runs["loss.semantic_weight"] == 0]
    with pytest.raises(figures.FigureSkipped, match="a single semantic weight"):
        figures.lambda_trends(single, tmp_path / "none.png")
    table = figures.setting_table(runs, ["test/mse", "test/gsv_norm_heldout"])
    front = table[figures.pareto_mask(table, "test/mse", "test/gsv_norm_heldout")]
    # (beta 5, lambda 0) has a higher MSE and GSV than (beta 1, lambda 10): the only dominated setting
    assert list(zip(front["loss.beta"], front["loss.semantic_weight"], strict=True)) == [(1, 0), (1, 10), (5, 10)]
    assert figures.pareto_settings(runs, tmp_path / "front.png").stat().st_size > 20_000


def test_the_preset_rule_takes_the_most_consistent_lambda_whose_mse_stays_within_ten_percent(runs):
    chosen, table = choose_semantic_weight(runs)
    assert chosen is None and not table.loc[10.0, "qualifies"]  # MSE 0.016 against 0.011: 45% worse
    assert table.loc[10.0, "mse_excess"] == pytest.approx(0.005)
    assert table.loc[10.0, "allowed_excess"] == pytest.approx(0.0011)
    # three seeds per lambda, MSE spread 1% of its mean: lambda = 10 costs 1% MSE, lambda = 100 costs 20%
    mse = {0.0: 0.0100, 10.0: 0.0101, 100.0: 0.0120}
    gsv = {0.0: 0.50, 10.0: 0.40, 100.0: 0.20}
    sweep = pd.DataFrame(
        [
            {"loss.beta": 1.0, "loss.semantic_weight": w, "test/mse": mse[w] + d, "test/gsv_norm_heldout": gsv[w]}
            for w in mse
            for d in (-0.0001, 0.0, 0.0001)
        ]
    )
    # the MSE part of the rule alone (recognisability below)
    chosen, table = choose_semantic_weight(sweep, recognisable_under=())
    assert chosen == 10.0 and list(table["qualifies"]) == [True, False]
    assert (
        choose_semantic_weight(sweep, tolerance=0.25, recognisable_under=())[0] == 100.0
    )  # a looser rule takes the more consistent one
    # a lambda with one seed is neither in nor out: it holds the choice back only where it could still win
    one_seed = lambda w, g: pd.DataFrame(  # noqa: E731
        [{"loss.beta": 1.0, "loss.semantic_weight": w, "test/mse": 0.0101, "test/gsv_norm_heldout": g}]
    )
    chosen, table = choose_semantic_weight(pd.concat([sweep, one_seed(1000.0, 0.10)]), recognisable_under=())
    assert chosen is None and table.loc[1000.0, "qualifies"] is None  # its GSV 0.10 is below lambda = 10's 0.40
    assert choose_semantic_weight(pd.concat([sweep, one_seed(1.0, 0.45)]), recognisable_under=())[0] == 10.0
    # recognisability: without the other judges' accuracies the rule waits; with them, a drop > 1 point excludes
    assert choose_semantic_weight(sweep)[0] is None and choose_semantic_weight(sweep)[1]["recognisable"].isna().all()
    accuracy = {0.0: 0.98, 10.0: 0.979, 100.0: 0.95}
    for judge in ("heldout", "mlp", "cnn"):
        sweep[f"test/recon_accuracy_{judge}"] = [accuracy[w] + d for w in mse for d in (-0.001, 0.0, 0.001)]
    chosen, table = choose_semantic_weight(sweep, tolerance=0.25)  # lambda = 100 passes the MSE test, not this one
    assert chosen == 10.0 and list(table["recognisable"]) == [True, False]


def test_the_report_states_the_rule_and_its_choice(tmp_path):
    report = write_report(FIXTURES, tmp_path).read_text()
    assert "## The semantic preset's lambda (beta = 1)" in report
    assert "| 10 | 0.016 | +0.005 ± " in report and "Chosen: none qualifies" in report
    for name in ("lambda_trends", "pareto_settings"):
        assert f"![{name}]({name}.png)" in report


def test_one_seed_a_lambda_leaves_the_preset_undecided(runs, tmp_path):
    one_seed = runs[runs["seed"] == 0]
    chosen, table = choose_semantic_weight(one_seed)
    assert chosen is None and table["qualifies"].isna().all()  # no interval from one seed
    one_seed_dir = tmp_path / "runs"
    for run in ("0", "3"):  # seed 0 of lambda = 0 and lambda = 10
        __import__("shutil").copytree(FIXTURES / run, one_seed_dir / run)
    report = write_report(one_seed_dir, tmp_path / "report").read_text()
    assert "needs 2+ seeds" in report and "Chosen: undecided: no MSE interval yet for lambda = 10" in report


@pytest.fixture(scope="module")
def with_raw_arm(tmp_path_factory):
    """The fixture runs plus a raw-term arm: the three lambda = 10 seeds retrained (in the numbers) with
    loss.semantic.normalize=false at lambda = 400, a lower held-out GSV (0.30) at a higher MSE (0.020)."""
    import json
    import shutil

    root = tmp_path_factory.mktemp("raw_arm")
    shutil.copytree(FIXTURES, root / "runs")
    for seed, run in enumerate(("3", "4", "5")):
        shutil.copytree(FIXTURES / run, root / "runs" / f"raw{seed}")
        config = json.loads((FIXTURES / run / "config.json").read_text())
        config["loss"]["semantic"]["normalize"], config["loss"]["semantic_weight"] = False, 400.0
        summary = json.loads((FIXTURES / run / "summary.json").read_text())
        summary |= {"test/mse": 0.019 + 0.001 * seed, "test/gsv_norm_heldout": 0.29 + 0.01 * seed}
        (root / "runs" / f"raw{seed}" / "config.json").write_text(json.dumps(config))
        (root / "runs" / f"raw{seed}" / "summary.json").write_text(json.dumps(summary))
    return root / "runs"


def test_the_raw_arm_is_drawn_beside_the_grid_never_averaged_into_it(runs, with_raw_arm, tmp_path):
    both = collect_runs(with_raw_arm)
    assert figures.raw_term(both).sum() == 3 and not figures.raw_term(runs).any()
    grid = figures.grid_runs(both)
    assert len(grid) == len(runs) and list(figures.metric_grid(grid, "test/mse").columns) == [0.0, 10.0]
    pd.testing.assert_frame_equal(
        figures.setting_table(grid, ["test/mse"]), figures.setting_table(runs, ["test/mse"])
    )  # the lambda = 10 cell keeps its three normalised seeds
    # the preset rule reads the normalised term only: the raw arm's lower GSV cannot become the preset's lambda
    assert choose_semantic_weight(both)[1].index.tolist() == [10.0]
    assert figures.setting_label(both[figures.raw_term(both)].iloc[0]) == "semanticVAE-l400-raw"
    norms = figures.load_latent_norms(both)
    assert set(norms.loc[norms["variant"] == "semantic", "setting"]) == {"semanticVAE", "semanticVAE-l400-raw"}
    assert figures.heatmaps(both, tmp_path / "heatmaps.png").stat().st_size > 20_000
    assert figures.pareto_settings(both, tmp_path / "front.png").stat().st_size > 20_000

    report = write_report(with_raw_arm, tmp_path / "report").read_text()
    comparison = pd.read_csv(tmp_path / "report" / "comparison.csv", header=[0, 1], index_col=[0, 1, 2, 3])
    rows = comparison.index.to_frame(index=False)
    raw_row = comparison.loc[("semantic", 1.0, 400.0, False)]
    assert raw_row[("test/mse", "mean")] == pytest.approx(0.020) and raw_row[("test/mse", "n")] == 3
    assert rows.columns.tolist() == ["variant", "loss.beta", "loss.semantic_weight", "loss.semantic.normalize"]
    assert (
        "One group per variant and value of loss.beta, loss.semantic_weight, loss.semantic.normalize, the settings "
        "that differ between the runs." in report
    )
    assert "3 run(s) trained with the raw semantic term (semanticVAE-l400-raw)" in report
    assert "| 400 |" not in report.split("## The semantic preset's lambda")[1].split("## Figures")[0]
