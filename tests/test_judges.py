"""The judges of other architecture families, the shuffled-direction reference, the two-way bootstrap errors and the
paired differences of the evaluation (docs/METHOD.md, "Judges", "What a GSV is read against", "Errors"): on tiny
synthetic tensors, each with a degenerate case whose answer is known."""

import math

import pytest
import torch
from torch.nn import functional as F

from semvae import checkpoints
from semvae.config import ConfigError
from semvae.evaluation import metrics as ev
from semvae.evaluation.suite import paired_differences, two_way_errors
from semvae.losses import mean_squared_change
from semvae.models import CLASSIFIER_ARCHS, MLPClassifier, PlainCNNClassifier, build_classifier
from tests.conftest import ROOT, compose_config


@pytest.mark.parametrize("arch, widths, features", [("mlp", [32, 16], 16), ("cnn", [4, 8, 12], 12)])
def test_other_families_read_features_and_classes_like_the_resnet(arch, widths, features):
    net = build_classifier(arch, widths).eval()
    assert isinstance(net, {"mlp": MLPClassifier, "cnn": PlainCNNClassifier}[arch])
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert net.features(x).shape == (5, features) and net.feature_dim == features
    assert torch.allclose(net(x), net.head(net.features(x)))
    assert not any(isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d) for m in net.modules())
    with pytest.raises(ValueError, match="unknown classifier architecture 'vit'; allowed: resnet, mlp, cnn"):
        build_classifier("vit", widths)
    assert CLASSIFIER_ARCHS == ("resnet", "mlp", "cnn")


def test_a_judge_file_is_rebuilt_with_its_own_architecture(tmp_path):
    net = build_classifier("cnn", [4, 8, 12])
    architecture = {"arch": "cnn", "widths": [4, 8, 12], "blocks": 0}
    checkpoints.save_atomic(
        {"model": net.state_dict(), "kind": "classifier", "architecture": architecture}, tmp_path / "c.pth"
    )
    loaded, _ = checkpoints.load_classifier(tmp_path / "c.pth")
    x = torch.rand(3, 1, 28, 28)
    assert isinstance(loaded, PlainCNNClassifier) and torch.equal(loaded.features(x), net.eval().features(x))
    with pytest.raises(checkpoints.CheckpointError, match="arch: checkpoint cnn vs config mlp"):
        checkpoints.load_classifier(tmp_path / "c.pth", expect={"arch": "mlp"})


def test_the_judge_presets_and_their_checks():
    mlp = compose_config("task=train_classifier", "classifier=mlp").classifier
    cnn = compose_config("task=train_classifier", "classifier=cnn").classifier
    assert (mlp.arch.value, mlp.widths, mlp.seed, mlp.epochs) == ("mlp", [256, 128], 2, 20)
    assert (cnn.arch.value, cnn.widths, cnn.seed) == ("cnn", [16, 32, 128], 3)
    assert mlp.checkpoint.endswith("weights/judge_mlp.pth") and cnn.checkpoint.endswith("weights/judge_cnn.pth")
    with pytest.raises(ConfigError, match=r"classifier.widths=\[4, 8\]: needs 3 entries \(conv channels"):
        compose_config("task=train_classifier", "classifier=cnn", "classifier.widths=[4,8]")
    judges = compose_config("task=evaluate").evaluation.judges
    assert [j.value for j in judges] == ["train", "heldout", "mlp", "cnn", "morpho"]


def test_a_judge_outside_the_list_is_refused_with_the_allowed_ones():
    with pytest.raises(Exception) as info:
        compose_config("task=evaluate", "evaluation.judges=[train,vit]")
    text = str(info.value) + str(info.value.__cause__ or "")
    assert "Invalid value 'vit', expected one of [train, heldout, mlp, cnn, morpho]" in text, text


@pytest.mark.parametrize("name, accuracy", [("judge_mlp.pth", 0.97), ("judge_cnn.pth", 0.985)])
def test_the_shipped_judges_read_real_digits(name, accuracy):
    from semvae.data import load_split
    from tests.conftest import DATA_DIR

    test = load_split("mnist", DATA_DIR, train=False, download=False)
    net, state = checkpoints.load_classifier(ROOT / "weights" / name)
    read, top, share = ev.recognition(net, test.images[:2000], test.labels[:2000], batch_size=1000)
    assert read > accuracy and share < 0.15  # the first 2,000 test digits, read as what they are
    assert state["architecture"]["arch"] in ("mlp", "cnn") and state["test/accuracy"] > accuracy


def test_recognition_reads_accuracy_and_the_top_class():
    labels = torch.tensor([0, 1, 2, 3, 3, 3, 4, 5])
    always_three = lambda images: F.one_hot(torch.full((len(images),), 3), 10).float()  # noqa: E731
    accuracy, top, share = ev.recognition(always_three, torch.zeros(8, 1, 28, 28), labels, batch_size=3)
    assert (accuracy, top, share) == (3 / 8, 3, 1.0)


def _decode_and_judge(latent_dim=3, seed=0):
    w = torch.randn(latent_dim, 784, generator=torch.Generator().manual_seed(seed))
    decode = lambda codes: torch.sigmoid(codes @ w).reshape(-1, 1, 28, 28)  # noqa: E731
    proj = torch.randn(784, 4, generator=torch.Generator().manual_seed(seed + 1))
    judge = lambda images: torch.tanh(images.flatten(1) @ proj / 20)  # noqa: E731
    return decode, judge


def test_shuffled_cells_give_each_point_every_direction_once():
    delta = torch.randn(5, 7, 3, generator=torch.Generator().manual_seed(0))  # (D, N, F)
    assignment = ev.shuffled_assignment(7, 5, seed=1)
    assert torch.equal(assignment.sort(dim=1).values, torch.arange(5).expand(7, 5))  # a permutation per point
    assert torch.equal(assignment, ev.shuffled_assignment(7, 5, seed=1))  # the same for every model
    cells = ev.shuffled_cells(delta, assignment)
    assert torch.equal(cells[2, 4], delta[assignment[4, 2], 4])
    # the same changes regrouped: the mean squared change over the step is the GSV's
    assert mean_squared_change(cells).sum().item() == pytest.approx(mean_squared_change(delta).sum().item(), rel=1e-6)


def test_the_reference_is_the_gsv_when_the_reading_does_not_depend_on_the_direction():
    """Every direction the same: shuffling which point gets which changes nothing, reference == GSV, relative 1."""
    decode, judge = _decode_and_judge()
    z = torch.randn(30, 3, generator=torch.Generator().manual_seed(2))
    u = F.normalize(torch.tensor([[1.0, 2.0, -1.0]]), dim=1).expand(6, 3)
    with torch.no_grad():
        out = ev.global_semantic_variance(decode, {"j": judge}, z, u, [0.5, 1.0], batch_size=45, reference=True)["j"]
    assert out["shuffled_norm"].shape == out["norm"].shape == (2, 6)
    assert torch.allclose(out["shuffled_norm"], out["norm"], atol=1e-6)


def test_the_reference_of_an_affine_decoder_read_linearly_is_high_while_its_gsv_is_zero():
    """Affine decoder, linear judge: each direction changes the reading identically everywhere (GSV 0), but points
    given different directions change differently (reference > 0): the relative GSV is 0."""
    g = torch.Generator().manual_seed(0)
    w, proj = torch.randn(3, 784, generator=g), torch.randn(784, 5, generator=g)
    decode = lambda codes: (codes @ w).reshape(-1, 1, 28, 28)  # noqa: E731
    judge = lambda images: images.flatten(1) @ proj  # noqa: E731
    z, d = torch.randn(40, 3, generator=g), ev.evaluation_directions(3, 4, seed=1)
    with torch.no_grad():
        out = ev.global_semantic_variance(decode, {"j": judge}, z, d, [1.0], reference=True, resamples=20)["j"]
    assert out["norm"].abs().max() < 1e-5
    assert out["shuffled_norm"].min() > 0.5  # directions drawn per point: the changes point every way
    assert out["resampled_shuffled_norm"].shape == (20, 1, len(d))


def test_the_reference_is_independent_of_the_chunk_size():
    decode, judge = _decode_and_judge()
    z = torch.randn(20, 3, generator=torch.Generator().manual_seed(3))
    d = ev.evaluation_directions(3, 3, seed=1)
    with torch.no_grad():
        a = ev.global_semantic_variance(decode, {"j": judge}, z, d, [1.0, 2.0], batch_size=45, reference=True)
        b = ev.global_semantic_variance(decode, {"j": judge}, z, d, [1.0, 2.0], batch_size=1000, reference=True)
    assert torch.allclose(a["j"]["shuffled_norm"], b["j"]["shuffled_norm"], atol=1e-6)


def test_direction_weights_keep_the_axes_and_redraw_the_random_directions():
    w = ev.direction_resampling_weights(4, 6, 50, seed=0)
    assert w.shape == (50, 10) and torch.allclose(w.sum(1), torch.ones(50, dtype=torch.float64))
    counts = w * 10  # every row sums to 4 axes + 6 draws
    assert torch.equal(counts[:, :4], torch.ones(50, 4, dtype=torch.float64))
    assert torch.allclose(counts[:, 4:].sum(1), torch.full((50,), 6.0, dtype=torch.float64))
    assert torch.equal(w, ev.direction_resampling_weights(4, 6, 50, seed=0))


def test_the_two_way_error_of_directions_alone_is_the_bootstrap_error_of_their_mean():
    """Cells that do not move with the points (every point resample equal to the value): the points-only error is
    0 and the two-way error is the bootstrap error of the mean over the random directions, with the axes fixed:
    (n_random / D) x sd_pop(random cells) / sqrt(n_random)."""
    g = torch.Generator().manual_seed(0)
    n_axes, n_random, resamples = 4, 16, 4000
    values = torch.rand(2, n_axes + n_random, generator=g, dtype=torch.float64)  # (S, D)
    resampled = values.expand(resamples, -1, -1)
    assert ev.resampled_se(values, resampled) == pytest.approx(0, abs=1e-12)
    weights = ev.direction_resampling_weights(n_axes, n_random, resamples, seed=1)
    replicates = ev.two_way_replicates(values, resampled, weights)
    per_direction = values.mean(0)  # a direction's cell averaged over the steps
    expected = (n_random / len(per_direction)) * per_direction[n_axes:].std(unbiased=False) / math.sqrt(n_random)
    assert ev.replicate_se(replicates) == pytest.approx(expected.item(), rel=0.06)
    assert replicates.mean().item() == pytest.approx(values.mean().item(), abs=3 * expected.item() / 60)
    # cells left out under the change floor stay out of every replicate
    values[0, 0] = float("nan")
    assert torch.isfinite(ev.two_way_replicates(values, resampled.clone(), weights)).all()


def test_two_way_errors_cover_more_than_the_points_and_pair_models_on_shared_draws():
    decode, judge = _decode_and_judge(latent_dim=2)
    z = torch.randn(40, 2, generator=torch.Generator().manual_seed(4))
    d = ev.evaluation_directions(2, 6, seed=1)
    with torch.no_grad():
        out = ev.global_semantic_variance(decode, {"j": judge}, z, d, [1.0], resamples=100, seed=0, reference=True)
    rows = {name: {"gsv_norm_j": ev.mean_and_se(out["j"]["norm"])[0]} for name in ("a", "b")}
    for row in rows.values():
        row["gsv_shuffled_j"] = ev.mean_and_se(out["j"]["shuffled_norm"])[0]
        row["gsv_relative_j"] = row["gsv_norm_j"] / row["gsv_shuffled_j"]
        row |= {f"gsv_{f}_j": ev.mean_and_se(out["j"][f])[0] for f in ("raw", "change")}
    metrics = dict(rows["a"])
    replicates = two_way_errors(metrics, "j", out["j"], resamples=100, seed=0, n_random=6)
    for form in ("raw", "norm", "change", "shuffled", "relative"):
        assert metrics[f"gsv_{form}_j_se_two_way"] > 0, form
    assert metrics["gsv_norm_j_se_two_way"] >= 0.9 * ev.resampled_se(out["j"]["norm"], out["j"]["resampled_norm"])
    assert metrics["gsv_relative_j_se"] > 0
    # a model read on the same points and directions: its replicates differ by the same amount in every resample
    shifted = {form: values + 0.01 for form, values in replicates.items()}
    rows["b"] = {key: value + 0.01 for key, value in rows["a"].items()}
    differences = paired_differences(rows, {"a": {"j": replicates}, "b": {"j": shifted}}, baseline="a")
    assert {d["metric"] for d in differences} == {
        f"gsv_{f}_j" for f in ("raw", "norm", "change", "shuffled", "relative")
    }
    for d in differences:
        assert d["model"] == "b" and d["difference"] == pytest.approx(0.01) and d["se"] == pytest.approx(0, abs=1e-6)
