"""The benchmarks run end to end, in this process, and report every number they promise (no timing is asserted)."""

import functools
import json

import pytest
import torch

from semvae.runtime import native_bf16
from tests.conftest import DATA_DIR, ROOT


def test_throughput_benchmark_writes_its_table(tmp_path, monkeypatch):
    from benchmarks import throughput

    # the evaluation rate over 40 starting points instead of 1000: the same measurement, a 25th of the work
    monkeypatch.setattr(throughput, "evaluation_rate", functools.partial(throughput.evaluation_rate, n_points=40))
    args = ["--steps", "2", "--batch-size", "8", "--peak-seconds", "0.2", "--device", "cpu"]
    returned = throughput.main([*args, "--data", str(DATA_DIR), "--out", str(tmp_path)])  # python -m benchmarks...
    results = json.loads((tmp_path / "throughput.json").read_text())
    assert results == json.loads(json.dumps(returned))  # the file holds what it measured
    assert set(results["train"]) == {"vae", "semantic"}
    native = native_bf16(torch.device("cpu"))
    assert results["native_bf16"] is native and (results["peak_gflops"]["bf16"] is None) is not native
    expected = {"reference", "project fp32"} | ({"project bf16"} if native else set())
    for variant, paths in results["train"].items():
        reduced = {"project bf16, semantic term bf16"} if native and variant == "semantic" else set()
        assert set(paths) == expected | reduced and all(v > 0 for v in paths.values())
    # a semantic step does strictly more work than a plain one: K*M extra decodes and (K+1)*M judge passes
    assert results["flops_per_image"]["semantic"] > 1.5 * results["flops_per_image"]["vae"] > 0
    assert results["tf32"] is False  # fp32 measured as training runs it
    table = (tmp_path / "throughput.md").read_text()
    peak, evaluation = results["peak_gflops"]["fp32"], results["eval_points_directions_per_s"]
    assert f"Matmul peak: {peak:.0f} GFLOP/s fp32" in table  # the table reports what was measured
    assert f"Evaluation: {evaluation:.0f} GSV starting points × directions per second" in table
    for variant, paths in results["train"].items():
        assert f"| {variant} | reference | {paths['reference']:.0f} | 1.00 |" in table
    assert "| semantic | project fp32 |" in table and "share of bf16 peak" in table
    assert ("| semantic | project bf16 |" in table) is native and ("no native bf16" in table) is not native


def test_precision_benchmark_times_every_operation_in_both_precisions(tmp_path):
    from benchmarks.precision import main, operations

    args = ["--device", "cpu", "--repeats", "1", "--batch", "2", "--semantic-batches", "1", "--semantic-points", "4"]
    results = main([*args, "--data", str(DATA_DIR), "--out", str(tmp_path)])
    assert json.loads((tmp_path / "precision.json").read_text()) == json.loads(json.dumps(results))
    assert results["native_bf16"] is native_bf16(torch.device("cpu"))
    assert set(results["ms"]) == set(operations(2))
    assert all(t["fp32"] > 0 and t["bf16"] > 0 for t in results["ms"].values())
    table = (tmp_path / "precision.md").read_text()
    assert "| matmul 512x512 |" in table and table.count("| conv") == 3
    semantic = results["semantic_term_bf16"]
    assert (semantic["batches"], semantic["points"]) == (1, 4)
    for form in ("normalised", "raw"):
        w = semantic[form]
        assert w["abs"] > 0 and 0 < w["grad_cos"] <= 1  # the bf16 path differs from fp32 by rounding, not sign
        assert f"| {form} | {w['abs']:.2e} | {w['rel']:.2e} | {w['grad_cos']:.4f} |" in table


def test_evaluation_size_rule_follows_the_standard_error_and_the_spread_between_seeds():
    from benchmarks.evaluation_size import rule, summarise

    rows = [
        {"variant": v, "seed": s, "gsv_norm_j": g, "gsv_norm_j_se": se, "resampled_j": res}
        for v, s, g, se, res in [
            ("VAE", 0, 0.90, 0.004, [0.90, 0.91, 0.89]),
            ("VAE", 1, 0.92, 0.006, [0.92, 0.93, 0.91]),
            ("semanticVAE", 0, 0.80, 0.005, [0.80, 0.80, 0.80]),
            ("semanticVAE", 1, 0.86, 0.005, [0.86, 0.87, 0.85]),
        ]
    ]
    summary = summarise(rows, ["j"], points=100, fraction=0.25, test_size=10_000)
    vae, semantic = summary["VAE/j"], summary["semanticVAE/j"]
    assert vae["se"] == pytest.approx(0.005) and vae["between_seed_sd"] == pytest.approx(0.02 / 2**0.5)
    assert vae["rule_n"] == rule(0.005, 100, 0.02 / 2**0.5, 0.25) == 200  # 100 * (0.005 / (0.25 * 0.01414))^2
    assert semantic["between_seed_sd"] == pytest.approx(0.06 / 2**0.5) and semantic["rule_n"] == 23  # 22.2
    # the paired difference to the VAE of the same seed, resample by resample: [-0.1, -0.11, -0.09] and [-0.06] * 3
    assert semantic["paired_se_vs_VAE"] == pytest.approx((0.01 + 0.0) / 2)
    assert rule(0.05, 100, 0.001, 0.25) > 10_000
    tight = summarise([{**r, "gsv_norm_j_se": 0.5} for r in rows], ["j"], 100, 0.25, test_size=10_000)
    assert tight["VAE/j"]["rule_n"] is None  # no N within the test split reaches it


def test_evaluation_size_benchmark_writes_what_it_measured(tmp_path):
    from benchmarks import evaluation_size

    weights = ROOT / "weights"
    models = [weights / "VAE_epoch50.pth", weights / "seeds" / "VAE_seed1_epoch50.pth"]
    args = ["--models", *map(str, models), "--points", "4", "--resamples", "20", "--judges", "train"]
    results = evaluation_size.main([*args, "--data", str(DATA_DIR), "--out", str(tmp_path)])
    assert json.loads((tmp_path / "evaluation_size.json").read_text()) == json.loads(json.dumps(results))
    assert [(m["variant"], m["seed"]) for m in results["models"]] == [("VAE", 0), ("VAE", 1)]
    assert all(0 < m["gsv_norm_train"] < 1 and m["gsv_norm_train_se"] > 0 for m in results["models"])
    row = results["summary"]["VAE/train"]
    assert row["seeds"] == 2 and row["between_seed_sd"] > 0
    table = (tmp_path / "evaluation_size.md").read_text()
    assert f"| VAE/train | 2 | {row['mean']:.4f} | {row['se']:.4f} | {row['between_seed_sd']:.4f} | - |" in table


def test_sweep_benchmark_times_the_three_ways_on_the_same_members(tmp_path):
    from benchmarks import sweep

    assert [w for _, w, _ in sweep.member_settings(4)] == [0.0, 10.0, 1.0, 100.0]  # lambda = 0 beside semantic ones
    assert sweep.member_settings(16)[15] == (1.0, 0.0, 1)  # after the 15 settings, seed 1
    args = ["--members", "2", "--steps", "1", "--batch-size", "8", "--processes", "2", "--device", "cpu"]
    args += ["--peak-seconds", "0.1"]
    result = sweep.main([*args, "--out", str(tmp_path)])
    assert json.loads((tmp_path / "sweep_cpu.json").read_text()) == json.loads(json.dumps(result))
    rows = {r["way"]: r for r in result["rows"]}
    assert set(rows) == {"one at a time", "processes", "stacked"}
    for r in rows.values():
        assert r["member_images_per_s"] == pytest.approx(2 * 1 * 8 / r["seconds"])
        assert r["vs_one_at_a_time"] == pytest.approx(
            r["member_images_per_s"] / rows["one at a time"]["member_images_per_s"]
        )
        assert 0 < r["peak_share"] < 1
    assert f"| 2 | stacked | {rows['stacked']['member_images_per_s']:.0f} |" in (tmp_path / "sweep_cpu.md").read_text()
