"""A sweep's plan, before running it: its jobs, how its launcher will group them, and what they will cost.

    python -m semvae.plan experiment=sweep_beta_semantic hydra/launcher=stacked
    python -m semvae.plan loss.beta=1,5 loss.semantic_weight=0,1 trainer=smoke task.evaluate=true

Takes the overrides of ``python run.py -m ...`` (``-m`` itself may be given or not), expands them as Hydra's basic
sweeper does (the experiment's ``hydra.sweeper.params`` first, the command line's on top; an optimiser's range,
as Optuna's, stands at its lower end: the optimiser chooses the values as it goes), composes and validates
every job, groups them as ``hydra/launcher=stacked`` would (one stack per set of jobs differing only in seed, name
and ``loss.*``; jobs on the CPU alone unless ``hydra.launcher.on_cpu=true``), and estimates each job's time by
scaling the measured runs of the README's cost table (``COSTS``) by its steps and evaluation size. Nothing is
trained, no folder is made; a job whose config does not validate is listed with its error.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Seconds per training step, per default evaluation of one model and per job besides (process start, data,
# validation, images), from the measured runs of the README's cost table (weights/README.md, docs/evaluation.md).
# CPU values are for one thread of an AMD EPYC (AVX2), whatever threads a job gets: a 50-epoch VAE in 4,038 s at 171
# steps an epoch; a semantic step 1.75 times a plain one (python -m benchmarks.throughput); evaluation=sweep (3/10 of
# the default's GSV work) in 284 s. GPU values are one H100's: 50-epoch trainings of 186-189 s (plain) and
# 248-249 s (semantic), five side by side; a default evaluation 80 s. The fixed part: the README's smoke sweep, 4
# smoke jobs with evaluation=smoke in 3 min on two shared CPU cores.
COSTS = {
    "cpu": {"plain_step": 4038 / (50 * 171), "semantic_factor": 1.75, "evaluation": 284 / 0.3, "fixed": 40.0},
    "cuda": {"plain_step": 188 / (50 * 171), "semantic_factor": 248 / 188, "evaluation": 80.0, "fixed": 40.0},
}
DEFAULT_EVALUATION_WORK = 1000 * (2 * 16 + 64) * 3  # n_points x directions x steps of evaluation=default


@dataclass
class Job:
    number: int
    overrides: list[str]
    name: str = ""
    device: str = ""
    seconds: float = math.nan
    group: str = "alone"
    error: str = ""
    key: str | None = None


def sweep_overrides(args: list[str]) -> list[list[str]]:
    """Every job's overrides, as Hydra's basic sweeper expands them: the config's ``hydra.sweeper.params``, then the
    command line's overrides (which win for the same key)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    params = compose(fixed_overrides(args), hydra=True).hydra.sweeper.get("params") or {}
    given = {o.key_or_group for o in parser.parse_overrides(args)}
    merged = [f"{k}={v}" for k, v in params.items() if k not in given] + args
    overrides = []
    for override in parser.parse_overrides(merged):
        if override.is_sweep_override() and not override.is_discrete_sweep():  # an optimiser's range (Optuna)
            override = parser.parse_override(f"{override.get_key_element()}={override.value().start}")
        overrides.append(override)
    (batch,) = BasicSweeper.split_arguments(overrides, None)
    return [list(job) for job in batch]


def fixed_overrides(args: list[str]) -> list[str]:
    """The overrides that are the same for every job (no sweep of values)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(args)
    return [a for a, o in zip(args, parsed, strict=True) if not o.is_sweep_override()]


def compose(overrides: list[str], hydra: bool = False):
    """run.py's config for ``overrides`` with Hydra's compose API (with its ``hydra`` node where asked)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from semvae import rundir
    from semvae.config import register_configs

    os.environ.setdefault("SEMVAE_ROOT", str(ROOT))
    register_configs()
    rundir.register_resolver()
    if GlobalHydra.instance().is_initialized():
        return hydra_compose("config", overrides=overrides, return_hydra_config=hydra)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3", job_name="run"):
        return hydra_compose("config", overrides=overrides, return_hydra_config=hydra)


def training_images(config) -> int:
    """Training images after the validation split: the data file's own count where it is there, else 60,000."""
    raw = Path(config.data.root) / ("FashionMNIST" if config.data.name.value == "fashion_mnist" else "MNIST") / "raw"
    try:
        with open(raw / "train-images-idx3-ubyte", "rb") as file:
            count = int.from_bytes(file.read(8)[4:8], "big")
    except OSError:
        count = 60000
    return max(0, count - config.data.val_size)


def job_seconds(config, device: str) -> float:
    """The estimated seconds of one job: a fixed part, its training steps, and its evaluation where it evaluates."""
    from semvae.config import TaskName

    cost = COSTS["cuda" if device.startswith("cuda") else "cpu"]
    seconds = cost["fixed"]
    if config.task.name == TaskName.train_vae:
        per_epoch = math.ceil(training_images(config) / config.trainer.batch_size)
        if config.trainer.limit_train_batches:
            per_epoch = min(per_epoch, config.trainer.limit_train_batches)
        step = cost["plain_step"] * (cost["semantic_factor"] if config.loss.semantic_weight > 0 else 1.0)
        step *= config.trainer.batch_size / 128
        seconds += config.trainer.epochs * per_epoch * step
    if config.task.name == TaskName.evaluate or config.task.evaluate:
        e = config.evaluation
        work = e.n_points * (2 * config.model.latent_dim + e.n_random_directions) * len(e.steps)
        models = len(e.checkpoints) if config.task.name == TaskName.evaluate else 1
        seconds += models * cost["evaluation"] * work / DEFAULT_EVALUATION_WORK
    return seconds


def plan(args: list[str]) -> tuple[list[Job], dict]:
    """The jobs of ``python run.py -m ARGS`` with their names, devices, groups and estimated seconds, and the
    launcher's settings."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    from hydra_plugins.semvae_launcher.stacked import CARRIED  # noqa: F401 - the plugin registers its config
    from semvae.config import as_plain, validate

    args = [a for a in args if a not in ("-m", "--multirun")]
    if not GlobalHydra.instance().is_initialized():
        os.environ.setdefault("SEMVAE_ROOT", str(ROOT))
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3", job_name="run"):
            return plan(args)
    hydra_cfg = compose(fixed_overrides(args), hydra=True).hydra
    launcher = OmegaConf.to_container(hydra_cfg.launcher, resolve=False)
    kind = str(launcher.get("_target_", "")).rsplit(".", 1)[-1]
    n_jobs = int(launcher.get("n_jobs") or launcher.get("array_parallelism") or 1)
    stacking = kind == "StackedLauncher"
    jobs = []
    for number, overrides in enumerate(sweep_overrides(args)):
        job = Job(number, overrides)
        cfg = compose(overrides)
        try:
            with open_dict(cfg):
                cfg.pop("hydra", None)
            config = validate(OmegaConf.to_object(cfg))
        except Exception as error:  # noqa: BLE001 - listed: the job would fail with this message
            job.error = str(error).splitlines()[0]
            jobs.append(job)
            continue
        job.name = config.name
        device = config.runtime.device
        job.device = "cuda" if device == "auto" and _cuda() else ("cpu" if device == "auto" else device)
        job.seconds = job_seconds(config, job.device)
        if stacking and config.task.name.value == "train_vae" and (job.device != "cpu" or launcher.get("on_cpu")):
            shared = {k: v for k, v in as_plain(config).items() if k not in CARRIED}
            job.key = repr(sorted(shared.items(), key=lambda kv: kv[0]))
        jobs.append(job)
    _group(jobs, int(launcher.get("max_members") or 64))
    return jobs, {"launcher": kind or "BasicLauncher", "at_a_time": n_jobs if kind else 1}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _group(jobs: list[Job], max_members: int) -> None:
    by_key: dict[str, list[Job]] = {}
    for job in jobs:
        if job.key is not None:
            by_key.setdefault(job.key, []).append(job)
    number = 0
    for members in by_key.values():
        for start in range(0, len(members), max_members):
            chunk = members[start : start + max_members]
            if len(chunk) > 1:
                number += 1
                for job in chunk:
                    job.group = f"stack {number}"


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe(jobs: list[Job], settings: dict) -> str:
    """The plan as text: a line per job (the overrides that vary between jobs), then the grouping and the cost."""
    shared = set.intersection(*(set(j.overrides) for j in jobs)) if len(jobs) > 1 else set()
    varying = {j.number: " ".join(o for o in j.overrides if o not in shared) for j in jobs}
    width = max([len(v) for v in varying.values()] + [9])
    lines = [f"{'job':>4}  {'overrides':<{width}}  {'name':<24} {'device':<6} {'group':<8} estimate"]
    for job in jobs:
        what = f"error: {job.error}" if job.error else duration(job.seconds)
        row = f"{job.number:>4}  {varying[job.number]:<{width}}  {job.name:<24} {job.device:<6} {job.group:<8}"
        lines.append(f"{row} {what}")
    if shared:
        lines.append(f"      every job: {' '.join(o for o in jobs[0].overrides if o in shared)}")
    stacks = sorted({j.group for j in jobs if j.group != "alone"})
    alone = [j for j in jobs if j.group == "alone" and not j.error]
    total = sum(j.seconds for j in jobs if not j.error)
    # a stack's members train in one process; its time is not measured, so the estimate is its members one after
    # another (an upper bound); jobs alone run `at_a_time` at once
    wall = sum(j.seconds for j in jobs if j.group != "alone") + sum(j.seconds for j in alone) / settings["at_a_time"]
    lines += [
        "",
        f"{len(jobs)} jobs with {settings['launcher']}: {len(stacks)} stack(s) "
        f"({', '.join(f'{s}: {sum(j.group == s for j in jobs)} members' for s in stacks) or 'none'}), "
        f"{len(alone)} alone ({settings['at_a_time']} at a time), {sum(bool(j.error) for j in jobs)} that would fail",
        f"estimated: {duration(total)} of job time, about {duration(wall)} from start to end "
        "(a stack counted as its members one after another)",
        "Estimates scale the measured runs of the README's cost table by each job's steps and evaluation size "
        "(CPU: one thread of an AMD EPYC; GPU: one H100); a machine shared with other work is slower.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m semvae.plan",
        description=__doc__.split("\n\n")[0],
        epilog="example: python -m semvae.plan experiment=sweep_beta_semantic hydra/launcher=stacked",
    )
    parser.add_argument("overrides", nargs="*", help="the overrides of python run.py -m ...")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args([a for a in argv if a not in ("-m", "--multirun")])
    try:
        jobs, settings = plan(args.overrides)
    except Exception as error:  # noqa: BLE001 - a config that does not compose: one line
        print(f"error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(describe(jobs, settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
