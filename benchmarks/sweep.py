"""Sweep throughput: stacked training against one process per job and one job at a time, side by side on one device.

    python -m benchmarks.sweep [--members 1 6 30] [--steps 6] [--batch-size 128] [--device cpu] [--compile]
                               [--out DIR]

Members are VAE trainings of the study's grid (beta in {1, 2, 5} x lambda in {0, 1, 10, 100, 1000}, the seeds after
that), taken in an order that mixes lambda = 0 and semantic members as the sweep does. Each is a ``Trainer`` with
data on the device, ``--steps`` optimiser steps and a one-batch validation, no callbacks. Three ways to run N
members, timed from start to end, the same members each time:

- ``one at a time``: one after another in this process, every core for each;
- ``processes``: a process of its own per member, ``--processes`` at a time with the cores shared between them, as
  ``hydra/launcher=local`` runs a sweep (the members' training time packed onto the process slots; the process
  start is not counted);
- ``stacked``: all N in one stack (``semvae/training/stacking.py``), as ``hydra/launcher=stacked`` runs them;
- ``stacked + compile`` (with ``--compile``): the same with the stack's step under ``torch.compile``
  (``hydra.launcher.compile=true``). Its compilation is left out: its time is that of a run of 2 x ``--steps``
  steps less that of a run of ``--steps`` steps (the compiled step is reused within a run only).

Reported: member-images per second (N x steps x batch size / seconds), the ratio to one-at-a-time in the same run,
and the shares of the device's fp32 and bf16 matmul peaks (FLOPs of a member's step from torch's flop counter;
the runs are fp32), with the device's name and whether it computes bf16 natively. Results go to ``sweep.json``
and ``sweep.md`` in ``--out``, named with the device.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import device_name
from benchmarks.throughput import matmul_peak, step_flops
from semvae.config import TrainerConfig
from semvae.data import Split
from semvae.losses import TrainingStep, VAELoss
from semvae.models import Classifier, ResNetVAE, freeze
from semvae.runtime import native_bf16, resolve_device
from semvae.training import Trainer, stacking
from semvae.training.stacking import run_stacked

ROOT = Path(__file__).resolve().parents[1]
GRID = [(beta, weight) for weight in (0.0, 10.0, 1.0, 100.0, 1000.0) for beta in (1.0, 2.0, 5.0)]


def member_settings(n: int) -> list[tuple[float, float, int]]:
    """(beta, lambda, seed) of the first ``n`` members: every grid setting with seed 0, then seeds 1 and 2.
    The lambda order interleaves lambda = 0 with semantic members."""
    order = [GRID[i] for i in sorted(range(len(GRID)), key=lambda i: (i % 3, i))]
    return [(*order[i % len(order)], i // len(order)) for i in range(n)]


def synthetic_data(steps: int, batch_size: int, device: torch.device) -> tuple[Split, Classifier]:
    """Training images (uniform noise: the speed does not depend on them) and a frozen phi, the same every call."""
    torch.manual_seed(0)
    n_train = max(batch_size * steps, 1024)
    train = Split(torch.rand(n_train, 1, 28, 28), torch.zeros(n_train, dtype=torch.long)).to(device)
    return train, freeze(Classifier((16, 32, 64), 1).to(device))


def make_trainer(i: int, n: int, train: Split, phi: Classifier, steps: int, batch_size: int) -> Callable[[], object]:
    """Member ``i`` of ``n``, ready to fit (alone, or in a stack when called by one of its members)."""
    device = train.images.device
    settings = TrainerConfig(
        epochs=1, batch_size=batch_size, log_every=steps, limit_train_batches=steps, limit_eval_batches=1
    )
    val = train.subset(torch.arange(batch_size, device=device))
    beta, weight, seed = member_settings(n)[i]
    torch.manual_seed(seed)
    vae = ResNetVAE(16, (16, 32, 64), 1).to(device)
    loss = VAELoss(beta, weight, phi.features if weight > 0 else None, 16)
    step = TrainingStep(loss, torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 3))

    def evaluate(model, x, _y):
        return loss(model, x, torch.Generator().manual_seed(0), noise=torch.zeros(x.shape[0], 16, device=device))

    trainer = Trainer(vae, train, val, step, evaluate, settings, seed=seed)
    return lambda: stacking.fit(trainer, None)


def make_trainers(n: int, train: Split, phi: Classifier, steps: int, batch_size: int) -> list[Callable[[], object]]:
    return [make_trainer(i, n, train, phi, steps, batch_size) for i in range(n)]


def one_at_a_time(fits) -> float:
    started = time.perf_counter()
    for fit in fits:
        fit()
    return time.perf_counter() - started


def stacked(fits, compile: bool = False) -> float:
    started = time.perf_counter()
    outcomes = run_stacked(fits, compile=compile)
    seconds = time.perf_counter() - started
    errors = [error for _, error in outcomes if error is not None]
    if errors:
        raise errors[0]
    return seconds


def _member_process(i: int, n: int, steps: int, batch_size: int, threads: int, seconds) -> None:
    torch.set_num_threads(threads)
    train, phi = synthetic_data(steps, batch_size, torch.device("cpu"))
    fit = make_trainer(i, n, train, phi, steps, batch_size)
    started = time.perf_counter()
    fit()
    seconds[i] = time.perf_counter() - started


def in_processes(n: int, steps: int, batch_size: int, processes: int) -> float:
    """A process per member, ``processes`` at a time, the cores shared between them. Returns the training time of
    the members' ``fit`` calls packed onto the ``processes`` slots (sum / slots): the process start and the data set-up
    are left out, as they are for the other ways (a 50-epoch job pays them once). The processes fork from a fresh
    server that has imported torch but never computed, as the local launcher forks from Hydra's process: a process
    forked from this one, whose OpenMP threads have run, can hang."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "semvae.training"])
    slots = min(processes, n)
    threads = max(1, (os.cpu_count() or 1) // slots)
    seconds = context.Array("d", n)
    pending, running = list(range(n)), []
    while pending or running:
        while pending and len(running) < processes:
            args = (pending.pop(0), n, steps, batch_size, threads, seconds)
            process = context.Process(target=_member_process, args=args)
            process.start()
            running.append(process)
        running[0].join()
        if running[0].exitcode != 0:
            raise RuntimeError(f"a member's process ended with {running[0].exitcode}")
        running.pop(0)
    return sum(seconds) / slots


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, nargs="+", default=[1, 6, 30])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="processes at a time")
    parser.add_argument("--peak-seconds", type=float, default=2.0, help="time spent measuring each matmul peak")
    parser.add_argument("--compile", action="store_true", help="also the stacked step under torch.compile")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    train, phi = synthetic_data(args.steps, args.batch_size, device)
    peak = matmul_peak(torch.float32, device, seconds=args.peak_seconds)
    bf16 = native_bf16(device)
    peak_bf16 = matmul_peak(torch.bfloat16, device, seconds=args.peak_seconds)
    flops = {w > 0: step_flops("semantic" if w > 0 else "vae", device, args.batch_size) for w in (0.0, 10.0)}
    ways = {
        "one at a time": lambda n: one_at_a_time(make_trainers(n, train, phi, args.steps, args.batch_size)),
        "processes": lambda n: in_processes(n, args.steps, args.batch_size, args.processes),
        "stacked": lambda n: stacked(make_trainers(n, train, phi, args.steps, args.batch_size)),
    }
    if args.compile:

        def compiled(n: int) -> float:
            short = stacked(make_trainers(n, train, phi, args.steps, args.batch_size), compile=True)
            return stacked(make_trainers(n, train, phi, 2 * args.steps, args.batch_size), compile=True) - short

        ways["stacked + compile"] = compiled
    if device.type == "cuda":
        ways.pop("processes")  # one GPU: processes would share it by time slices; the launcher does not do that
    stacked(make_trainers(2, train, phi, 2, args.batch_size))  # warm-up (allocator, kernels, vmap)
    rows = []
    for n in args.members:
        images = n * args.steps * args.batch_size
        member_flops = sum(flops[w > 0] for _, w, _ in member_settings(n)) / n
        base = None
        for way, run in ways.items():
            seconds = run(n)
            rate = images / seconds
            base = base or rate
            share = rate * member_flops / (peak * 1e9)
            share_bf16 = rate * member_flops / (peak_bf16 * 1e9)
            rows.append(
                {
                    "members": n,
                    "way": way,
                    "seconds": seconds,
                    "member_images_per_s": rate,
                    "vs_one_at_a_time": rate / base,
                    "peak_share": share,
                    "bf16_peak_share": share_bf16,
                }
            )
            print(
                f"{n:3d} members  {way:18s} {rate:8.1f} member-img/s  x{rate / base:.2f}  {share:.1%} of fp32 peak",
                flush=True,
            )
    result = {
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "processes": args.processes,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "fp32_matmul_peak_gflops": peak,
        "bf16_matmul_peak_gflops": peak_bf16,
        "native_bf16": bf16,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tag = device.type
    (args.out / f"sweep_{tag}.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"Sweep throughput on {result['device']} ({result['threads']} threads; matmul peaks fp32 {peak:.0f}, "
        f"bf16 {peak_bf16:.0f} GFLOP/s, bf16 {'native' if bf16 else 'emulated'}; batch {args.batch_size}, "
        f"{args.steps} steps per member, fp32; `python -m benchmarks.sweep`)",
        "",
        "| members | way | member-images/s | vs one at a time | share of fp32 peak | share of bf16 peak |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['members']} | {r['way']} | {r['member_images_per_s']:.0f} | {r['vs_one_at_a_time']:.2f}x "
        f"| {r['peak_share']:.1%} | {r['bf16_peak_share']:.1%} |"
        for r in rows
    ]
    (args.out / f"sweep_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
