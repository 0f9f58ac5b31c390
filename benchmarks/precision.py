"""fp32 against bfloat16 for the operations the models are made of, on one device, side by side.

    python -m benchmarks.precision [--device cpu] [--repeats 5] [--out benchmarks/results]

Times a 3x3 convolution at 28 px (16 channels) and at 7 px (64 channels), the 7 -> 14 px transposed convolution
(64 -> 32 channels), all on a batch of 256 in channels-last layout, and a 512 x 512 matmul, in fp32 and in bf16.
It says whether the device computes bf16 natively (``semvae.runtime.native_bf16``); where it does not, bf16 is
emulated and the ratio shows what ``trainer.precision=bf16`` would cost.

It also measures how far the semantic term in bf16 (``loss.semantic.reduced_precision``) lies from the fp32 term, on
the shipped ``semanticVAE_epoch50.pth`` and its classifier: ``--semantic-batches`` test batches of
``--semantic-points`` starting points, K = 4 random directions of length 1 (training's settings), both the normalised
and the raw form; the largest absolute and relative difference of the term and the smallest cosine between the two
gradients. Writes ``precision.json`` and ``precision.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch import nn

from semvae.checkpoints import write_json_atomic, write_text_atomic
from semvae.runtime import native_bf16

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights"  # the shipped semantic VAE and its classifier


def operations(batch: int) -> dict[str, tuple[nn.Module | None, tuple[int, ...]]]:
    return {
        "conv3x3 16ch @28px": (nn.Conv2d(16, 16, 3, padding=1), (batch, 16, 28, 28)),
        "conv3x3 64ch @7px": (nn.Conv2d(64, 64, 3, padding=1), (batch, 64, 7, 7)),
        "convT 64->32 7->14px": (nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), (batch, 64, 7, 7)),
        "matmul 512x512": (None, (512, 512)),
    }


@torch.no_grad()
def milliseconds(module: nn.Module | None, shape: tuple[int, ...], dtype: torch.dtype, device, repeats: int) -> float:
    """Best time of ``repeats`` calls, after one warm-up call."""
    x = torch.randn(shape, device=device, dtype=dtype)
    if module is None:
        call = lambda: x @ x  # noqa: E731
    else:
        module = module.to(device=device, dtype=dtype, memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        call = lambda: module(x)  # noqa: E731
    call()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def semantic_term_deviation(
    vae, phi, images: torch.Tensor, batches: int, points: int, n_directions: int = 4, seed: int = 0
) -> dict[str, dict[str, float]]:
    """The semantic term (and its gradient) computed in bf16 under autocast against fp32, on ``batches`` batches of
    ``points`` images: per form ("normalised", "raw"), the largest |bf16 - fp32|, the largest relative difference
    and the smallest gradient cosine."""
    from torch.nn import functional as F

    from semvae.losses import sample_directions, vae_objective

    g = torch.Generator().manual_seed(seed)
    vae.train()
    latent_dim = vae.latent_dim
    found = {}
    for form, normalize in (("normalised", True), ("raw", False)):
        worst = {"abs": 0.0, "rel": 0.0, "grad_cos": 1.0}
        for b in range(batches):
            x = images[b * points : (b + 1) * points]
            d = sample_directions(n_directions, latent_dim, "random", 1.0, g, images.device)
            noise = torch.randn(len(x), latent_dim, generator=g).to(images.device)
            values, grads = [], []
            for reduced in (False, True):
                with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=reduced):
                    out = vae_objective(
                        vae, x, 1.0, 1.0, phi.features, d, None, normalize, noise=noise, semantic_autocast=reduced
                    )
                vae.zero_grad()
                out["semantic"].backward()
                values.append(out["semantic"].item())
                grads.append(torch.cat([p.grad.flatten() for p in vae.parameters() if p.grad is not None]))
            difference = abs(values[1] - values[0])
            worst["abs"] = max(worst["abs"], difference)
            worst["rel"] = max(worst["rel"], difference / abs(values[0]))
            worst["grad_cos"] = min(worst["grad_cos"], F.cosine_similarity(grads[0], grads[1], dim=0).item())
        found[form] = worst
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--semantic-batches", type=int, default=4, help="test batches for the semantic term (0: skip)")
    parser.add_argument("--semantic-points", type=int, default=32, help="starting points per batch")
    parser.add_argument("--data", default=os.environ.get("SEMVAE_DATA_DIR", str(ROOT / "data")))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = {"device": str(device), "threads": torch.get_num_threads(), "native_bf16": native_bf16(device), "ms": {}}
    for name, (module, shape) in operations(args.batch).items():
        fp32 = milliseconds(module, shape, torch.float32, device, args.repeats)
        bf16 = milliseconds(module, shape, torch.bfloat16, device, args.repeats)
        results["ms"][name] = {"fp32": fp32, "bf16": bf16}
    lines = [
        f"Device: {results['device']} ({results['threads']} threads), native bf16: {results['native_bf16']}.",
        "",
        "| operation | fp32 ms | bf16 ms | bf16 / fp32 |",
        "| --- | --- | --- | --- |",
    ]
    for name, t in results["ms"].items():
        lines.append(f"| {name} | {t['fp32']:.2f} | {t['bf16']:.2f} | {t['bf16'] / t['fp32']:.1f} |")
    if args.semantic_batches > 0:
        from semvae import checkpoints
        from semvae.data import load_split

        vae, _ = checkpoints.load_vae(WEIGHTS / "semanticVAE_epoch50.pth", device)
        phi, _ = checkpoints.load_classifier(WEIGHTS / "classifier.pth", device)
        images = load_split("mnist", args.data, train=False, download=False).images.to(device)
        found = semantic_term_deviation(vae, phi, images, args.semantic_batches, args.semantic_points)
        results["semantic_term_bf16"] = found | {"batches": args.semantic_batches, "points": args.semantic_points}
        lines += [
            "",
            f"Semantic term in bf16 against fp32 (shipped semanticVAE, {args.semantic_batches} test batches of "
            f"{args.semantic_points} points, K = 4):",
            "",
            "| form | largest abs. difference | largest rel. difference | smallest gradient cosine |",
            "| --- | --- | --- | --- |",
        ]
        for form in ("normalised", "raw"):
            w = found[form]
            lines.append(f"| {form} | {w['abs']:.2e} | {w['rel']:.2e} | {w['grad_cos']:.4f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results, out / "precision.json")
    write_text_atomic("\n".join(lines) + "\n", out / "precision.md")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
