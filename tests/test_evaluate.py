import math

import pytest
import torch
from torch.nn import functional as F

from semvae.evaluation import metrics as ev
from semvae.evaluation.report import prior_norm
from semvae.losses import mean_squared_change, semantic_variance_per_direction
from semvae.models import ResNetVAE


def _affine(latent_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(784, latent_dim, generator=g) * 0.1, torch.randn(784, generator=g) * 0.1
    return lambda z: (z @ w.T + b).reshape(-1, 1, 28, 28)


def test_gsv_is_zero_for_affine_decoder_and_linear_judge_and_positive_otherwise():
    latent_dim = 5
    decode = _affine(latent_dim)
    proj = torch.randn(784, 12, generator=torch.Generator().manual_seed(1))
    linear = lambda img: img.flatten(1) @ proj  # noqa: E731
    relu = lambda img: F.relu(img.flatten(1) @ proj)  # noqa: E731
    z = torch.randn(300, latent_dim, generator=torch.Generator().manual_seed(2))
    directions = ev.evaluation_directions(latent_dim, n_random=6, seed=0)
    out = ev.global_semantic_variance(
        decode, {"linear": linear, "relu": relu}, z, directions, [0.5, 1, 2], batch_size=500
    )
    assert out["linear"]["raw"].shape == (3, 2 * latent_dim + 6)
    assert out["linear"]["raw"].abs().max().item() < 1e-8
    assert out["linear"]["norm"].abs().max().item() < 1e-6
    assert out["relu"]["raw"].min().item() > 0 and out["relu"]["norm"].min().item() > 1e-3
    assert out["relu"]["norm"].max().item() <= 1.0


def test_gsv_is_independent_of_the_chunk_size():
    vae = ResNetVAE(4, (4, 8, 8), 1).eval()
    judge = lambda img: torch.tanh(img.flatten(1)[:, ::9] * 3)  # noqa: E731
    decode = lambda z: torch.sigmoid(vae.decode(z))  # noqa: E731
    z = torch.randn(40, 4, generator=torch.Generator().manual_seed(3))
    d = ev.evaluation_directions(4, 3, seed=1)
    a = ev.global_semantic_variance(decode, {"j": judge}, z, d, [1.0, 2.0], batch_size=45)
    b = ev.global_semantic_variance(decode, {"j": judge}, z, d, [1.0, 2.0], batch_size=1000)
    assert torch.allclose(a["j"]["raw"], b["j"]["raw"], rtol=1e-4, atol=1e-7)
    assert torch.allclose(a["j"]["norm"], b["j"]["norm"], rtol=1e-4, atol=1e-6)


def test_evaluation_directions_are_axes_then_random_unit_vectors():
    d = ev.evaluation_directions(3, n_random=4, seed=0)
    assert d.shape == (10, 3)
    assert torch.equal(d[:3], torch.eye(3)) and torch.equal(d[3:6], -torch.eye(3))
    assert torch.allclose(d.norm(dim=1), torch.ones(10))
    assert torch.equal(d, ev.evaluation_directions(3, n_random=4, seed=0))


def test_active_units_count_dims_that_vary_over_the_data():
    mu = torch.zeros(500, 6)
    mu[:, 0] = torch.randn(500)
    mu[:, 1] = 0.5 * torch.randn(500)
    mu[:, 2] = 0.01 * torch.randn(500)  # variance 1e-4: inactive
    assert ev.active_units(mu) == 2


def test_prior_norm_is_the_norm_of_standard_normal_codes():
    for dof in (1, 2, 16):
        norms = torch.randn(200_000, dof, generator=torch.Generator().manual_seed(dof), dtype=torch.float64).norm(dim=1)
        prior = prior_norm(dof)
        assert prior.mean() == pytest.approx(norms.mean().item(), rel=5e-3)
        r = torch.linspace(0, 12, 20001, dtype=torch.float64).numpy()
        assert float(torch.trapezoid(torch.from_numpy(prior.pdf(r)), torch.from_numpy(r))) == pytest.approx(1, abs=1e-3)
        if dof > 1:
            assert r[prior.pdf(r).argmax()] == pytest.approx(math.sqrt(dof - 1), abs=0.01)


def test_mig_rewards_one_code_per_factor():
    g = torch.Generator().manual_seed(0)
    factors = torch.rand(4000, 2, generator=g)
    aligned = torch.cat([factors, torch.rand(4000, 2, generator=g)], dim=1)  # each factor in its own code
    mixed = torch.stack([factors.sum(1), factors[:, 0] - factors[:, 1], torch.rand(4000, generator=g)], dim=1)
    assert ev.mig(aligned, factors) > 0.6
    assert ev.mig(mixed, factors) < 0.3
    assert ev.mig(torch.rand(4000, 3, generator=g), factors) < 0.05  # codes unrelated to the factors


def test_dci_scores_separate_aligned_from_mixed_codes():
    g = torch.Generator().manual_seed(1)
    factors = torch.randn(3000, 3, generator=g)
    aligned = factors + 0.05 * torch.randn(3000, 3, generator=g)
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=g))[0]
    mixed = factors @ rotation + 0.05 * torch.randn(3000, 3, generator=g)
    a, m = ev.dci(aligned, factors), ev.dci(mixed, factors)
    assert a["disentanglement"] > 0.9 and a["completeness"] > 0.9
    assert m["disentanglement"] < a["disentanglement"] - 0.3 and m["completeness"] < a["completeness"] - 0.3
    assert a["informativeness"] > 0.99 and m["informativeness"] > 0.99  # both predict the factors linearly
    noise = ev.dci(torch.randn(3000, 3, generator=g), factors)
    assert noise["informativeness"] < 0.05


def test_interpolations_start_and_end_at_the_reconstructions():
    vae = ResNetVAE(4, (4, 8, 8), 1).eval()
    a, b = torch.rand(3, 1, 28, 28), torch.rand(3, 1, 28, 28)
    grid = ev.interpolations(vae, a, b, n_steps=5).reshape(3, 5, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(grid[:, 0], torch.sigmoid(vae.decode(vae.encode(a)[0])), atol=1e-5)
        assert torch.allclose(grid[:, -1], torch.sigmoid(vae.decode(vae.encode(b)[0])), atol=1e-5)


def test_traversals_change_one_latent_dim_per_row():
    vae = ResNetVAE(3, (4, 8, 8), 1).eval()
    x = torch.rand(1, 1, 28, 28)
    values = torch.linspace(-2, 2, 4)
    seen = []
    original = vae.decode
    vae.decode = lambda z: (seen.append(z.clone()), original(z))[1]
    grid = ev.traversals(vae, x, values)
    assert grid.shape == (3 * 4, 1, 28, 28)
    codes = seen[0].reshape(3, 4, 3)
    mu = vae.encode(x)[0][0]
    for j in range(3):
        assert torch.allclose(codes[j, :, j], values)
        others = [k for k in range(3) if k != j]
        assert torch.allclose(codes[j][:, others], mu[others].expand(4, 2))


def test_mean_and_se():
    mean, se = ev.mean_and_se(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5 and se == pytest.approx(torch.tensor([1.0, 2, 3, 4]).std().item() / 2)


def test_gsv_is_the_same_with_channels_last_models():
    from semvae.models import Classifier, freeze

    vae = ResNetVAE(4, (4, 8, 8), 1).eval()
    judge = freeze(Classifier((4, 8, 8), 1))
    z = torch.randn(20, 4, generator=torch.Generator().manual_seed(4))
    d = ev.evaluation_directions(4, 2, seed=2)

    def gsv():
        decode = lambda c: torch.sigmoid(vae.decode(c))  # noqa: E731
        return ev.global_semantic_variance(decode, {"j": judge.features}, z, d, [1.0, 2.0], batch_size=64)["j"]

    plain = gsv()
    vae.to(memory_format=torch.channels_last)
    judge.to(memory_format=torch.channels_last)
    fast = gsv()
    assert torch.allclose(plain["raw"], fast["raw"], rtol=1e-3, atol=1e-9)
    assert torch.allclose(plain["norm"], fast["norm"], rtol=1e-3, atol=1e-6)


def test_a_decoder_that_ignores_z_scores_nothing_under_a_change_floor():
    """A decoder whose output does not depend on z changes no reading: with eps alone its normalised GSV is 0, the
    best score; with a change floor every cell is inactive and the GSV is undefined (NaN), not best."""
    judge = torch.nn.Linear(784, 5)
    features = lambda images: judge(images.flatten(1))  # noqa: E731
    g = torch.Generator().manual_seed(0)
    template = torch.rand(1, 1, 28, 28, generator=g)
    ignoring = lambda codes: template.expand(len(codes), 1, 28, 28)  # noqa: E731
    linear = torch.randn(3, 784, generator=g)
    moving = lambda codes: torch.sigmoid(codes @ linear).reshape(-1, 1, 28, 28)  # noqa: E731
    z, d = torch.randn(50, 3, generator=g), ev.evaluation_directions(3, 4, seed=1)
    images = torch.rand(200, 1, 28, 28, generator=g)
    spread = ev.reading_spread(features, images)
    assert spread == pytest.approx(features(images).double().var(0, unbiased=False).sum().item(), rel=1e-6)
    floor = {"j": 1e-6 * spread}

    with torch.no_grad():
        plain = ev.global_semantic_variance(ignoring, {"j": features}, z, d, [1.0])["j"]
        floored = ev.global_semantic_variance(ignoring, {"j": features}, z, d, [1.0], floor=floor)["j"]
        real = ev.global_semantic_variance(moving, {"j": features}, z, d, [1.0])["j"]
        real_floored = ev.global_semantic_variance(moving, {"j": features}, z, d, [1.0], floor=floor)["j"]
    assert plain["change"].abs().max() == 0 and ev.mean_and_se(plain["norm"])[0] == 0.0  # wins without a floor
    assert floored["norm"].isnan().all() and math.isnan(ev.mean_and_se(floored["norm"])[0])
    assert not real_floored["norm"].isnan().any() and torch.equal(real["norm"], real_floored["norm"])
    assert 0 < ev.mean_and_se(real["norm"])[0] < 1


def test_mean_and_se_leave_out_undefined_cells():
    mean, se = ev.mean_and_se(torch.tensor([1.0, float("nan"), 3.0]))
    assert mean == 2.0 and se == pytest.approx(math.sqrt(2) / math.sqrt(2))
    assert all(math.isnan(v) for v in ev.mean_and_se(torch.tensor([float("nan")])))


def test_resampled_forms_with_equal_weights_are_the_full_sample_forms():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(3, 20, 5, generator=g) + torch.randn(3, 1, 5, generator=g)  # (K, N, F)
    even = torch.full((1, 20), 1 / 20, dtype=torch.float64)
    forms = ev.resampled_forms(delta, even)
    full = {
        "raw": semantic_variance_per_direction(delta, normalize=False),
        "norm": semantic_variance_per_direction(delta, normalize=True),
        "change": mean_squared_change(delta),
    }
    for form, values in full.items():
        assert torch.allclose(forms[form][0].float(), values, rtol=1e-5), form
    weights = ev.resampling_weights(20, 7, seed=1)
    assert weights.shape == (7, 20) and torch.allclose(weights.sum(1), torch.ones(7, dtype=torch.float64))
    assert ((weights * 20) == (weights * 20).round()).all()  # counts of draws, over N
    assert torch.equal(weights, ev.resampling_weights(20, 7, seed=1))  # every model resampled alike


def test_the_bootstrap_se_of_the_gsv_matches_its_spread_over_fresh_draws_of_starting_points():
    """The standard error from resampling one draw of N starting points is about the standard deviation of the GSV
    over independent draws of N points (what another choice of test images would give); the spread over cells
    (directions and steps), which the old standard error reported, is not."""
    latent_dim, n = 3, 60
    w = torch.randn(latent_dim, 784, generator=torch.Generator().manual_seed(0))
    decode = lambda codes: torch.sigmoid(codes @ w).reshape(-1, 1, 28, 28)  # noqa: E731
    proj = torch.randn(784, 4, generator=torch.Generator().manual_seed(1))
    judge = lambda images: torch.tanh(images.flatten(1) @ proj / 20)  # noqa: E731
    d = ev.evaluation_directions(latent_dim, 2, seed=1)
    g = torch.Generator().manual_seed(2)
    draws = [torch.randn(n, latent_dim, generator=g) for _ in range(200)]
    with torch.no_grad():
        gsv = [ev.global_semantic_variance(decode, {"j": judge}, z, d, [1.0])["j"]["norm"].mean().item() for z in draws]
        one = ev.global_semantic_variance(decode, {"j": judge}, draws[0], d, [1.0], resamples=400, seed=3)["j"]
    spread_over_draws = torch.tensor(gsv).std().item()
    se = ev.resampled_se(one["norm"], one["resampled_norm"])
    assert one["resampled_norm"].shape == (400, 1, len(d))
    assert 0.7 * spread_over_draws < se < 1.4 * spread_over_draws
    assert not 0.7 * spread_over_draws < ev.mean_and_se(one["norm"])[1] < 1.4 * spread_over_draws
    assert math.isnan(ev.resampled_se(one["norm"], one["resampled_norm"][:1]))  # one resample: no spread


def test_the_bootstrap_se_leaves_out_the_cells_under_the_change_floor():
    values = torch.tensor([[0.5, float("nan"), 0.7]])
    resampled = torch.tensor([[[0.4, 9.0, 0.6]], [[0.6, -9.0, 0.8]]])
    assert ev.resampled_se(values, resampled) == pytest.approx(torch.tensor([0.5, 0.7]).std().item())
