"""fp32 against bfloat16 for the operations the models are made of, on one device, side by side.

    python -m benchmarks.precision [--device cpu] [--repeats 5] [--out benchmarks/results]

Times a 3x3 convolution at 28 px (16 channels) and at 7 px (64 channels), the 7 -> 14 px transposed convolution
(64 -> 32 channels), all on a batch of 256 in channels-last layout, and a 512 x 512 matmul, in fp32 and in bf16.
It says whether the device computes bf16 natively (``semvae.runtime.native_bf16``); where it does not, bf16 is
emulated and the ratio shows what ``trainer.precision=bf16`` would cost. Writes ``precision.json`` and
``precision.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from semvae.runtime import native_bf16

ROOT = Path(__file__).resolve().parents[1]


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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.json").write_text(json.dumps(results, indent=2))
    (out / "precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
