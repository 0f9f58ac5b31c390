"""The analysis package on hand-made runs and on the fixture sweep ``tests/fixtures/runs``.

The fixture sweep is loss.beta in {1, 5} x loss.semantic_weight in {0, 10} x seed in {0, 1, 2} (jobs 0-11, seed
fastest) plus job 12, which failed (error.txt, no summary). Its metrics are set by construction:
    test/mse              = 0.01 * beta + 0.0005 * semantic_weight + 0.001 * seed
    test/gsv_norm_heldout = 0.6 - 0.04 * beta - 0.02 * semantic_weight + 0.01 * seed
    test/neg_elbo         = 100 + 2 * beta + 0.5 * semantic_weight + seed
so over seeds {0, 1, 2} each mean has seed term 1 * coefficient and sample standard deviation 1 * coefficient.
Jobs 0 (vae), 3 (semantic) and 6 (beta) hold a latent_norms.npy of 200 values.
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import figures
from analysis.collect import collect_runs, collect_wandb, failed_runs, flatten, load_runs, variant_of
from analysis.report import write_report
from analysis.tables import comparison_table, difference_table, to_markdown, to_markdown_by_metric

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "runs"
T_95_2DF = stats.t.ppf(0.975, 2)  # 4.3027: the 95% t quantile for 3 seeds


def _run(root, name, config, summary):
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture(scope="module")
def sweep() -> pd.DataFrame:
    return collect_runs(FIXTURES)


# --- collect --------------------------------------------------------------------------------------------------------


def test_flatten_nested_config():
    assert flatten({"loss": {"beta": 5, "semantic": {"step": 1.0}}, "model": {"widths": [1, 2]}}) == {
        "loss.beta": 5,
        "loss.semantic.step": 1.0,
        "model.widths": (1, 2),
    }


def test_collect_runs_gives_one_row_per_finished_run(tmp_path):
    _run(tmp_path, "0", {"seed": 0, "loss": {"beta": 1.0}}, {"val/mse": 0.02, "variant": "vae"})
    _run(tmp_path, "1", {"seed": 1, "loss": {"beta": 5.0}}, {"val/mse": 0.04, "variant": "beta"})
    _run(tmp_path, "2", {"seed": 2, "loss": {"beta": 5.0}}, None)  # unfinished: no summary
    frame = collect_runs(tmp_path)
    assert list(frame["seed"]) == [0, 1]
    assert frame.groupby("loss.beta")["val/mse"].mean().to_dict() == {1.0: 0.02, 5.0: 0.04}
    assert set(frame["variant"]) == {"vae", "beta"}


def test_collect_runs_leaves_out_stopped_runs_unless_asked(tmp_path):
    config = {"seed": 0, "loss": {"beta": 1.0, "semantic_weight": 0.0}}
    _run(tmp_path, "done", config, {"status": "finished", "val/mse": 0.02})
    _run(tmp_path, "stopped", config, {"status": "stopped", "stopped_at_step": 40, "val/mse": 0.09})
    assert list(collect_runs(tmp_path)["status"]) == ["finished"]
    frame = collect_runs(tmp_path, include_unfinished=True)
    assert sorted(frame["status"]) == ["finished", "stopped"]
    assert set(frame["source"]) == {"local"}
    assert set(frame["variant"]) == {"vae"}  # derived from the loss weights when the summary has none


def test_variant_of_loss_weights():
    assert [variant_of(1, 0), variant_of(5, 0), variant_of(1, 10), variant_of(5, 10)] == [
        "vae",
        "beta",
        "semantic",
        "beta-semantic",
    ]


def test_fixture_sweep_collects_twelve_runs_and_one_failure(sweep):
    assert len(sweep) == 12
    assert sweep["variant"].value_counts().to_dict() == {"vae": 3, "semantic": 3, "beta": 3, "beta-semantic": 3}
    assert set(sweep["source"]) == {"local"} and set(sweep["status"]) == {"finished"}
    assert sweep["model.widths"].iloc[0] == (16, 32, 64)
    failed = failed_runs(FIXTURES)
    assert [Path(d).name for d in failed["run_dir"]] == ["12"]
    assert failed["error"].iloc[0].startswith("RuntimeError: non-finite loss")


class _FakeSummary:
    """Like wandb's HTTPSummary: the values live in ``_json_dict``."""

    def __init__(self, values):
        self._json_dict = values


class _FakeRun:
    def __init__(self, run_id, config, summary, state="finished"):
        self.id, self.state, self.path = run_id, state, ["team", "semvae", run_id]
        self.config, self.summary = config, _FakeSummary(summary)


def _fake_wandb(monkeypatch, runs):
    """Stand in for the ``wandb`` module: ``wandb.Api().runs(path, filters=...)`` returns ``runs``; calls recorded."""
    calls = []

    class Api:
        def runs(self, path, filters=None):
            calls.append((path, filters))
            return runs

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=Api))
    return calls


def test_collect_wandb_flattens_config_and_summary_like_local_runs(monkeypatch, tmp_path):
    config = {
        "seed": 1,
        "variant": "semantic",
        "loss": {"beta": 1.0, "semantic_weight": 10.0},
        "model": {"widths": [8]},
    }
    summary = {"status": "finished", "val/mse": 0.03, "test/gsv_norm_heldout": 0.4}
    runs = [
        _FakeRun("a1", config | {"_wandb": {"cli_version": "0.31"}}, summary | {"_step": 9, "_runtime": 3.0}),
        _FakeRun("b2", config | {"seed": 2}, summary | {"images": {"_type": "images/separated", "count": 8}}),
        _FakeRun("c3", config, {"val/mse": 0.5}, state="crashed"),  # no status in its summary: W&B's state counts
    ]
    calls = _fake_wandb(monkeypatch, runs)
    frame = collect_wandb("semvae", entity="team", filters={"config.loss.beta": 1.0})
    assert calls == [("team/semvae", {"config.loss.beta": 1.0})]
    assert list(frame["run"]) == ["team/semvae/a1", "team/semvae/b2"]
    assert set(frame["source"]) == {"wandb"} and frame["run_dir"].isna().all()
    assert list(frame["loss.semantic_weight"]) == [10.0, 10.0] and frame["model.widths"].iloc[0] == (8,)
    assert not [c for c in frame.columns if c.startswith("_") or c.startswith("images")]
    assert list(collect_wandb("semvae", include_unfinished=True)["status"]) == ["finished", "finished", "crashed"]

    _run(tmp_path, "local", config, summary)
    assert set(frame.columns) == set(collect_runs(tmp_path).columns)


def test_load_runs_picks_the_source(monkeypatch):
    calls = _fake_wandb(monkeypatch, [])
    assert load_runs("wandb:team/semvae").empty
    load_runs("wandb:semvae")
    assert calls == [("team/semvae", None), ("semvae", None)]
    assert len(load_runs(FIXTURES)) == 12


# --- tables ---------------------------------------------------------------------------------------------------------


def test_comparison_table_means_and_half_widths_match_the_construction(sweep):
    table = comparison_table(sweep, by="variant", metrics=["test/mse", "test/gsv_norm_heldout", "test/neg_elbo"])
    assert list(table.index) == ["vae", "beta", "semantic", "beta-semantic"]
    weights = {"vae": (1, 0), "beta": (5, 0), "semantic": (1, 10), "beta-semantic": (5, 10)}
    for variant, (beta, weight) in weights.items():
        row = table.loc[variant]
        # seeds 0, 1, 2: mean of the seed term = coefficient, sample sd = coefficient
        assert row[("test/mse", "mean")] == pytest.approx(0.01 * beta + 0.0005 * weight + 0.001)
        assert row[("test/mse", "half_width")] == pytest.approx(T_95_2DF * 0.001 / math.sqrt(3))
        assert row[("test/gsv_norm_heldout", "mean")] == pytest.approx(0.6 - 0.04 * beta - 0.02 * weight + 0.01)
        assert row[("test/gsv_norm_heldout", "half_width")] == pytest.approx(T_95_2DF * 0.01 / math.sqrt(3))
        assert row[("test/neg_elbo", "mean")] == pytest.approx(100 + 2 * beta + 0.5 * weight + 1)
        assert row[("test/neg_elbo", "half_width")] == pytest.approx(T_95_2DF * 1.0 / math.sqrt(3))
        assert row[("test/mse", "n")] == 3
    assert T_95_2DF * 0.001 / math.sqrt(3) == pytest.approx(0.0024841, abs=1e-7)


def test_comparison_table_other_confidence_and_groups(sweep):
    table = comparison_table(sweep, by=["loss.beta", "loss.semantic_weight"], metrics=["test/mse"], confidence=0.9)
    assert table.loc[(5.0, 10.0), ("test/mse", "mean")] == pytest.approx(0.056)
    assert table.loc[(5.0, 10.0), ("test/mse", "half_width")] == pytest.approx(
        stats.t.ppf(0.95, 2) * 0.001 / math.sqrt(3)
    )


def test_comparison_table_single_seed_has_nan_half_width_and_counts_per_metric():
    frame = pd.DataFrame(
        {
            "variant": ["vae", "vae", "semantic", "classifier"],
            "test/mse": [0.01, 0.03, 0.02, None],
            "test/gsv": [0.5, None, 0.3, None],
        }
    )
    table = comparison_table(frame, metrics=["test/mse", "test/gsv"])
    assert list(table.index) == ["vae", "semantic"]  # the classifier has none of the metrics
    assert math.isnan(table.loc["semantic", ("test/mse", "half_width")])
    assert table.loc["vae", ("test/mse", "n")] == 2 and table.loc["vae", ("test/gsv", "n")] == 1
    assert table.loc["vae", ("test/mse", "half_width")] == pytest.approx(
        stats.t.ppf(0.975, 1) * np.std([0.01, 0.03], ddof=1) / math.sqrt(2)
    )


def test_to_markdown_writes_mean_plus_minus_half_width_and_n(tmp_path):
    frame = pd.DataFrame(
        {
            "variant": ["vae", "vae", "semantic", "classifier"],
            "test/mse": [0.01, 0.03, 0.02, None],
            "test/gsv": [0.5, None, 0.3, None],
        }
    )
    table = comparison_table(frame, metrics=["test/mse", "test/gsv"])
    half = stats.t.ppf(0.975, 1) * np.std([0.01, 0.03], ddof=1) / math.sqrt(2)  # 0.127
    assert to_markdown(table).splitlines() == [
        "| variant | n | test/mse | test/gsv |",
        "| --- | --- | --- | --- |",
        f"| vae | 2 | 0.02 ± {half:.2g} | 0.5 (n=1) |",
        "| semantic | 1 | 0.02 | 0.3 |",
    ]
    assert to_markdown_by_metric(table).splitlines() == [
        "| metric | vae (n=2) | semantic (n=1) |",
        "| --- | --- | --- |",
        f"| test/mse | 0.02 ± {half:.2g} | 0.02 |",
        "| test/gsv | 0.5 (n=1) | 0.3 |",
    ]
    table.to_csv(tmp_path / "table.csv")
    back = pd.read_csv(tmp_path / "table.csv", header=[0, 1], index_col=0)
    assert back.loc["vae", ("test/mse", "mean")] == pytest.approx(0.02)


# --- figures --------------------------------------------------------------------------------------------------------


def test_difference_table_is_welchs_t_interval():
    rng = np.random.default_rng(0)
    values = {"vae": rng.normal(0.94, 0.003, 3), "beta": rng.normal(0.92, 0.01, 4)}
    values["semantic"] = rng.normal(0.9, 0.01, 3)
    frame = pd.DataFrame(
        [{"variant": v, "test/gsv": x, "test/units": 16.0} for v, xs in values.items() for x in xs]
        + [{"variant": "classifier", "test/gsv": None, "test/units": None}]
    )
    table = difference_table(frame, baseline="vae", metrics=["test/gsv", "test/units"])
    assert list(table.index) == ["beta", "semantic"]  # the usual order, the runs with no metric left out
    for variant in ("beta", "semantic"):
        test = stats.ttest_ind(values[variant], values["vae"], equal_var=False)
        low, high = test.confidence_interval(0.95)
        assert table.loc[variant, ("test/gsv", "mean")] == pytest.approx((low + high) / 2, rel=1e-9)
        assert table.loc[variant, ("test/gsv", "half_width")] == pytest.approx((high - low) / 2, rel=1e-9)
        assert table.loc[variant, ("test/gsv", "n")] == len(values[variant])
        assert table.loc[variant, ("test/units", "mean")] == 0 and table.loc[variant, ("test/units", "half_width")] == 0
    wider = difference_table(frame, baseline="vae", metrics=["test/gsv"], confidence=0.99)
    assert (wider[("test/gsv", "half_width")] > table[("test/gsv", "half_width")]).all()
    one_seed = difference_table(frame.drop(index=[1, 2]), baseline="vae", metrics=["test/gsv"])
    assert math.isnan(one_seed.loc["semantic", ("test/gsv", "half_width")])
    with pytest.raises(ValueError, match="no run of variant='judge'.*groups: \\['beta', 'semantic', 'vae'\\]"):
        difference_table(frame, baseline="judge", metrics=["test/gsv"])


def test_report_of_an_evaluation_adds_differences_from_each_baseline(tmp_path):
    evaluation = tmp_path / "evaluation"
    (evaluation / "models").mkdir(parents=True)
    (evaluation / "summary.json").write_text("{}")
    gsv = {"vae": [0.94, 0.95, 0.93], "beta": [0.92, 0.91, 0.93], "semantic": [0.90, 0.91, 0.89]}
    betas = {"vae": 1.0, "beta": 5.0, "semantic": 1.0}
    for variant, values in gsv.items():
        for seed, value in enumerate(values):
            config = {"seed": seed, "loss": {"beta": betas[variant], "semantic_weight": 10.0 * (variant == "semantic")}}
            record = {"model": f"{variant}{seed}", "variant": variant, "config": config, "gsv_norm_heldout": value}
            (evaluation / "models" / f"{variant}{seed}.json").write_text(json.dumps(record))
    report = write_report(evaluation, tmp_path / "report", by_metric=True, baselines=["vae", "beta"]).read_text()
    assert "## Differences from vae (difference of means ± 95% Welch t-interval half-width)" in report
    assert "## Differences from beta" in report
    half = stats.t.ppf(0.975, 4) * math.sqrt(2 * 0.01**2 / 3)  # equal spreads: Welch's df is 4
    assert f"| test/gsv_norm_heldout | -0.02 ± {half:.2g} | -0.04 ± {half:.2g} |" in report
    vs_beta = pd.read_csv(tmp_path / "report" / "differences_from_beta.csv", header=[0, 1], index_col=0)
    assert list(vs_beta.index) == ["vae", "semantic"]
    assert vs_beta.loc["semantic", ("test/gsv_norm_heldout", "mean")] == pytest.approx(-0.02)
    before = (tmp_path / "report" / "report.md").read_text()
    with pytest.raises(ValueError, match="--baseline betta: no finished run of that variant; variants: vae, beta, sem"):
        write_report(evaluation, tmp_path / "report", baselines=["vae", "betta"])
    assert (tmp_path / "report" / "report.md").read_text() == before  # nothing rewritten


def test_a_sweep_over_a_loss_weight_has_no_single_baseline(tmp_path):
    runs = tmp_path / "sweep"
    for seed in (0, 1):
        for weight in (0.0, 1.0, 10.0):
            variant = "semantic" if weight else "vae"
            config = {"seed": seed, "variant": variant, "loss": {"beta": 1.0, "semantic_weight": weight}}
            _run(runs, f"{variant}_{weight}_{seed}", config, {"status": "finished", "test/mse": 0.01 + seed / 1000})
    report = write_report(runs, tmp_path / "report").read_text()
    assert "| semantic | 10.0 | 2 |" in report and "| semantic | 1.0 | 2 |" in report
    assert "## Differences" not in report and not list((tmp_path / "report").glob("differences_*.csv"))
    fixture = write_report(FIXTURES, tmp_path / "fixture").read_text()  # one loss setting per variant: it has them
    section = fixture.split("## Differences from vae")[1].split("##")[0]
    assert "| variant | n | test/mse |" in section and "| beta-semantic | 3 |" in section and "| vae |" not in section


def test_pareto_mask_on_hand_made_points():
    points = pd.DataFrame(
        {
            "x": [1.0, 2.0, 3.0, 4.0, 5.0, 2.0, np.nan, 0.5],
            "y": [5.0, 3.0, 3.0, 1.0, 5.0, 3.0, 0.0, 9.0],
        },
        index=list("ABCDEFGH"),
    )
    # C: same y as B, larger x; E: beaten by A; F: equal to B (both kept); G: no x; H: the lowest x
    mask = figures.pareto_mask(points, "x", "y")
    assert mask.to_dict() == dict(zip("ABCDEFGH", [True, True, False, True, False, True, False, True], strict=True))


def test_figures_are_written_from_the_sweep(sweep, tmp_path):
    written = [
        figures.heatmaps(sweep, tmp_path / "heatmaps.png"),
        figures.pareto_front(sweep, tmp_path / "pareto.png"),
        figures.latent_norm_distributions(sweep, tmp_path / "norms.png"),
    ]
    assert [p.name for p in written] == ["heatmaps.png", "pareto.png", "norms.png"]
    assert all(p.stat().st_size > 5_000 for p in written)
    norms = figures.load_latent_norms(sweep)
    assert norms.groupby("variant").size().to_dict() == {"vae": 200, "semantic": 200, "beta": 200}
    assert figures.metric_grid(sweep, "test/mse").loc[5.0, 10.0] == pytest.approx(0.056)


def test_figures_say_why_they_cannot_be_drawn(sweep, tmp_path):
    single_beta = sweep[sweep["loss.beta"] == 1.0]
    with pytest.raises(figures.FigureSkipped, match="single value of loss.beta"):
        figures.heatmaps(single_beta, tmp_path / "h.png")
    with pytest.raises(figures.FigureSkipped, match="at least 2"):
        figures.pareto_front(sweep.iloc[:1], tmp_path / "p.png")
    with pytest.raises(figures.FigureSkipped, match="latent_norms.npy"):
        figures.latent_norm_distributions(sweep.assign(run_dir=str(tmp_path)), tmp_path / "n.png")
    assert not list(tmp_path.iterdir())


# --- report and notebooks -------------------------------------------------------------------------------------------


def test_report_command_writes_markdown_table_and_figures(tmp_path, monkeypatch, capsys):
    from analysis.report import main

    monkeypatch.chdir(ROOT)
    main(["tests/fixtures/runs", "--out", str(tmp_path)])  # python -m analysis.report tests/fixtures/runs --out ...
    report = (tmp_path / "report.md").read_text()
    assert capsys.readouterr().out.strip() == str(tmp_path / "report.md")  # it names what it wrote
    assert "`tests/fixtures/runs`" in report
    assert "- finished runs: 12" in report and "- failed jobs (error.txt): 1" in report
    assert "- seeds: 3 (0, 1, 2)" in report
    assert "| variant | loss.beta | loss.semantic_weight | n | test/mse |" in report
    assert f"| vae | 1.0 | 0.0 | 3 | 0.011 ± {T_95_2DF * 0.001 / math.sqrt(3):.2g} |" in report
    for name in ("heatmaps", "pareto_front", "latent_norms"):
        assert f"![{name}]({name}.png)" in report
        assert (tmp_path / f"{name}.png").stat().st_size > 5_000
    table = pd.read_csv(tmp_path / "comparison.csv", header=[0, 1], index_col=[0, 1, 2])
    assert table.loc[("vae", 1.0, 0.0), ("test/mse", "mean")] == pytest.approx(0.011)
    assert "non-finite loss" in report


def test_report_on_a_mix_skips_what_it_cannot_draw(tmp_path):
    runs = tmp_path / "outputs"
    vae = {"seed": 0, "variant": "vae", "loss": {"beta": 1.0, "semantic_weight": 0.0}, "model": {"latent_dim": 16}}
    _run(runs, "a_VAE", vae, {"status": "finished", "val/mse": 0.02})
    _run(runs, "b_VAE", vae | {"seed": 1}, {"status": "finished", "val/mse": 0.04})
    _run(runs, "c_VAE", vae | {"seed": 2}, {"status": "stopped", "val/mse": 0.5})
    _run(runs, "d_classifier", {"seed": 0, "variant": "classifier"}, {"status": "finished", "val/accuracy": 0.99})
    report = write_report(runs, tmp_path / "report").read_text()
    assert "- finished runs: 3 (vae: 2, classifier: 1)" in report
    assert "- unfinished runs (left out): 1 (stopped)" in report
    assert f"| vae | 2 | 0.03 ± {stats.t.ppf(0.975, 1) * np.std([0.02, 0.04], ddof=1) / math.sqrt(2):.2g} |" in report
    assert report.count("Skipped: ") == 6  # heatmaps, lambda trends, both Pareto fronts, latent norms, interpolations
    assert not list((tmp_path / "report").glob("*.png"))


def test_report_reads_a_wandb_project(monkeypatch, tmp_path):
    config = {"variant": "semantic", "loss": {"beta": 1.0, "semantic_weight": 10.0}}
    runs = [_FakeRun(f"r{seed}", config | {"seed": seed}, {"status": "finished", "test/mse": 0.01}) for seed in (0, 1)]
    calls = _fake_wandb(monkeypatch, runs)
    report = write_report("wandb:team/semvae", tmp_path).read_text()
    assert calls == [("team/semvae", None)]
    assert "`wandb:team/semvae`" in report and "- finished runs: 2 (semantic: 2)" in report
    assert "| semantic | 2 | 0.01 ± 0 |" in report
    assert "Skipped: no run folder has a latent_norms.npy" in report


@pytest.mark.parametrize(
    ("notebook", "pngs"),
    [("compare_models", ["latent_norms.png"]), ("sweep_report", ["heatmaps.png", "pareto_front.png"])],
)
def test_notebook_executes_on_the_fixtures(notebook, pngs, tmp_path, monkeypatch):
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    monkeypatch.setenv("SEMVAE_RUNS", str(FIXTURES))
    monkeypatch.setenv("SEMVAE_FIGURES", str(tmp_path))
    nb = jupytext.read(ROOT / "analysis" / f"{notebook}.py")
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint('torch imported:', 'torch' in sys.modules)"))
    nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    assert nb.cells[-1].outputs[0]["text"] == "torch imported: False\n"  # analysis/ needs pandas, not torch
    nb.cells.pop()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert sum("image/png" in out.get("data", {}) for out in outputs) == len(pngs)
    assert "12 finished" in "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(pngs)
