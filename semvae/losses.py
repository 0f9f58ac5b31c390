"""ELBO terms and the semantic variance term of docs/METHOD.md; the evaluation's metrics share these cores.

``loss = recon + beta * KL + lambda * L_sem``. The three variants differ only in (beta, lambda):
standard VAE (1, 0), beta-VAE (5, 0), semantic VAE (1, > 0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from semvae.models import reparameterize


def bernoulli_nll(logits: Tensor, x: Tensor, per_example: bool = False) -> Tensor:
    """Bernoulli negative log-likelihood of ``x`` under ``logits``, summed over pixels; mean over the batch, or
    one value per example (B,) with ``per_example``."""
    nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    return nll if per_example else nll.mean()


def gaussian_kl(mu: Tensor, logvar: Tensor, per_example: bool = False) -> Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) in closed form, summed over latent dims; mean over the batch, or
    one value per example (B,) with ``per_example``."""
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
    return kl if per_example else kl.mean()


def sample_directions(
    n: int, dim: int, kind: str, step: float, generator: torch.Generator, device: torch.device | str
) -> Tensor:
    """``n`` latent shifts d_k = step * u_k, shape (n, dim).

    ``kind="random"``: u_k uniform on the unit sphere. ``kind="axis"``: u_k = +-e_j with j and the sign drawn
    uniformly. ``generator`` lives on the CPU so that a seed gives the same directions on every device.
    """
    if kind == "random":
        u = torch.randn(n, dim, generator=generator)
        u = u / u.norm(dim=1, keepdim=True)
    elif kind == "axis":
        axes = torch.randint(dim, (n,), generator=generator)
        signs = torch.randint(2, (n,), generator=generator) * 2.0 - 1.0
        u = F.one_hot(axes, dim).float() * signs[:, None]
    else:
        raise ValueError(f"loss.semantic.directions={kind!r}: allowed values: random, axis")
    return (step * u).to(device, non_blocking=True)


def semantic_variance_per_direction(delta: Tensor, normalize: bool, eps: float = 1e-8) -> Tensor:
    """The semantic variance of each direction, (K,), for feature changes ``delta`` of shape (K directions,
    M starting points, F features). The one core of the training loss and of the evaluation's GSV.

    Raw: ``mean_f Var_i(delta_ikf)`` with the unbiased variance over the M starting points.
    Normalised: ``sum_f Var_i(delta_ikf) / (sum_f mean_i delta_ikf^2 + eps)``. Here the variance is the
    population (1/M) one, so the ratio equals ``1 - |mean_i delta_ik|^2 / mean_i |delta_ik|^2`` and lies in
    [0, 1]: 0 when direction k changes the features the same way at every starting point, 1 when the changes
    cancel on average. (With the unbiased variance the ratio could reach M/(M-1).)
    """
    if delta.dim() != 3 or delta.shape[1] < 2:
        raise ValueError(f"delta must be (K, M, F) with M >= 2, got {tuple(delta.shape)}")
    if not normalize:
        return delta.var(dim=1, unbiased=True).mean(dim=-1)
    spread = delta.var(dim=1, unbiased=False).sum(dim=-1)  # (K,)
    return spread / (mean_squared_change(delta) + eps)


def mean_squared_change(delta: Tensor) -> Tensor:
    """How much each direction changes the features, ``sum_f mean_i delta_ikf^2``, (K,): the normalised form's
    denominator."""
    return delta.pow(2).mean(dim=1).sum(dim=-1)


def semantic_variance(delta: Tensor, normalize: bool, eps: float = 1e-8) -> Tensor:
    """L_sem of feature changes ``delta`` (K, M, F): ``semantic_variance_per_direction`` averaged over the K
    directions."""
    return semantic_variance_per_direction(delta, normalize, eps).mean()


def semantic_loss(
    decode: Callable[[Tensor], Tensor],
    features: Callable[[Tensor], Tensor],
    z: Tensor,
    directions: Tensor,
    normalize: bool,
    eps: float = 1e-8,
    base_logits: Tensor | None = None,
) -> Tensor:
    """L_sem for starting points ``z`` (M, L) and shared shifts ``directions`` (K, L).

    All K*M shifted codes go through ``decode`` in one call and, together with the M unshifted images, through
    ``features`` (phi) in one call. ``base_logits`` (M, 1, 28, 28), when given, are the decoder's logits at ``z``
    already computed for the reconstruction term; they are reused instead of decoding ``z`` again.
    """
    k, (m, dim) = directions.shape[0], z.shape
    shifted = (z.unsqueeze(0) + directions.unsqueeze(1)).reshape(k * m, dim)
    if base_logits is None:
        logits = decode(torch.cat([z, shifted]))
    else:
        logits = torch.cat([base_logits.to(shifted.dtype), decode(shifted).to(shifted.dtype)])
    phi = features(torch.sigmoid(logits)).float()
    base, moved = phi[:m], phi[m:].reshape(k, m, -1)
    return semantic_variance(moved - base.unsqueeze(0), normalize=normalize, eps=eps)


def vae_objective(
    vae,
    x: Tensor,
    beta: float,
    semantic_weight: float,
    features: Callable[[Tensor], Tensor] | None = None,
    directions: Tensor | None = None,
    n_points: int | None = None,
    normalize: bool = True,
    eps: float = 1e-8,
    noise: Tensor | None = None,
    semantic_autocast: bool = False,
) -> dict[str, Tensor]:
    """The per-batch training loss and its terms: ``loss = recon + beta * kl + semantic_weight * semantic``.

    ``features`` (phi) and ``directions`` (K, L) are needed when ``semantic_weight > 0``; the semantic term uses
    the first ``n_points`` codes of the batch (all when None) and reuses their decoder pass from the
    reconstruction term. ``noise`` replaces the reparameterisation noise (for repeatable validation).
    Under a reduced-precision autocast the semantic term runs in fp32 unless ``semantic_autocast``: then its
    decodes and phi run in the autocast dtype too, and only phi's differences and their reductions are fp32
    (``loss.semantic.reduced_precision``).
    """
    mu, logvar = (t.float() for t in vae.encode(x))  # reductions in fp32 also under reduced-precision autocast
    z = reparameterize(mu, logvar, noise)
    logits = vae.decode(z).float()
    recon, kl = bernoulli_nll(logits, x), gaussian_kl(mu, logvar)
    terms = {"recon": recon, "kl": kl}
    loss = recon + beta * kl
    if features is not None and directions is not None:
        m = z.shape[0] if n_points is None else min(n_points, z.shape[0])
        # under autocast, in fp32 unless semantic_autocast (the unshifted codes are then decoded again in fp32
        # rather than reused); with it, in the autocast dtype, phi's differences taken in fp32 (semantic_loss)
        in_fp32 = torch.is_autocast_enabled(z.device.type) and not semantic_autocast
        with torch.autocast(z.device.type, enabled=False) if in_fp32 else contextlib.nullcontext():
            semantic = semantic_loss(
                vae.decode, features, z[:m], directions, normalize, eps, base_logits=None if in_fp32 else logits[:m]
            )
        terms["semantic"] = semantic
        loss = loss + semantic_weight * semantic
    terms["loss"] = loss
    return terms


@dataclass
class VAELoss:
    """The training loss of one VAE run (``loss.*``) as a callable ``(model, x, generator) -> terms``.

    It draws the step's K directions from ``generator`` (``directions``) and calls ``vae_objective``. A stack of
    runs (``semvae/training/stacking.py``) uses the same pieces: each run draws its own directions and noise, and
    runs whose ``fusion_key`` matches share one vectorised call of ``vae_objective``.
    """

    beta: float
    semantic_weight: float
    features: Callable[[Tensor], Tensor] | None  # phi; None when semantic_weight == 0
    latent_dim: int
    directions_kind: str = "random"
    step: float = 1.0
    n_directions: int = 4
    n_points: int | None = 32
    normalize: bool = True
    eps: float = 1e-8
    reduced_precision: bool = False

    def directions(self, generator: torch.Generator, device: torch.device | str) -> Tensor | None:
        """The step's K shifts (K, L) from ``generator``; None without the semantic term."""
        if self.features is None:
            return None
        return sample_directions(self.n_directions, self.latent_dim, self.directions_kind, self.step, generator, device)

    def terms(
        self,
        model,
        x: Tensor,
        directions: Tensor | None,
        noise: Tensor | None = None,
        beta: float | Tensor | None = None,
        semantic_weight: float | Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``vae_objective`` with this run's settings; ``beta`` and ``semantic_weight`` may be given as tensors
        (one value per member of a stack)."""
        return vae_objective(
            model,
            x,
            self.beta if beta is None else beta,
            self.semantic_weight if semantic_weight is None else semantic_weight,
            self.features,
            directions,
            self.n_points,
            self.normalize,
            self.eps,
            noise=noise,
            semantic_autocast=self.reduced_precision,
        )

    def __call__(self, model, x: Tensor, generator: torch.Generator, noise: Tensor | None = None) -> dict[str, Tensor]:
        return self.terms(model, x, self.directions(generator, x.device), noise)

    def fusion_key(self) -> tuple:
        """What must be equal for runs to share one vectorised call: the shapes and the branches taken. beta,
        lambda and the directions (kind, step) may differ between them."""
        if self.features is None:
            return ("elbo",)
        return ("semantic", self.n_directions, self.n_points, self.normalize, self.eps, self.reduced_precision)


@dataclass
class TrainingStep:
    """A Trainer's ``step_fn`` for a VAE: ``loss`` with the step's directions drawn from ``generator`` and the
    reparameterisation noise from ``noise``, two CPU generators of the run's own (a seed gives the same draws on
    every device, and a stack of runs draws each member's exactly as it would alone)."""

    loss: VAELoss
    generator: torch.Generator
    noise: torch.Generator

    def draws(self, batch: int, device: torch.device | str) -> tuple[Tensor | None, Tensor]:
        """The step's directions (K, L) (None without the semantic term) and noise (``batch``, L), on ``device``."""
        directions = self.loss.directions(self.generator, device)
        noise = torch.randn(batch, self.loss.latent_dim, generator=self.noise).to(device, non_blocking=True)
        return directions, noise

    def __call__(self, model, x: Tensor, _y: Tensor) -> dict[str, Tensor]:
        directions, noise = self.draws(x.shape[0], x.device)
        return self.loss.terms(model, x, directions, noise)
