"""Where and how the computation runs: device, CPU threads, numeric precision, random seeds.

Every task calls ``setup`` first; nothing else in the package touches torch's global settings.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import torch

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """The torch device for ``runtime.device``. Also turns TF32 off: on Ampere and later GPUs cuDNN would otherwise
    round float32 convolutions to 10-bit mantissas, so ``precision=fp32`` means IEEE float32 on every device
    (bf16 is the explicit ``runtime.precision=bf16``)."""
    from semvae.config import ConfigError

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device={name!r}: no CUDA device is available here; use auto or cpu")
    return device


def set_threads(num_threads: int | None) -> None:
    """torch's intra-op threads: ``num_threads``, else the cores SLURM gave this job, else torch's default."""
    if num_threads is None and os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        num_threads = int(os.environ["SLURM_CPUS_PER_TASK"])  # the job's cores, not the node's
    if num_threads is not None:
        torch.set_num_threads(num_threads)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware. A CPU without AVX-512 BF16 or AMX (AVX2 only, say) runs
    bf16 convolutions and matmuls emulated, ten to hundreds of times slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: torch.device, precision: str):
    """bfloat16 autocast on ``device`` for ``precision="bf16"``; a no-op context for "fp32"."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"runtime.precision={precision!r}: allowed values: fp32, bf16")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def setup(device: str, num_threads: int | None, precision: str = "fp32", seed: int | None = None) -> torch.device:
    """Threads, device (TF32 off), a warning where bf16 would be emulated, and the global seeds."""
    set_threads(num_threads)
    resolved = resolve_device(device)
    if precision == "bf16" and not native_bf16(resolved):
        log.warning(
            "runtime.precision=bf16: %s has no native bfloat16, so bf16 runs emulated and far slower than fp32; "
            "use runtime.precision=fp32 here",
            resolved,
        )
    if seed is not None:
        seed_everything(seed)
    return resolved


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every random generator a run draws from (Python's, torch's, CUDA's and ``generators``), for a checkpoint."""
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    for key, g in generators.items():
        # a generator the checkpoint predates (the reparameterisation noise, once drawn from torch's global
        # generator) continues the global stream it replaced
        g.set_state(state["generators"].get(key, state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
