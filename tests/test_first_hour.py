"""What a newcomer meets in the first hour: run.py's help with examples, a sweep's plan instead of a traceback,
a resume command that works from a new shell, refusals that name the key to set, one-line errors printed once,
and a stop that W&B does not show as a failure."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import sys
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

import run
from semvae.plan import describe, plan
from semvae.tasks.checks import export_exists
from semvae.tracking import Tracker
from tests.conftest import ROOT, compose_config, run_py


def _stderr(call) -> tuple[int | None, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            call()
        except SystemExit as exit_:
            return exit_.code, err.getvalue()
    return None, err.getvalue()


def test_the_resume_command_names_the_data_folder_so_a_new_shell_can_run_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hc = SimpleNamespace(
        overrides=SimpleNamespace(task=["variant=semantic", "seed=1"], hydra=["hydra.mode=RUN"]),
        runtime=SimpleNamespace(output_dir=str(tmp_path / "run")),
    )
    command = run.resume_command(hc, OmegaConf.create({"data": {"root": "shared/data"}}))
    assert shlex.split(command)[2:] == [
        "variant=semantic",
        "seed=1",
        f"data.root={tmp_path / 'shared' / 'data'}",  # absolute, wherever the next shell starts
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    hc.overrides.task.append("data.root=/d")  # the user's own data.root is kept as given, once
    assert shlex.split(run.resume_command(hc, OmegaConf.create({"data": {"root": "/d"}}))).count("data.root=/d") == 1


def test_a_sweep_with_cfg_points_at_its_plan_instead_of_a_traceback():
    code, stderr = _stderr(lambda: run.check_sweep_flags(["-m", "experiment=sweep_beta_semantic", "--cfg", "job"]))
    assert code == 2
    assert stderr == (
        "error: --cfg shows one job's config, not a sweep's; the sweep's jobs, their grouping and cost: "
        "python -m semvae.plan experiment=sweep_beta_semantic\n"
    )
    assert _stderr(lambda: run.check_sweep_flags(["variant=vae", "--cfg", "job"])) == (None, "")


def test_the_plan_lists_jobs_groups_and_a_cost_without_running(tmp_path):
    jobs, settings = plan(
        [
            "-m",
            "loss.beta=1,5",
            "loss.semantic_weight=0,1",
            "trainer=smoke",
            "hydra/launcher=stacked",
            "hydra.launcher.on_cpu=true",
            f"paths.output_dir={tmp_path}",
        ]
    )
    assert [j.name for j in jobs] == ["VAE", "semanticVAE-l1", "b5-VAE", "b5-semanticVAE-l1"]
    assert settings["launcher"] == "StackedLauncher" and {j.group for j in jobs} == {"stack 1"}
    assert all(j.device == "cpu" and 0 < j.seconds < 600 for j in jobs)
    assert jobs[1].seconds > jobs[0].seconds  # the semantic term costs
    text = describe(jobs, settings)
    assert "4 jobs with StackedLauncher: 1 stack(s) (stack 1: 4 members), 0 alone" in text
    assert not list(tmp_path.iterdir())  # nothing was made
    on_cpu_alone, _ = plan(["loss.beta=1,5", "trainer=smoke", "hydra/launcher=stacked"])
    assert {j.group for j in on_cpu_alone} == {"alone"}  # the launcher does not stack CPU jobs by default
    (bad, good), _ = plan(["loss.beta=-1,1", "trainer=smoke"])
    assert bad.error == "loss.beta=-1.0: must be finite and >= 0" and not good.error


def test_the_help_examples_compose():
    """Every `python run.py` example of `run.py --help` composes (the sweep's first job)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3", job_name="run"):
        template = compose("config", return_hydra_config=True).hydra.help.template
    examples = re.findall(r"^\s+python run\.py (.*?)(?:\s{2,}|$)", template, flags=re.M)
    assert len(examples) >= 5
    for example in examples:
        args = [a for a in shlex.split(example) if a != "-m"]
        if "--cfg" in args:
            args = args[: args.index("--cfg")]
        compose_config(*[a.split(",")[0] if "," in a else a for a in args])


def test_refusing_to_overwrite_names_the_key_the_user_sets():
    classifier = compose_config("task=train_classifier")
    message = export_exists(classifier, "weights/classifier.pth")
    assert message.startswith("classifier.checkpoint='weights/classifier.pth' exists")
    assert "classifier.checkpoint=outputs/classifier.pth" in message and "task.overwrite=true" in message
    vae = compose_config("task.export=outputs/VAE.pth")
    assert export_exists(vae, "outputs/VAE.pth").startswith("task.export='outputs/VAE.pth' exists")


def test_a_stopped_run_is_not_a_failure_in_wandb(tmp_path):
    finished = []
    stub = SimpleNamespace(tags=("sweep",), finish=lambda exit_code: finished.append(exit_code))
    tracker = Tracker(tmp_path, {}, mode="disabled")
    tracker.run = stub
    tracker.stopped()
    assert finished == [0] and stub.tags == ("sweep", "stopped") and tracker.run is None


@pytest.mark.slow
def test_help_sweep_cfg_and_a_missing_data_folder_in_a_process(tmp_path):
    """The process is the point: Hydra's --help with the examples, `-m --cfg` without a traceback, and a data error
    printed once on one line."""
    helped = run_py("--help")
    assert "Examples" in helped.stdout and "python -m semvae.plan" in helped.stdout
    swept = run_py("-m", "experiment=sweep_beta_semantic", "--cfg", "job", check=False)
    assert swept.returncode == 2 and "Traceback" not in swept.stderr and "semvae.plan" in swept.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = run_py(
        "trainer=smoke",
        "logger=none",
        f"data.root={empty}",
        "data.download=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        check=False,
    )
    assert missing.returncode == 2, missing.stderr
    lines = [line for line in missing.stderr.splitlines() if "not found under data.root" in line]
    assert len(lines) == 1 and lines[0].startswith("error: MNIST not found"), missing.stderr


def test_gsv_progress_in_a_redirected_log_is_a_line_per_quarter_with_the_time_left(caplog, monkeypatch):
    import logging

    from semvae.evaluation.metrics import ShiftProgress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    caplog.set_level(logging.INFO, logger="semvae.evaluation.metrics")
    bar = ShiftProgress(34, "GSV (train)")
    for _ in range(17):
        bar.update(2)
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" shifts")[0] for line in lines] == [f"GSV (train): {d}/34" for d in (10, 18, 26, 34)]
    assert all(re.search(r"in \d+s, \d+s left$", line) for line in lines)
    silent = ShiftProgress(4, None)
    silent.update(4)
    assert len(caplog.records) == 4


def test_a_local_launcher_job_names_its_log_lines(caplog):
    import logging

    from hydra_plugins.semvae_launcher.processes import name_log_lines

    factory = logging.getLogRecordFactory()
    try:
        name_log_lines("job 3")
        with caplog.at_level(logging.INFO, logger="semvae.training.trainer"):
            logging.getLogger("semvae.training.trainer").info("epoch %d/%d", 1, 50)
    finally:
        logging.setLogRecordFactory(factory)
    assert caplog.records[-1].getMessage() == "[job 3] epoch 1/50"


def test_an_evaluation_states_its_overall_time_left_after_each_model():
    from semvae.tasks.evaluate import evaluation_eta

    assert evaluation_eta(2, 1, 580.0) == "2 models in 9m40s; 1 left, about 4m50s"
    assert evaluation_eta(1, 0, 45.0) == "1 model in 45s; all evaluated"
