import json

from analysis.collect import collect_runs, flatten


def _run(root, name, config, summary):
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))


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
