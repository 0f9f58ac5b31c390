"""What a loss setting (beta, lambda) is called: its variant and its run name. Plain Python, so that the config
resolver and ``analysis/`` name runs without importing torch."""

from __future__ import annotations


def variant_of(beta: float, semantic_weight: float) -> str:
    """The variant a loss setting amounts to: vae (1, 0), beta (b != 1, 0), semantic (1, > 0), beta-semantic."""
    if semantic_weight > 0:
        return "semantic" if beta == 1 else "beta-semantic"
    return "vae" if beta == 1 else "beta"


SEMANTIC_PRESET_WEIGHT = 10.0  # loss.semantic_weight of conf/variant/semantic.yaml (a test holds them equal)


def run_name(beta: float, semantic_weight: float, normalize: bool = True) -> str:
    """The default name of a run with this loss setting (``name`` in conf/config.yaml), so that every job of an
    ad-hoc sweep is named after what it trains: ``VAE``, ``b5-VAE``, ``semanticVAE`` (the semantic preset's
    weight), ``semanticVAE-l100``, ``b5-semanticVAE-l1``, and ``semanticVAE-l400-raw`` for the raw (unnormalised)
    semantic term (``loss.semantic.normalize=false``; it plays no part at lambda = 0)."""
    prefix = "" if beta == 1 else f"b{beta:g}-"
    if semantic_weight <= 0:
        return f"{prefix}VAE"
    suffix = "" if semantic_weight == SEMANTIC_PRESET_WEIGHT else f"-l{semantic_weight:g}"
    return f"{prefix}semanticVAE{suffix}{'' if normalize else '-raw'}"
