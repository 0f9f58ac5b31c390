"""task=train_vae: train one VAE of any variant (the loss settings choose it) and export it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from semvae import checkpoints
from semvae.config import Config, as_plain
from semvae.evaluation.metrics import squared_errors
from semvae.losses import TrainingStep, VAELoss
from semvae.models import ResNetVAE
from semvae.stopping import StopRequested
from semvae.tasks.common import finish_training, load_classifier, setup, tracked_training, training_data
from semvae.tasks.evaluate import evaluate_trained
from semvae.tracking import Tracker
from semvae.variants import variant_of


def train_vae(cfg: Config, run_dir: str | Path, group: str | None = None) -> dict[str, Any]:
    """Train one VAE and return its summary; with ``task.evaluate`` it is evaluated on the test split too."""
    run_dir = Path(run_dir)
    device = setup(cfg)
    train, val = training_data(cfg, device)
    m, loss, sem = cfg.model, cfg.loss, cfg.loss.semantic
    vae = ResNetVAE(m.latent_dim, m.widths, m.blocks).to(device)
    phi = load_classifier(cfg, device) if loss.semantic_weight > 0 else None
    if cfg.runtime.channels_last:
        for net in (vae, phi):
            if net is not None:
                net.to(memory_format=torch.channels_last)
    variant = variant_of(loss.beta, loss.semantic_weight)

    direction_gen = torch.Generator().manual_seed(cfg.seed + 1)
    objective = VAELoss(
        loss.beta,
        loss.semantic_weight,
        phi.features if phi is not None else None,
        m.latent_dim,
        sem.directions.value,
        sem.step,
        sem.n_directions,
        sem.n_points,
        sem.normalize,
        sem.eps,
        sem.reduced_precision,
    )

    # the reparameterisation noise: a generator of the run's own, continuing torch's global stream as seeded and
    # left by the set-up above (so that a stack of runs draws each member's noise as it would alone)
    noise_gen = torch.Generator()
    noise_gen.set_state(torch.get_rng_state())
    step_fn = TrainingStep(objective, direction_gen, noise_gen)

    # validation sees the same noise and directions every epoch, so its numbers are comparable across epochs
    val_seed = cfg.seed + 2

    def eval_fn(model: ResNetVAE, x: Tensor, _y: Tensor) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(val_seed)
        noise = torch.randn(x.shape[0], m.latent_dim, generator=g).to(device)
        terms = objective(model, x, g, noise=noise)
        mu, _ = model.encode(x)
        terms["neg_elbo"] = terms["recon"] + terms["kl"]
        terms["mse"] = squared_errors(torch.sigmoid(model.decode(mu)), x).mean()
        return terms

    n_img = cfg.trainer.n_image_samples
    prior = torch.randn(n_img, m.latent_dim, generator=torch.Generator().manual_seed(val_seed)).to(device)
    shown = val.images[: max(n_img // 2, 1)]

    def image_fn(model: ResNetVAE) -> dict[str, Tensor]:
        recon = torch.sigmoid(model.decode(model.encode(shown)[0]))
        pairs = torch.stack([shown, recon], dim=1).flatten(0, 1)  # original, reconstruction, original, ...
        return {"images/reconstructions": pairs, "images/prior_samples": torch.sigmoid(model.decode(prior))}

    architecture = {"latent_dim": m.latent_dim, "widths": list(m.widths), "blocks": m.blocks}
    extra = {"variant": variant, "n_train": len(train), "n_val": len(val)}
    model_file = {
        "kind": "vae",
        "architecture": architecture,
        "config": as_plain(cfg),
        **extra,
        **checkpoints.provenance(cfg.paths.root_dir),
    }

    def run(tracker: Tracker, fit) -> dict[str, Any]:
        generators = {"directions": direction_gen, "noise": noise_gen}
        result = fit(vae, train, val, step_fn, eval_fn, image_fn=image_fn, generators=generators)
        if cfg.task.evaluate:
            try:
                extra.update(evaluate_trained(cfg, vae, device, run_dir, tracker))
            except StopRequested as stopped:
                raise StopRequested(
                    stopped.signum,
                    f"training is complete (step {result.steps}, {result.last_checkpoint}) and its evaluation was "
                    "stopped; it runs again on resume",
                    result.last_checkpoint,
                    result.steps,
                ) from None
        return finish_training(cfg, tracker, result, {"model": vae.state_dict(), **model_file}, extra)

    return tracked_training(cfg, run_dir, group, variant, extra, {"architecture": architecture}, run)
