"""The benchmarks run end to end, in this process, and report every number they promise (no timing is asserted)."""

import functools
import json

import torch

from semvae.runtime import native_bf16
from tests.conftest import DATA_DIR


def test_throughput_benchmark_writes_its_table(tmp_path, monkeypatch):
    from benchmarks import throughput

    # the evaluation rate over 40 starting points instead of 1000: the same measurement, a 25th of the work
    monkeypatch.setattr(throughput, "evaluation_rate", functools.partial(throughput.evaluation_rate, n_points=40))
    args = ["--steps", "2", "--batch-size", "32", "--peak-seconds", "0.2", "--device", "cpu"]
    returned = throughput.main([*args, "--data", str(DATA_DIR), "--out", str(tmp_path)])  # python -m benchmarks...
    results = json.loads((tmp_path / "throughput.json").read_text())
    assert results == json.loads(json.dumps(returned))  # the file holds what it measured
    assert set(results["train"]) == {"vae", "semantic"}
    native = native_bf16(torch.device("cpu"))
    assert results["native_bf16"] is native and (results["peak_gflops"]["bf16"] is None) is not native
    expected = {"reference", "project fp32"} | ({"project bf16"} if native else set())
    for paths in results["train"].values():
        assert set(paths) == expected and all(v > 0 for v in paths.values())
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

    results = main(["--device", "cpu", "--repeats", "1", "--batch", "2", "--out", str(tmp_path)])
    assert results["native_bf16"] is native_bf16(torch.device("cpu"))
    assert set(results["ms"]) == set(operations(2))
    assert all(t["fp32"] > 0 and t["bf16"] > 0 for t in results["ms"].values())
    table = (tmp_path / "precision.md").read_text()
    assert table.count("\n") == 2 + 2 + len(operations(2)) and "| matmul 512x512 |" in table
