"""The evaluation's metrics (docs/METHOD.md) as pure functions of (model, data): reconstruction, Global Semantic
Variance, latent norms, active units, disentanglement against morphometrics, interpolations and traversals.

Every function takes tensors and plain values and works in batches (no Python loop over samples or directions).
Randomness comes from explicit seeds, so every model is evaluated on the same images, pairs and directions.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from semvae import stopping
from semvae.losses import bernoulli_nll, gaussian_kl, mean_squared_change, semantic_variance_per_direction
from semvae.models import ResNetVAE, reparameterize

log = logging.getLogger(__name__)

Judge = Callable[[Tensor], Tensor]  # images (B, 1, 28, 28) in [0, 1] -> features (B, F)


def batches(n: int, batch_size: int):
    """Slices of at most ``batch_size`` covering range(n): the chunks every metric computes in."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.no_grad()
def latent_means(vae: ResNetVAE, images: Tensor, batch_size: int = 1000) -> Tensor:
    """Posterior means mu(x), (N, L)."""
    return torch.cat([vae.encode(images[s])[0] for s in batches(len(images), batch_size)])


@torch.no_grad()
def decode_images(vae: ResNetVAE, z: Tensor, batch_size: int = 1000) -> Tensor:
    """sigmoid(G(z)), (N, 1, 28, 28)."""
    return torch.cat([torch.sigmoid(vae.decode(z[s])) for s in batches(len(z), batch_size)])


def squared_errors(recon: Tensor, images: Tensor) -> Tensor:
    """Per-image mean squared error between reconstructions and images, (N,): the MSE of every table."""
    return (recon - images).pow(2).flatten(1).mean(1)


@torch.no_grad()
def negative_elbo(vae: ResNetVAE, images: Tensor, seed: int = 0, batch_size: int = 1000) -> Tensor:
    """Per-image negative ELBO (nats) with one posterior sample drawn from a seeded generator, (N,)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in batches(len(images), batch_size):
        x = images[s]
        mu, logvar = vae.encode(x)
        z = reparameterize(mu, logvar, torch.randn(mu.shape, generator=g).to(mu.device))
        out.append(bernoulli_nll(vae.decode(z), x, per_example=True) + gaussian_kl(mu, logvar, per_example=True))
    return torch.cat(out)


def mean_and_se(values: Tensor) -> tuple[float, float]:
    """Mean and its standard error (std / sqrt(n)) of the finite values of a tensor; NaN for none."""
    values = values.double().flatten()
    values = values[values.isfinite()]
    if len(values) == 0:
        return float("nan"), float("nan")
    se = values.std(unbiased=True).item() / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return values.mean().item(), se


@torch.no_grad()
def reading_spread(judge: Judge, images: Tensor, batch_size: int = 1000) -> float:
    """How much a judge's reading varies over real images: sum_f Var_i judge(x_i) (population variance). The scale
    against which a latent shift's change of the reading counts as none (``global_semantic_variance``'s floor)."""
    features = torch.cat([judge(images[s]) for s in batches(len(images), batch_size)]).double()
    return features.var(dim=0, unbiased=False).sum().item()


@torch.no_grad()
def recognition(
    classifier: Callable[[Tensor], Tensor], images: Tensor, labels: Tensor, batch_size: int = 1000, n_classes: int = 10
) -> tuple[float, int, float]:
    """How a classifier reads ``images`` (reconstructions): the fraction assigned to ``labels``, the class assigned
    most often and the fraction assigned to it (about 0.11 for real MNIST digits; near 1 for a decoder that writes
    one pattern the classifier reads as one class). Returns (accuracy, top class, top-class share)."""
    predicted = torch.cat([classifier(images[s]).argmax(1) for s in batches(len(images), batch_size)])
    counts = torch.bincount(predicted, minlength=n_classes)
    accuracy = (predicted == labels).double().mean().item()
    return accuracy, int(counts.argmax()), counts.max().item() / len(predicted)


def evaluation_directions(latent_dim: int, n_random: int = 64, seed: int = 0) -> Tensor:
    """Unit directions of the GSV: every latent axis +-e_j, then ``n_random`` uniform on the sphere, (2L + n, L)."""
    eye = torch.eye(latent_dim)
    u = torch.randn(n_random, latent_dim, generator=torch.Generator().manual_seed(seed))
    return torch.cat([eye, -eye, u / u.norm(dim=1, keepdim=True)])


def resampling_weights(n: int, resamples: int, seed: int = 0) -> Tensor:
    """Bootstrap weights over ``n`` starting points, (resamples, n) float64: row b holds how often each point was
    drawn in n draws with replacement, divided by n (rows sum to 1). From ``seed``, so every model is resampled
    alike."""
    drawn = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    counts = torch.zeros(resamples, n, dtype=torch.float64)
    counts.scatter_add_(1, drawn, torch.ones_like(drawn, dtype=torch.float64))
    return counts / n


def resampled_forms(delta: Tensor, weights: Tensor, eps: float = 1e-8) -> dict[str, Tensor]:
    """The GSV's three forms of each direction (raw, norm, change; see ``global_semantic_variance``) recomputed on
    every bootstrap resample of the starting points: ``delta`` (K, N, F), ``weights`` (B, N) from
    ``resampling_weights``; returns {form: (B, K)}. With weights 1/N in a row this is the full-sample value."""
    d = delta.double()
    n = d.shape[1]
    mean = torch.einsum("bn,knf->bkf", weights, d)
    mean_square = torch.einsum("bn,knf->bkf", weights, d * d)
    variance = (mean_square - mean * mean).clamp_min(0)  # population variance over the resampled points, per feature
    change = mean_square.sum(-1)
    return {"raw": variance.mean(-1) * n / (n - 1), "norm": variance.sum(-1) / (change + eps), "change": change}


def resampled_se(values: Tensor, resampled: Tensor) -> float:
    """Standard error of a GSV (the mean of ``values`` (S, D) over its finite cells) from the same mean on every
    bootstrap resample of the starting points (``resampled``: (B, S, D)); cells left out of the value (NaN under
    the change floor) are left out of every resample too. NaN without resamples."""
    keep = values.isfinite()
    if len(resampled) < 2 or not keep.any():
        return float("nan")
    return resampled[:, keep].mean(dim=1).std(unbiased=True).item()


def shuffled_assignment(n_points: int, n_directions: int, seed: int = 0) -> Tensor:
    """The direction each starting point takes in each cell of the shuffled-direction reference, (N, D) long: row i
    is an independent random permutation of the D directions, so in reference cell c point i is shifted along
    direction ``assignment[i, c]``, drawn independently of every other point's. From ``seed``: the same for every
    model."""
    keys = torch.rand(n_points, n_directions, generator=torch.Generator().manual_seed(seed))
    return keys.argsort(dim=1)


def shuffled_cells(delta: Tensor, assignment: Tensor) -> Tensor:
    """The changes of one step's D directions, ``delta`` (D, N, F), regrouped into the D cells of the
    shuffled-direction reference: cell c holds, for each point i, its change under direction ``assignment[i, c]``
    (``shuffled_assignment``), (D, N, F). No new decoding: the reference uses the same changes as the GSV, only
    which point goes with which direction is drawn at random, so its mean squared change over the step is the
    GSV's."""
    points = torch.arange(delta.shape[1], device=delta.device)
    return delta[assignment.T.to(delta.device), points]


def direction_resampling_weights(n_fixed: int, n_random: int, resamples: int, seed: int = 0) -> Tensor:
    """Bootstrap weights over the D = ``n_fixed`` + ``n_random`` directions of a GSV table, (resamples, D) float64,
    rows summing to 1: the fixed directions (the latent axes, the same in every evaluation) count once in every
    resample, the random ones as often as they are drawn in ``n_random`` draws with replacement. With
    ``resampling_weights`` over the points this is the two-way bootstrap of ``two_way_replicates``."""
    counts = torch.ones(resamples, n_fixed + n_random, dtype=torch.float64)
    if n_random > 0:
        counts[:, n_fixed:] = resampling_weights(n_random, resamples, seed) * n_random
    return counts / counts.sum(dim=1, keepdim=True)


def two_way_replicates(values: Tensor, resampled: Tensor, direction_weights: Tensor) -> Tensor:
    """A GSV (the mean of ``values`` (S, D) over its finite cells) on every two-way bootstrap resample, (B,):
    ``resampled`` (B, S, D) holds the cells recomputed on the B resamples of the starting points, and resample b
    weighs direction d by ``direction_weights[b, d]`` (``direction_resampling_weights``), so each replicate redraws
    points and random directions together. Cells left out of the value (NaN under the change floor) stay out."""
    keep = values.isfinite().to(resampled.device)
    weights = direction_weights.to(resampled)[:, None, :] * keep
    total = weights.sum(dim=(1, 2))
    return (weights * resampled.nan_to_num(0.0)).sum(dim=(1, 2)) / total


def replicate_se(replicates: Tensor) -> float:
    """The standard error a set of bootstrap replicates gives: their standard deviation (NaN for fewer than two).
    The replicates of a paired difference of two models are the differences of their replicates, since every model
    is resampled on the same points and directions."""
    finite = replicates[replicates.isfinite()]
    return finite.std(unbiased=True).item() if len(finite) >= 2 else float("nan")


class ShuffledReference:
    """The shuffled-direction reference of ``global_semantic_variance``, built as the changes arrive: a judge's
    changes are held until one step's D directions are complete, then regrouped by ``shuffled_cells`` and reduced
    like the GSV's own cells (normalised form; on the bootstrap resamples too when given; under the change floor
    when given). Holds at most one step's changes per judge."""

    def __init__(self, judges, assignment: Tensor, eps: float = 1e-8):
        self.assignment, self.eps = assignment, eps
        self.pending: dict[str, list[Tensor]] = {name: [] for name in judges}
        self.norm: dict[str, list[Tensor]] = {name: [] for name in judges}
        self.resampled: dict[str, list[Tensor]] = {name: [] for name in judges}

    def add(self, name: str, delta: Tensor, weights: Tensor | None, floor: float | None) -> None:
        """The changes ``delta`` (k, N, F) of the next k (step, direction) cells of judge ``name``."""
        self.pending[name].append(delta)
        n_directions = self.assignment.shape[1]
        if sum(len(d) for d in self.pending[name]) < n_directions:
            return
        held = torch.cat(self.pending[name])
        while len(held) >= n_directions:
            cells = shuffled_cells(held[:n_directions], self.assignment)
            held = held[n_directions:]
            ratio = semantic_variance_per_direction(cells, normalize=True, eps=self.eps)
            if floor is not None:
                ratio = torch.where(mean_squared_change(cells) < floor, torch.full_like(ratio, float("nan")), ratio)
            self.norm[name].append(ratio)
            if weights is not None:
                self.resampled[name].append(resampled_forms(cells, weights, self.eps)["norm"])
        self.pending[name] = [held] if len(held) else []

    def forms(self) -> dict[str, dict[str, Tensor]]:
        """{"shuffled_norm": {judge: (S*D,) chunks}, "resampled_shuffled_norm": {judge: (B, S*D) chunks}}."""
        out = {"shuffled_norm": self.norm}
        if any(self.resampled.values()):
            out["resampled_shuffled_norm"] = self.resampled
        return out


@torch.no_grad()
def global_semantic_variance(
    decode: Callable[[Tensor], Tensor],
    judges: dict[str, Judge],
    z: Tensor,
    directions: Tensor,
    steps: list[float],
    batch_size: int = 2000,
    eps: float = 1e-8,
    progress: str | None = None,
    floor: dict[str, float] | None = None,
    resamples: int = 0,
    seed: int = 0,
    reference: bool = False,
) -> dict[str, dict[str, Tensor]]:
    """GSV of docs/METHOD.md for starting codes ``z`` (N, L), unit ``directions`` (D, L) and step sizes ``steps``.

    ``decode`` maps codes to images in [0, 1]; each judge maps images to features. For every (step, direction)
    pair the change Delta_i = judge(decode(z_i + step * d)) - judge(decode(z_i)) is reduced over the N starting
    points by the training loss's core, ``semantic_variance_per_direction``: the raw value mean_f Var_i (unbiased)
    and the normalised value sum_f Var_i / (sum_f mean_i Delta^2 + eps) (population variance, in [0, 1]); and
    "change", the normalised form's denominator sum_f mean_i Delta^2 (how much the judge's reading moves).
    Shifted codes are decoded and judged in chunks of ``batch_size`` images, all judges on the same images.
    ``floor`` (per judge): a (step, direction) whose change is below it does not move the reading, so its
    consistency is undefined: its normalised value is NaN (left out of means, counted as inactive) instead of the
    0 that eps would give it, the best score, earned by doing nothing. ``progress`` labels a progress bar.
    ``resamples`` > 0: the three forms are also computed on that many bootstrap resamples of the N starting points
    (``resampling_weights`` from ``seed``), for the standard error a different draw of starting points would give
    (``resampled_se``).
    ``reference``: also the normalised form of the shuffled-direction reference (``shuffled_cells``, each point
    given a direction drawn independently of the others', ``shuffled_assignment`` from ``seed`` + 1) in the same
    cells, from the same changes: ``"shuffled_norm"`` (S, D), and ``"resampled_shuffled_norm"`` with resamples.
    Returns ``{judge: {"raw": (S, D), "norm": (S, D), "change": (S, D)}}``, with ``"resampled_raw"`` (B, S, D),
    ``"resampled_norm"`` and ``"resampled_change"`` when ``resamples`` > 0.
    """
    n, latent_dim = z.shape
    base_images = torch.cat([decode(z[s]) for s in batches(n, batch_size)])
    base = {name: torch.cat([judge(base_images[s]) for s in batches(n, batch_size)]) for name, judge in judges.items()}
    shifts = torch.cat([step * directions for step in steps])  # (S*D, L)
    per_chunk = max(1, batch_size // n)  # shifts whose N images go through the decoder together
    raw = {name: [] for name in judges}
    norm = {name: [] for name in judges}
    change = {name: [] for name in judges}
    weights = resampling_weights(n, resamples, seed).to(z.device) if resamples > 0 else None
    resampled = {form: {name: [] for name in judges} for form in ("raw", "norm", "change")}
    shuffled = ShuffledReference(judges, assignment=shuffled_assignment(n, len(directions), seed + 1), eps=eps)
    bar = ShiftProgress(len(shifts), progress)
    for s in batches(len(shifts), per_chunk):
        stopping.check("evaluation stopped")  # between chunks: a stop signal is honoured within seconds
        k = s.stop - s.start
        codes = (z.unsqueeze(0) + shifts[s].unsqueeze(1)).reshape(k * n, latent_dim)
        images = torch.cat([decode(codes[c]) for c in batches(len(codes), batch_size)])
        for name, judge in judges.items():
            feats = torch.cat([judge(images[c]) for c in batches(len(images), batch_size)])
            delta = feats.reshape(k, n, -1) - base[name].unsqueeze(0)  # (k, N, F)
            raw[name].append(semantic_variance_per_direction(delta, normalize=False))
            moved = mean_squared_change(delta)
            ratio = semantic_variance_per_direction(delta, normalize=True, eps=eps)
            if floor is not None and name in floor:
                ratio = torch.where(moved < floor[name], torch.full_like(ratio, float("nan")), ratio)
            norm[name].append(ratio)
            change[name].append(moved)
            if weights is not None:
                for form, values in resampled_forms(delta, weights, eps).items():
                    resampled[form][name].append(values)
            if reference:
                shuffled.add(name, delta, weights, None if floor is None else floor.get(name))
        bar.update(k)
    bar.close()
    n_steps = len(steps)
    forms = {"raw": raw, "norm": norm, "change": change}
    if weights is not None:
        forms |= {f"resampled_{form}": values for form, values in resampled.items()}
    if reference:
        forms |= shuffled.forms()

    def shaped(chunks: list[Tensor]) -> Tensor:  # (S*D,) or (B, S*D) in chunks -> (S, D) or (B, S, D)
        values = torch.cat(chunks, dim=-1)
        return values.reshape(*values.shape[:-1], n_steps, -1)

    return {name: {form: shaped(v[name]) for form, v in forms.items()} for name in judges}


class ShiftProgress:
    """Progress over the shifts of a GSV: a tqdm bar on a terminal; where stderr is redirected to a log (a sweep job,
    a batch system), a log line at each quarter with the time taken and the time left, instead of a bar that a log
    shows only at its start."""

    def __init__(self, total: int, label: str | None) -> None:
        self.total, self.label, self.done, self.quarter = total, label, 0, 1
        self.started = time.perf_counter()
        self.bar = None
        if label is not None and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=label, unit="shift", leave=False)

    def update(self, k: int) -> None:
        self.done += k
        if self.bar is not None:
            self.bar.update(k)
            return
        if self.label is None:
            return
        while self.quarter <= 4 and self.done * 4 >= self.quarter * self.total:
            taken = time.perf_counter() - self.started
            left = taken / self.done * (self.total - self.done)
            log.info("%s: %d/%d shifts in %.0fs, %.0fs left", self.label, self.done, self.total, taken, left)
            self.quarter += 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def active_units(mu: Tensor, threshold: float = 0.01) -> int:
    """Number of latent dims whose posterior mean varies over the data: Var_x E[z_j | x] > threshold."""
    return int((mu.var(dim=0, unbiased=True) > threshold).sum().item())


def _discretize(values: Tensor, bins: int) -> Tensor:
    """Equal-width histogram bins per column, (N, C) -> integer codes in [0, bins)."""
    lo, hi = values.min(dim=0).values, values.max(dim=0).values
    scaled = (values - lo) / (hi - lo).clamp_min(1e-12)
    return (scaled * bins).long().clamp_(0, bins - 1)


def entropy(p: Tensor) -> Tensor:
    """Entropy in nats of the distributions in the last dim of ``p`` (rows summing to 1; 0 log 0 = 0)."""
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)


def _mutual_information(a: Tensor, b: Tensor, bins: int) -> Tensor:
    """I(a_j; b_k) in nats for discrete codes a (N, J), b (N, K) -> (J, K), from joint histograms."""
    n = a.shape[0]
    onehot_a = F.one_hot(a, bins).double()  # (N, J, bins)
    onehot_b = F.one_hot(b, bins).double()  # (N, K, bins)
    joint = torch.einsum("nja,nkb->jkab", onehot_a, onehot_b) / n  # (J, K, bins, bins)
    pa, pb = joint.sum(3, keepdim=True), joint.sum(2, keepdim=True)
    ratio = torch.where(joint > 0, joint / (pa * pb).clamp_min(1e-300), torch.ones_like(joint))
    return (joint * ratio.log()).sum(dim=(2, 3))


def mig(codes: Tensor, factors: Tensor, bins: int = 20) -> float:
    """Mutual Information Gap (Chen et al., 2018) with histogram discretisation of codes and factors.

    For each factor k: (I(z_(1); v_k) - I(z_(2); v_k)) / H(v_k), the gap between the two latent dims most
    informative about it, averaged over factors. Needs at least two latent dims.
    """
    a, b = _discretize(codes.double(), bins), _discretize(factors.double(), bins)
    mi = _mutual_information(a, b, bins)  # (J, K)
    h = entropy(F.one_hot(b, bins).double().mean(0))  # (K,)
    top = mi.topk(2, dim=0).values  # (2, K)
    return ((top[0] - top[1]) / h.clamp_min(1e-12)).mean().item()


def dci(codes: Tensor, factors: Tensor, train_fraction: float = 0.8, ridge: float = 1e-3) -> dict[str, float]:
    """DCI-style scores (Eastwood & Williams, 2018) from a linear (ridge) regressor per factor.

    Importance R_jk = |standardised weight of code j for factor k|. Disentanglement: 1 - entropy (base K)
    of each code's importance over the K factors, weighted by the code's share of importance. Completeness:
    1 - entropy (base J) of each factor's importance over the J codes, averaged. Informativeness: R^2 of the
    factors on held-out rows.
    """
    x = (codes - codes.mean(0)) / codes.std(0).clamp_min(1e-8)
    y = (factors - factors.mean(0)) / factors.std(0).clamp_min(1e-8)
    x, y = x.double(), y.double()
    n_train = int(len(x) * train_fraction)
    xt, yt = x[:n_train], y[:n_train]
    gram = xt.T @ xt + ridge * n_train * torch.eye(x.shape[1], dtype=x.dtype)
    weights = torch.linalg.solve(gram, xt.T @ yt)  # (J, K)
    residual = y[n_train:] - x[n_train:] @ weights
    r2 = 1 - residual.pow(2).mean(0) / y[n_train:].var(0, unbiased=False).clamp_min(1e-12)
    importance = weights.abs()
    n_codes, n_factors = importance.shape

    def one_minus_entropy(p: Tensor, base: int) -> Tensor:
        return 1 - entropy(p / p.sum(dim=-1, keepdim=True).clamp_min(1e-12)) / math.log(base)

    per_code = one_minus_entropy(importance, n_factors)  # (J,)
    code_weight = importance.sum(1) / importance.sum().clamp_min(1e-12)
    per_factor = one_minus_entropy(importance.T, n_codes)  # (K,)
    return {
        "disentanglement": (per_code * code_weight).sum().item(),
        "completeness": per_factor.mean().item(),
        "informativeness": r2.mean().item(),
    }


@torch.no_grad()
def interpolations(vae: ResNetVAE, x_a: Tensor, x_b: Tensor, n_steps: int = 10) -> Tensor:
    """sigmoid(G((1 - t) mu(x_a) + t mu(x_b))) for t in linspace(0, 1, n_steps): (P * n_steps, 1, 28, 28),
    one row of ``n_steps`` images per pair."""
    mu_a, mu_b = vae.encode(x_a)[0], vae.encode(x_b)[0]
    t = torch.linspace(0, 1, n_steps, device=mu_a.device)[None, :, None]
    codes = (1 - t) * mu_a[:, None] + t * mu_b[:, None]  # (P, n_steps, L)
    return torch.sigmoid(vae.decode(codes.flatten(0, 1)))


@torch.no_grad()
def traversals(vae: ResNetVAE, x: Tensor, values: Tensor) -> Tensor:
    """From mu(x) of one image, set each latent dim j to each of ``values``: (L * V, 1, 28, 28), a row per dim."""
    mu = vae.encode(x[:1])[0][0]
    latent_dim, n_values = mu.numel(), values.numel()
    codes = mu.repeat(latent_dim, n_values, 1)  # (L, V, L)
    dims = torch.arange(latent_dim)
    codes[dims, :, dims] = values.to(mu).expand(latent_dim, n_values)
    return torch.sigmoid(vae.decode(codes.flatten(0, 1)))
