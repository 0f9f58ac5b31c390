"""Training and evaluation speed, measured side by side in one process.

    python -m benchmarks.throughput [--steps 40] [--batch-size 128] [--device cpu] [--out benchmarks/results]

For ``variant=vae`` and ``variant=semantic`` (same model, batch size and device) it times a training step
(images per second) along two paths:

- reference: torchvision's ``DataLoader(MNIST(transform=ToTensor()), shuffle=True)`` feeding the model in eager
  fp32 with ``loss.item()`` read every step, the way most VAE repositories train;
- project: ``semvae.training.Trainer`` (data resident on the device as one tensor, batches by index, losses read every
  ``log_every`` steps), with the trainer's defaults and with ``precision=bf16``.

It also measures the FLOPs of a training step per image (torch's flop counter), the machine's fp32 and bf16 matmul
peak, the share of that peak each path reaches, the cost of a semantic step relative to a plain one, and the
evaluation throughput (GSV starting points x directions per second). Results go to ``throughput.json`` and
``throughput.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from benchmarks import device_name
from semvae.config import TrainerConfig
from semvae.data import Split, load_split
from semvae.evaluation import metrics as ev
from semvae.losses import sample_directions, vae_objective
from semvae.models import Classifier, ResNetVAE, freeze
from semvae.runtime import native_bf16, resolve_device
from semvae.training import Trainer

ROOT = Path(__file__).resolve().parents[1]


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, seconds: float = 2.0) -> float:
    """GFLOP/s of an n x n matmul in ``dtype``, best of repeated runs."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, started = 0.0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        (a @ b).sum().item()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def make_models(variant: str, device: torch.device, channels_last: bool) -> tuple[ResNetVAE, Classifier | None]:
    torch.manual_seed(0)
    vae = ResNetVAE(16, (16, 32, 64), 1).to(device)
    phi = freeze(Classifier((16, 32, 64), 1).to(device)) if variant == "semantic" else None
    if channels_last:
        for net in (vae, phi):
            if net is not None:
                net.to(memory_format=torch.channels_last)
    return vae, phi


def step_function(variant: str, phi: Classifier | None, device: torch.device, semantic_autocast: bool = False):
    generator = torch.Generator().manual_seed(1)
    weight = 10.0 if variant == "semantic" else 0.0

    def step(model, x, _y):
        d = sample_directions(4, 16, "random", 1.0, generator, device) if phi is not None else None
        features = phi.features if phi else None
        return vae_objective(model, x, 1.0, weight, features, d, 32, semantic_autocast=semantic_autocast)

    return step


def step_flops(variant: str, device: torch.device, batch_size: int) -> float:
    """FLOPs of one training step (forward and backward) per image."""
    from torch.utils.flop_counter import FlopCounterMode

    vae, phi = make_models(variant, device, channels_last=False)
    x = torch.rand(batch_size, 1, 28, 28, device=device)
    with FlopCounterMode(display=False) as counter:
        step_function(variant, phi, device)(vae, x, None)["loss"].backward()
    return counter.get_total_flops() / batch_size


def reference_rate(variant: str, data_root: str, device: torch.device, batch_size: int, steps: int) -> float:
    """Images/s of the common training loop: DataLoader with ToTensor, eager fp32, loss.item() every step."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    dataset = datasets.MNIST(data_root, train=True, download=False, transform=transforms.ToTensor())
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
    vae, phi = make_models(variant, device, channels_last=False)
    step = step_function(variant, phi, device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    done, started = 0, None
    for i, (x, _y) in enumerate(loader):
        if i == 3:  # warm-up steps are not timed
            started, done = time.perf_counter(), 0
        if i == steps + 3:
            break
        x = x.to(device)
        loss = step(vae, x, None)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()
        done += 1
    return done * batch_size / (time.perf_counter() - started)


def project_rate(
    variant: str,
    train: Split,
    device: torch.device,
    batch_size: int,
    steps: int,
    precision: str,
    channels_last: bool,
    semantic_autocast: bool = False,
) -> float:
    """Images/s of semvae.training.Trainer over ``steps`` steps (after a warm-up run), validation of one batch
    included; no callbacks (no checkpoint or metrics files), as the loop alone is what is timed.
    ``semantic_autocast``: the semantic term in bf16 too (loss.semantic.reduced_precision)."""
    vae, phi = make_models(variant, device, channels_last)
    step = step_function(variant, phi, device, semantic_autocast)
    val = train.subset(torch.arange(batch_size, device=device))

    def settings(batches: int) -> TrainerConfig:
        return TrainerConfig(
            epochs=1,
            batch_size=batch_size,
            log_every=50,
            limit_train_batches=batches,
            limit_eval_batches=1,
            progress=False,
        )

    Trainer(vae, train, val, step, step, settings(3), seed=0, precision=precision).fit()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    Trainer(vae, train, val, step, step, settings(steps), seed=0, precision=precision).fit()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - started)


def evaluation_rate(device: torch.device, n_points: int = 1000, n_directions: int = 8) -> float:
    """GSV starting points x directions per second: decoder plus the train and held-out judges, fp32."""
    vae, phi = make_models("semantic", device, channels_last=True)
    judge = freeze(Classifier((12, 24, 48), 1).to(device)).to(memory_format=torch.channels_last)
    vae.eval()
    z = torch.randn(n_points, 16, device=device)
    directions = ev.evaluation_directions(16, n_directions, seed=0)[-n_directions:].to(device)

    def decode(codes):
        return torch.sigmoid(vae.decode(codes))

    judges = {"train": phi.features, "heldout": judge.features}
    ev.global_semantic_variance(decode, judges, z[:50], directions[:1], [1.0], batch_size=512)  # warm-up
    started = time.perf_counter()
    ev.global_semantic_variance(decode, judges, z, directions, [1.0], batch_size=512)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n_points * n_directions / (time.perf_counter() - started)


def markdown(results: dict) -> str:
    peak32, peak16 = results["peak_gflops"]["fp32"], results["peak_gflops"]["bf16"]
    bf16 = f"{peak16:.0f} GFLOP/s bf16" if peak16 else "no native bf16 (bf16 paths not run)"
    lines = [
        f"Device: {results['device']} ({results['threads']} threads), batch {results['batch_size']}, "
        f"{results['steps']} timed steps per path. Matmul peak: {peak32:.0f} GFLOP/s fp32, {bf16}.",
        "",
        "| variant | path | images/s | × reference | GFLOP/s | share of fp32 peak | share of bf16 peak |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant, paths in results["train"].items():
        flops = results["flops_per_image"][variant]
        reference = paths["reference"]
        for name, rate in paths.items():
            gflops = rate * flops / 1e9
            lines.append(
                f"| {variant} | {name} | {rate:.0f} | {rate / reference:.2f} | {gflops:.1f} | "
                f"{gflops / peak32:.0%} | {f'{gflops / peak16:.0%}' if peak16 else 'n/a'} |"
            )
    lines += [
        "",
        f"Training FLOPs per image: vae {results['flops_per_image']['vae'] / 1e6:.0f} M, semantic "
        f"{results['flops_per_image']['semantic'] / 1e6:.0f} M. Semantic step cost relative to a plain step "
        f"(project path, default settings): {results['semantic_cost_ratio']:.2f}×.",
        f"Evaluation: {results['eval_points_directions_per_s']:.0f} GSV starting points × directions per second "
        "(decoder + two judges, fp32).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", default=os.environ.get("SEMVAE_DATA_DIR", str(ROOT / "data")))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--peak-seconds", type=float, default=2.0, help="time spent measuring each matmul peak")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)  # as training does: fp32 is IEEE fp32 (TF32 off) on a GPU too
    bf16 = native_bf16(device)  # emulated bf16 takes minutes per step: measured only where it is native

    results: dict = {
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "native_bf16": bf16,
        "tf32": torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32,
        "peak_gflops": {
            "fp32": matmul_peak(torch.float32, device, seconds=args.peak_seconds),
            "bf16": matmul_peak(torch.bfloat16, device, seconds=args.peak_seconds) if bf16 else None,
        },
        "flops_per_image": {v: step_flops(v, device, args.batch_size) for v in ("vae", "semantic")},
        "train": {},
    }
    train = load_split("mnist", args.data, train=True, download=False).to(device)
    for variant in ("vae", "semantic"):
        results["train"][variant] = {
            "reference": reference_rate(variant, args.data, device, args.batch_size, args.steps),
            "project fp32": project_rate(variant, train, device, args.batch_size, args.steps, "fp32", True),
        }
        if bf16:
            rate = project_rate(variant, train, device, args.batch_size, args.steps, "bf16", True)
            results["train"][variant]["project bf16"] = rate
            if variant == "semantic":  # loss.semantic.reduced_precision=true
                rate = project_rate(variant, train, device, args.batch_size, args.steps, "bf16", True, True)
                results["train"][variant]["project bf16, semantic term bf16"] = rate
        print(variant, {k: round(v) for k, v in results["train"][variant].items()}, flush=True)
    default = "project fp32"
    results["semantic_cost_ratio"] = results["train"]["vae"][default] / results["train"]["semantic"][default]
    results["eval_points_directions_per_s"] = evaluation_rate(device)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(results, indent=2))
    (out / "throughput.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
