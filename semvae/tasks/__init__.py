"""The tasks ``run.py`` can start (``task=NAME``), one module each; every task is a function
``(cfg, run_dir, group) -> summary`` and returns the metrics a sweeper may optimise.

``checks.check_inputs`` runs before any task and raises ``ConfigError`` for files that a task would need or
overwrite; ``common`` holds what the tasks share (runtime set-up, data, tracking, the final export).
"""

from semvae.config import TaskName
from semvae.tasks.evaluate import evaluate_models
from semvae.tasks.reproduce import reproduce
from semvae.tasks.train_classifier import train_classifier
from semvae.tasks.train_vae import train_vae

TASKS = {
    TaskName.train_vae: train_vae,
    TaskName.train_classifier: train_classifier,
    TaskName.evaluate: evaluate_models,
    TaskName.reproduce: reproduce,
}
