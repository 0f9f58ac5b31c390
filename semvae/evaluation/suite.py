"""The evaluation of one model on the test split: every metric of docs/METHOD.md in one row.

``EvaluationBench`` holds what every evaluated model is measured against: the test split, the judges, the fixed
starting images and pairs (all drawn from ``evaluation.seed``) and the morphometrics of the test images. Every
model sees the same images, directions, steps, pairs and ELBO noise, so differences between rows are paired. The
metrics themselves are the pure functions of ``metrics.py``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from semvae import checkpoints
from semvae.config import CLASSIFIER_JUDGES, Config, ConfigError, JudgeName
from semvae.data import N_CLASSES, Split, load_split
from semvae.evaluation import metrics as ev
from semvae.evaluation import morpho, report
from semvae.models import ResNetVAE

log = logging.getLogger(__name__)


# What the evaluation measures, as a number: raised whenever a metric is added or computed differently, so that a
# stored row of an older version is measured again rather than kept without it. 2: recon_top_class(_share).
# 3: the mlp and cnn judges, recognition under every classifier judge, the shuffled-direction reference and the
# two-way (points and directions) standard errors.
METRICS_VERSION = 3


@dataclass
class Judges:
    """Feature extractors reading the semantics of images: classifiers, and the morphometrics."""

    classifiers: dict[str, nn.Module] = field(default_factory=dict)  # "train", "heldout", "mlp", "cnn"
    morpho: bool = True
    morpho_mean: Tensor | None = None  # standardisation over the test set
    morpho_std: Tensor | None = None

    def morpho_features(self, images: Tensor) -> Tensor:
        values = morpho.measure(images.float().cpu())
        return morpho.standardize(values, self.morpho_mean, self.morpho_std)[0].to(images.device)

    def reading_spread(self, starts: Tensor, factors: Tensor | None, batch_size: int) -> dict[str, float]:
        """How much each judge's reading varies over real images: over the starting images for a classifier, over
        the standardised test-set morphometrics for morpho. The same for every model evaluated."""
        spread = {name: ev.reading_spread(net.features, starts, batch_size) for name, net in self.classifiers.items()}
        if self.morpho and factors is not None:
            standard = morpho.standardize(factors, self.morpho_mean, self.morpho_std)[0]
            spread["morpho"] = standard.double().var(dim=0, unbiased=False).sum().item()
        return spread


@dataclass
class Selection:
    """The fixed test images of an evaluation: GSV starting points and interpolation pairs."""

    starts: Tensor  # (n_points, 1, 28, 28)
    pair_a: Tensor  # (n_pairs, 1, 28, 28)
    pair_b: Tensor


def select(images: Tensor, n_points: int, n_pairs: int, seed: int) -> Selection:
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).to(images.device)
    starts = images[order[:n_points]]
    pairs = images[order[n_points : n_points + 2 * n_pairs]] if len(images) >= n_points + 2 * n_pairs else None
    if pairs is None:  # few test images (smoke runs): pairs may overlap the starting points
        pairs = images[order[: 2 * n_pairs]]
    return Selection(starts, pairs[:n_pairs], pairs[n_pairs:])


def evaluate_model(
    vae: ResNetVAE,
    test_images: Tensor,
    test_labels: Tensor,
    judges: Judges,
    selection: Selection,
    factors: Tensor | None,
    *,
    seed: int,
    n_random_directions: int,
    steps: list[float],
    morpho_points: int,
    interpolation_steps: int,
    traversal_values: Tensor,
    batch_size: int,
    spread: dict[str, float],
    change_floor: float = 0.0,
    resamples: int = 0,
) -> tuple[dict[str, Any], dict[str, Tensor], Tensor]:
    """All metrics of one model. Returns (metrics, images to save, latent norms ||mu(x)|| over the test split).
    ``spread``: the judges' reading spread over real images (``Judges.reading_spread``, the same for every model)."""
    started = time.perf_counter()
    log.info(
        "reconstruction, ELBO and latent statistics%s on %d test images",
        " and MIG, DCI" if factors is not None else "",
        len(test_images),
    )
    vae.eval().to(memory_format=torch.channels_last)  # NHWC convolutions run about 1.7x faster on a CPU
    metrics: dict[str, Any] = {}
    mu = ev.latent_means(vae, test_images, batch_size)
    recon = ev.decode_images(vae, mu, batch_size)
    metrics["mse"], metrics["mse_se"] = ev.mean_and_se(ev.squared_errors(recon, test_images))
    metrics["neg_elbo"], metrics["neg_elbo_se"] = ev.mean_and_se(ev.negative_elbo(vae, test_images, seed, batch_size))
    norms = mu.norm(dim=1)
    metrics["latent_norm_mean"], metrics["latent_norm_std"] = norms.mean().item(), norms.std().item()
    metrics["prior_norm_mean"] = float(report.prior_norm(vae.latent_dim).mean())
    metrics["active_units"] = ev.active_units(mu)
    metrics["latent_dim"] = vae.latent_dim
    # recognisability under every classifier judge, not through φ alone; a decoder that writes one pattern a judge
    # reads as one class scores a low GSV under that judge: its top-class share shows it
    for name, net in judges.classifiers.items():
        read = ev.recognition(net, recon, test_labels, batch_size, N_CLASSES)
        keys = [f"recon_accuracy_{name}", f"recon_top_class_{name}", f"recon_top_class_share_{name}"]
        if name == "train":  # φ's, also under the names rows have carried since before the other judges
            keys += ["recon_accuracy", "recon_top_class", "recon_top_class_share"]
        metrics |= {key: value for key, value in zip(keys, read * (len(keys) // 3), strict=True)}
    if factors is not None:
        metrics["mig"] = ev.mig(mu.cpu(), factors.cpu()) if vae.latent_dim >= 2 else float("nan")
        for key, value in ev.dci(mu.cpu(), factors.cpu()).items():
            metrics[f"dci_{key}"] = value

    z = ev.latent_means(vae, selection.starts, batch_size)
    replicates: dict[str, dict[str, Tensor]] = {}  # per judge, the two-way bootstrap replicates of each GSV
    directions = ev.evaluation_directions(vae.latent_dim, n_random_directions, seed).to(z.device)
    decode = lambda codes: torch.sigmoid(vae.decode(codes))  # noqa: E731
    classifiers = {name: net.features for name, net in judges.classifiers.items()}
    log.info(
        "GSV: %d starting points x %d directions x %d steps, judges %s%s",
        len(z),
        len(directions),
        len(steps),
        ", ".join(classifiers) or "-",
        f"; morpho on {min(morpho_points, len(z))} points" if judges.morpho else "",
    )
    # a shift that moves a judge's reading by less than change_floor x its spread over real images moves nothing
    floor = {name: change_floor * value for name, value in spread.items()}
    resampling = {"resamples": resamples, "seed": seed, "floor": floor, "reference": True}
    gsv = ev.global_semantic_variance(
        decode, classifiers, z, directions, steps, batch_size, progress=f"GSV ({', '.join(classifiers)})", **resampling
    )
    if judges.morpho:
        gsv |= ev.global_semantic_variance(
            decode,
            {"morpho": judges.morpho_features},
            z[:morpho_points],
            directions,
            steps,
            batch_size,
            progress="GSV (morpho)",
            **resampling,
        )
    for judge, values in gsv.items():
        metrics[f"reading_spread_{judge}"] = spread[judge]
        metrics[f"gsv_inactive_{judge}"] = values["norm"].isnan().double().mean().item()
        metrics[f"gsv_points_{judge}"] = len(z) if judge != "morpho" else min(morpho_points, len(z))
        for form in ("raw", "norm", "change", "shuffled_norm"):
            key = f"gsv_{form.removesuffix('_norm')}_{judge}"  # the reference is gsv_shuffled_{judge}
            metrics[key] = ev.mean_and_se(values[form])[0]
            if resamples > 0:  # the standard error a different draw of the starting points would give
                metrics[f"{key}_se"] = ev.resampled_se(values[form], values[f"resampled_{form}"])
            for step, row in zip(steps, values[form], strict=True):
                metrics[f"{key}_step{step:g}"] = ev.mean_and_se(row)[0]
        reference = metrics[f"gsv_shuffled_{judge}"]  # 0 when no shift moves the reading: no ratio
        metrics[f"gsv_relative_{judge}"] = metrics[f"gsv_norm_{judge}"] / reference if reference else float("nan")
        if resamples > 0:
            replicates[judge] = two_way_errors(metrics, judge, values, resamples, seed, n_random_directions)

    with torch.no_grad():
        images = {
            "interpolations": ev.interpolations(vae, selection.pair_a, selection.pair_b, interpolation_steps),
            "traversals": ev.traversals(vae, selection.starts[:1], traversal_values),
        }
    metrics["eval_seconds"] = round(time.perf_counter() - started, 2)
    if replicates:  # not a metric: for paired differences between models (``paired_differences``)
        metrics["replicates"] = replicates
    return metrics, images, norms.cpu()


def two_way_errors(
    metrics: dict[str, Any], judge: str, values: dict[str, Tensor], resamples: int, seed: int, n_random: int
) -> dict[str, Tensor]:
    """Adds to ``metrics`` the standard errors of one judge's GSVs that cover the draw of the random directions as
    well as that of the starting points (``gsv_*_se_two_way``), and the points-only one of ``gsv_relative``; returns
    the two-way bootstrap replicates of each, (B,) per form. Every model is resampled on the same points (weights
    from ``seed``) and directions (``seed`` + 2; the reference's cells, all drawn, ``seed`` + 3), so the replicates
    of two models' difference are the differences of their replicates."""
    n_directions = values["norm"].shape[-1]
    weights = ev.direction_resampling_weights(n_directions - n_random, n_random, resamples, seed + 2)
    cell_weights = ev.direction_resampling_weights(0, n_directions, resamples, seed + 3)
    uniform = torch.full((resamples, n_directions), 1.0 / n_directions, dtype=torch.float64)
    out = {}
    for form in ("raw", "norm", "change", "shuffled_norm"):
        drawn = cell_weights if form == "shuffled_norm" else weights
        out[form] = ev.two_way_replicates(values[form], values[f"resampled_{form}"], drawn)
        metrics[f"gsv_{form.removesuffix('_norm')}_{judge}_se_two_way"] = ev.replicate_se(out[form])
    out["relative"] = out["norm"] / out["shuffled_norm"]
    metrics[f"gsv_relative_{judge}_se_two_way"] = ev.replicate_se(out["relative"])
    points_only = [
        ev.two_way_replicates(values[f], values[f"resampled_{f}"], uniform) for f in ("norm", "shuffled_norm")
    ]
    metrics[f"gsv_relative_{judge}_se"] = ev.replicate_se(points_only[0] / points_only[1])
    return {form: replicates.float().cpu() for form, replicates in out.items()}


def paired_differences(
    rows: dict[str, dict[str, Any]], replicates: dict[str, dict[str, dict[str, Tensor]]], baseline: str
) -> list[dict[str, Any]]:
    """Every model minus ``baseline`` on the same starting points and directions: per judge and GSV form
    (``gsv_{form}_{judge}``), the difference of the two rows and its two-way bootstrap standard error, the
    standard deviation of the differences of the models' replicates (``two_way_errors``). Models without
    replicates (rows kept from an older evaluation) are left out. One dict per (model, metric)."""
    out = []
    base = replicates.get(baseline, {})
    for name, judged in replicates.items():
        if name == baseline:
            continue
        for judge, forms in judged.items():
            for form, values in forms.items():
                if judge not in base or form not in base[judge]:
                    continue
                key = f"gsv_{form.removesuffix('_norm')}_{judge}"
                difference = rows[name][key] - rows[baseline][key]
                se = ev.replicate_se(values.double() - base[judge][form].double())
                out.append({"model": name, "baseline": baseline, "metric": key, "difference": difference, "se": se})
    return out


def judge_checkpoint(cfg: Config, judge: str) -> str:
    """The model file of a classifier judge: ``classifier.checkpoint`` for train, ``evaluation.<judge>_checkpoint``
    for the others (``CLASSIFIER_JUDGES``)."""
    group, key = CLASSIFIER_JUDGES[judge].split(".")
    return getattr(getattr(cfg, group), key)


@dataclass
class EvaluationBench:
    """What every evaluated model is measured against: the test split, the judges, the fixed selection of
    starting images and pairs, and the morphometrics of the test images (computed once)."""

    cfg: Config
    test: Split
    judges: Judges
    selection: Selection
    factors: Tensor | None
    spread: dict[str, float] | None = None  # the judges' reading spread, once for every model

    @classmethod
    def prepare(cls, cfg: Config, device: torch.device) -> EvaluationBench:
        return cls.load(cfg, device).measure_factors()

    @classmethod
    def load(cls, cfg: Config, device: torch.device) -> EvaluationBench:
        """The judges, the test split and the selection: what can fail on a wrong file, before any computation."""
        e, d, c = cfg.evaluation, cfg.data, cfg.classifier
        judges = Judges(morpho=JudgeName.morpho in e.judges)
        if JudgeName.train in e.judges:
            expect = c.expected_architecture()
            judges.classifiers["train"], _ = checkpoints.load_classifier(c.checkpoint, device, expect)
        for judge in (JudgeName.heldout, JudgeName.mlp, JudgeName.cnn):  # each of its own stored architecture
            if judge in e.judges:
                path = judge_checkpoint(cfg, judge.value)
                judges.classifiers[judge.value], _ = checkpoints.load_classifier(path, device)
        for net in judges.classifiers.values():
            net.to(memory_format=torch.channels_last)
        test = load_split(d.name.value, d.root, train=False, download=d.download, mirror=d.mirror)
        if e.limit_test is not None:
            test = test.subset(torch.arange(min(e.limit_test, len(test))))
        test = test.to(device)
        if e.n_points > len(test):
            raise ConfigError(f"evaluation.n_points={e.n_points}: the test split has only {len(test)} images")
        selection = select(test.images, e.n_points, e.n_pairs, e.seed)
        return cls(cfg, test, judges, selection, None)

    def measure_factors(self) -> EvaluationBench:
        """The morphometrics of the test images (seconds to minutes; a stop signal is honoured between chunks)."""
        if self.judges.morpho and self.factors is None:
            log.info("measuring the morphometrics of %d test images (once for every model)", len(self.test))
            self.factors = morpho.measure(self.test.images.cpu())
            _, self.judges.morpho_mean, self.judges.morpho_std = morpho.standardize(self.factors)
        return self

    def evaluate(self, vae: ResNetVAE) -> tuple[dict[str, Any], dict[str, Tensor], Tensor]:
        e = self.cfg.evaluation
        return evaluate_model(
            vae,
            self.test.images,
            self.test.labels,
            self.judges,
            self.selection,
            self.factors,
            seed=e.seed,
            n_random_directions=e.n_random_directions,
            steps=list(e.steps),
            morpho_points=e.morpho_points,
            interpolation_steps=e.interpolation_steps,
            traversal_values=torch.linspace(-e.traversal_range, e.traversal_range, e.traversal_steps),
            batch_size=e.batch_size,
            change_floor=e.change_floor,
            resamples=e.resamples,
            spread=self.reading_spread(),
        )

    def reading_spread(self) -> dict[str, float]:
        """The judges' reading spread, computed at the first model (once the morphometrics are measured)."""
        if self.spread is None:
            batch_size = self.cfg.evaluation.batch_size
            self.spread = self.judges.reading_spread(self.selection.starts, self.factors, batch_size)
        return self.spread
