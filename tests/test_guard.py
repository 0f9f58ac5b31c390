"""The run guard (semvae/guard.py): a run is checked before its folder exists, never writes outside it, never
follows a planted link, never mixes its files with another run's, and a refusal is one line that leaves no folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from semvae import rundir
from semvae.config import ConfigError, as_plain
from semvae.tracking import Tracker
from semvae.training.callbacks import Metrics
from tests.conftest import ROOT, compose_config, need_mnist, preflight

SMOKE = ("trainer=smoke", "logger=none")


def test_a_lock_planted_as_a_link_a_folder_or_a_fifo_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "precious"
    target.write_text("precious")
    for kind in ("link", "folder", "fifo"):
        run_dir = tmp_path / kind
        run_dir.mkdir()
        lock = run_dir / rundir.LOCK_FILE
        if kind == "link":
            lock.symlink_to(target)
        elif kind == "folder":
            lock.mkdir()
        else:
            os.mkfifo(lock)
        with pytest.raises(rundir.RunDirError, match=r"\.lock is "):
            rundir.hold(run_dir)
        with pytest.raises(rundir.RunDirError):
            rundir.check_free(run_dir)
        assert run_dir.resolve() not in rundir._held
    assert target.read_text() == "precious"
    # through run.py's guard: one line, exit 2, the target as it was
    refused = preflight(*SMOKE, f"hydra.run.dir={tmp_path / 'link'}")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and ".lock is a symbolic link" in refused.stderr
    assert target.read_text() == "precious"


@pytest.mark.parametrize("planted", ["run.log", ".hydra", "metrics.jsonl"])
def test_a_file_hydra_or_the_run_writes_planted_as_a_link_is_refused(tmp_path, planted):
    target = tmp_path / "precious"
    target.write_text("precious")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / planted).symlink_to(target)
    refused = preflight(*SMOKE, f"hydra.run.dir={run_dir}")
    assert refused.returncode == 2 and f"{planted} is a symbolic link" in refused.stderr
    assert target.read_text() == "precious" and sorted(p.name for p in run_dir.iterdir()) == [planted]


@pytest.mark.parametrize("name", ["../../../../escape", "a/b", "..", ".hidden", "two\nlines", ""])
def test_name_is_a_name_not_a_path(tmp_path, name):
    out = tmp_path / "out"
    refused = preflight(*SMOKE, f"paths.output_dir={out}", f"name='{name}'" if name else "name=''")
    assert refused.returncode == 2 and refused.stderr.startswith("error: name=") and "not a path" in refused.stderr
    assert refused.stderr.count("\n") == 1
    assert not out.exists() and not (tmp_path / "escape").exists()  # no folder anywhere


def test_a_folder_of_unrelated_files_or_of_another_run_is_refused_and_kept(tmp_path):
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "metrics.jsonl").write_text('{"step": 99}\n')
    refused = preflight(*SMOKE, f"hydra.run.dir={unrelated}")
    assert refused.returncode == 2 and "holds files that no run wrote (metrics.jsonl)" in refused.stderr
    assert (unrelated / "metrics.jsonl").read_text() == '{"step": 99}\n'
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"seed": 3, "loss": {"beta": 5.0}}))
    refused = preflight(*SMOKE, f"hydra.run.dir={other}")
    assert refused.returncode == 2 and "holds another run's files" in refused.stderr
    assert "seed: 3 -> 0" in refused.stderr and "loss.beta: 5.0 -> 1.0" in refused.stderr
    assert sorted(p.name for p in other.iterdir()) == ["config.json"]


def test_the_runs_own_folder_is_admitted_and_held(tmp_path):
    run_dir = tmp_path / "run"
    first = preflight(*SMOKE, f"hydra.run.dir={run_dir}")
    assert first.returncode == 0 and (run_dir / rundir.LOCK_FILE).is_file()
    hydra_dir = run_dir / ".hydra"  # what Hydra writes before the task, from a first attempt killed early
    hydra_dir.mkdir()
    (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(as_plain(compose_config(*SMOKE))))
    again = preflight(*SMOKE, "runtime.num_threads=1", f"hydra.run.dir={run_dir}")  # a setting a resume may change
    assert again.returncode == 0, again.stderr
    assert run_dir.resolve() not in rundir._held  # released by the helper


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.batch_size=1000000000", "trainer.batch_size=1000000000: at most 21797"),
        ("runtime.num_threads=100000", "runtime.num_threads=100000: at most"),
        ("data.val_size=23797", "data.val_size=23797: must be in [1, 23796]"),
        ("data.root=/nonexistent", "MNIST not found under data.root='/nonexistent'"),
        ("trainer.lr=inf", "trainer.lr=inf: must be finite and > 0"),
        ("task.evaluate=true evaluation.n_points=20000", "evaluation.n_points=20000: at most 10000"),
        ("experiment=sweep_beta_semantic", "experiment=sweep_beta_semantic is a sweep over"),
    ],
)
def test_a_run_refused_by_its_data_machine_or_sizes_leaves_no_folder(tmp_path, override, message):
    if "data.root" not in override and (need_mnist() / "MNIST" / "raw" / "train-images-idx3-ubyte").stat().st_size != (
        16 + 23797 * 784
    ):
        pytest.skip("the sizes in the messages are those of the pre-staged MNIST (23,797 training images)")
    run_dir = tmp_path / "run"
    extra = ["data.download=false"] if "data.root" in override else []
    refused = preflight(*SMOKE, *override.split(), *extra, f"hydra.run.dir={run_dir}")
    assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    assert refused.stderr.count("\n") == 1 and not run_dir.exists()


def test_cuda_without_a_gpu_is_refused_before_the_folder(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    refused = preflight(*SMOKE, "runtime.device=cuda", f"hydra.run.dir={tmp_path / 'run'}")
    assert refused.returncode == 2 and "runtime.device='cuda': no CUDA device" in refused.stderr
    assert not (tmp_path / "run").exists()


def test_one_job_of_a_sweep_experiment_runs_when_its_swept_keys_are_set(tmp_path):
    ok = preflight(
        "experiment=sweep_beta_semantic", "loss.beta=1", "loss.semantic_weight=0", "seed=0", "logger=none",
        f"hydra.run.dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr


def test_an_export_that_is_a_folder_is_refused_before_training(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    refused = preflight(*SMOKE, f"task.export={folder}", "task.overwrite=true", f"hydra.run.dir={tmp_path / 'run'}")
    assert refused.returncode == 2 and "is a folder; name the model file" in refused.stderr
    assert not (tmp_path / "run").exists()


def test_metrics_of_an_attempt_killed_before_its_first_checkpoint_are_not_kept(tmp_path):
    tracker = Tracker(tmp_path, {}, mode="disabled")
    for step in (1, 2, 3):  # an attempt killed in its first epoch: no checkpoint, these lines stay
        tracker.log({"train/loss": 1.0}, step=step)

    class Fresh:  # a trainer starting at step 0 (no checkpoint), or at step 2 (resumed)
        step = 0

    Metrics(tracker).on_fit_start(Fresh)
    assert tracker.metrics_path.read_text() == ""
    for step in (1, 2, 3):
        tracker.log({"train/loss": 1.0}, step=step)
    Fresh.step = 2
    Metrics(tracker).on_fit_start(Fresh)
    assert [json.loads(line)["step"] for line in tracker.metrics_path.read_text().splitlines()] == [1, 2]


def test_the_guard_is_registered_and_library_code_never_exits():
    assert "semvae.guard.RunGuard" in (ROOT / "conf" / "config.yaml").read_text()
    sources = [*Path(ROOT / "semvae").rglob("*.py"), *Path(ROOT / "hydra_plugins").rglob("*.py")]
    library = {p: p.read_text().split('\nif __name__ == "__main__":')[0] for p in sources}  # a CLI may exit
    exiting = [
        str(p.relative_to(ROOT)) for p, text in library.items() if "raise SystemExit" in text or "sys.exit(" in text
    ]
    assert exiting == []
    assert issubclass(ConfigError, ValueError)  # callers catching ValueError keep working


@pytest.mark.parametrize("planted", ["images_prior_samples.png", "models/VAE.json"])
def test_a_link_under_any_name_in_the_runs_own_folder_is_refused(tmp_path, planted):
    target = tmp_path / "precious"
    target.write_text("precious")
    run_dir = tmp_path / "run"
    (run_dir / "models").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(as_plain(compose_config(*SMOKE))))  # this run's own folder
    (run_dir / planted).symlink_to(target)
    refused = preflight(*SMOKE, f"hydra.run.dir={run_dir}")
    assert refused.returncode == 2 and "is a symbolic link" in refused.stderr and target.read_text() == "precious"


def test_a_run_folder_with_hydras_names_taken_by_other_kinds_or_a_dangling_link_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(as_plain(compose_config(*SMOKE))))
    (run_dir / ".hydra").write_text("x")
    refused = preflight(*SMOKE, f"hydra.run.dir={run_dir}")
    assert refused.returncode == 2 and ".hydra is not the folder a run writes there" in refused.stderr
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    refused = preflight(*SMOKE, f"hydra.run.dir={dangling}")
    assert refused.returncode == 2 and "is a link to nothing" in refused.stderr and not (tmp_path / "nowhere").exists()
    too_long = tmp_path / ("a" * 300)
    refused = preflight(*SMOKE, f"hydra.run.dir={too_long}")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "File name too long" in refused.stderr


def test_an_existing_sweep_folder_with_a_linked_or_foreign_job_folder_is_refused_before_any_job(tmp_path):
    from omegaconf import OmegaConf

    from semvae.errors import Abort
    from semvae.guard import RunGuard

    victim = tmp_path / "victim"
    victim.mkdir()
    cases = {"link": lambda job: job.symlink_to(victim), "file": lambda job: job.write_text("x")}
    cases["foreign"] = lambda job: (job.mkdir(), (job / "notes.txt").write_text("mine"))
    for kind, plant in cases.items():
        sweep_dir = tmp_path / kind
        sweep_dir.mkdir()
        plant(sweep_dir / "0")
        config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}})
        with pytest.raises(Abort) as refused:
            RunGuard().on_multirun_start(config=config)
        assert isinstance(refused.value.error, rundir.RunDirError), kind
        assert not (sweep_dir / rundir.LOCK_FILE).exists()
    assert list(victim.iterdir()) == []


@pytest.mark.parametrize("override", ["hydra.output_subdir=../escape", "hydra.job.name=../jobescape"])
def test_hydras_own_names_cannot_put_files_outside_the_run_folder(tmp_path, override):
    refused = preflight(*SMOKE, override, f"hydra.run.dir={tmp_path / 'run'}")
    assert refused.returncode == 2 and "must be a name inside the run folder" in refused.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spelling", [["--cfg=job"], ["-cjob"], ["--cfg", "job"]])
def test_every_spelling_of_cfg_with_m_points_at_the_plan(spelling):
    import run

    with pytest.raises(SystemExit) as exited:
        run.check_sweep_flags(["-m", *spelling, "seed=0,1"])
    assert exited.value.code == 2
