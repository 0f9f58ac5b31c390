"""The GPU window's one command (benchmarks/gpu_window.py), at test size on the CPU."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from tests.conftest import DATA_DIR


@pytest.mark.slow
def test_a_gpu_window_runs_every_step_and_packs_what_comes_back(tmp_path):
    from benchmarks import gpu_window

    carry, out = tmp_path / "carry", tmp_path / "out"
    gpu_window.main(["prepare", "--carry", str(carry), "--data", str(DATA_DIR), "--no-wheels"])
    assert (carry / "mnist.tar.gz").stat().st_size < 8 * 2**20
    done = tmp_path / "done.txt"
    done.write_text("b2-VAE_s0\n")  # finished in an earlier window: skipped
    args = ["run", "--tiny", "--out", str(out), "--carry", str(carry), "--done", str(done), "--budget", "500"]
    parts = gpu_window.main([*args, "--reserve", "10"])
    # at most 8 parts of at most 16 MiB, directly under --out
    assert 1 <= len(parts) <= 8 and sorted(out.iterdir()) == sorted(parts)
    assert all(p.stat().st_size <= 16 * 2**20 for p in parts)
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    window = files["logs/window.txt"].decode()
    for name in ("cuda_tests", "sweep", "study"):
        assert f"{name}: exit status 0" in window, window
    assert {r["way"] for r in json.loads(files["sweep/sweep_cpu.json"])["rows"]} == {
        "one at a time",
        "processes",
        "stacked",
    }
    assert "3 members" in files["logs/study.txt"].decode() and "1 jobs skipped" in files["logs/study.txt"].decode()
    finished = sorted(files["done.txt"].decode().split())
    assert finished == ["b2-VAE_s0", "b2-VAE_s1", "b2-semanticVAE-l1_s0", "b2-semanticVAE-l1_s1"]
    summaries = [json.loads(v) for k, v in files.items() if k.endswith("summary.json")]
    assert len(summaries) == 3 and all(s["status"] == "finished" and "test/mse" in s for s in summaries)
    assert sum(k.endswith("model.pth") for k in files) == 3 and not any(k.endswith("last.pt") for k in files)
