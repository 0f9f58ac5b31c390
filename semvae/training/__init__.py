"""Training: the loop (``trainer.py``) and its side concerns as callbacks (``callbacks.py``)."""

from semvae.training.callbacks import Checkpoints, Images, Metrics, ProgressBar, standard_callbacks
from semvae.training.trainer import Callback, FitResult, NonFiniteLossError, Trainer, mean_terms

__all__ = [
    "Callback",
    "Checkpoints",
    "FitResult",
    "Images",
    "Metrics",
    "NonFiniteLossError",
    "ProgressBar",
    "Trainer",
    "mean_terms",
    "standard_callbacks",
]
