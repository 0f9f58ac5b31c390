"""Morphometrics checked against strokes of known geometry, drawn here, and on real MNIST digits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision
from skimage.morphology import medial_axis as skimage_medial_axis
from torch.nn import functional as F

from semvae.evaluation.morpho import MEASURES, measure, skeletons, standardize, upsample
from tests.conftest import need_mnist

AREA, LENGTH, THICKNESS, SLANT, WIDTH, HEIGHT = range(6)


def stroke(
    length: float, thickness: float, *, round_ends: bool = True, angle: float = 0.0, shear: float = 0.0
) -> torch.Tensor:
    """A 28x28 float image of a stroke centred at (14, 14), pixel values = covered fraction (8x8 supersampling).

    Before any turn or shear the stroke is vertical: the points within thickness/2 of a segment of ``length``
    (``round_ends``, a capsule), or a ``thickness`` x ``length`` rectangle. It is then turned by ``angle`` (radians,
    the top towards the right for angle > 0), then sheared horizontally, x -> x + shear * (14 - y), which moves the
    top right for shear > 0; y runs down the rows.
    """
    c = (torch.arange(28 * 8, dtype=torch.float64) + 0.5) / 8
    y, x = torch.meshgrid(c, c, indexing="ij")
    u = x - 14 - shear * (14 - y)  # undo the shear; (u, v): x to the right, v upwards, origin at the centre
    v = 14 - y
    along = u * math.sin(angle) + v * math.cos(angle)  # undo the turn
    across = u * math.cos(angle) - v * math.sin(angle)
    if round_ends:
        inside = across**2 + (along - along.clamp(-length / 2, length / 2)) ** 2 <= (thickness / 2) ** 2
    else:
        inside = (across.abs() <= thickness / 2) & (along.abs() <= length / 2)
    return inside.double().view(28, 8, 28, 8).mean(dim=(1, 3)).float()


def sheared(images: torch.Tensor, s: float) -> torch.Tensor:
    """(N, 28, 28) images sheared horizontally about their centre, x -> x + s * (14 - y) (y down the rows), with
    bilinear resampling."""
    theta = torch.tensor([[1.0, s, 0.0], [0.0, 1.0, 0.0]]).expand(len(images), 2, 3)  # output (x, y) reads (x + s y)
    grid = F.affine_grid(theta, [len(images), 1, 28, 28], align_corners=False)
    return F.grid_sample(images[:, None], grid, mode="bilinear", align_corners=False)[:, 0]


def measured(*images: torch.Tensor) -> torch.Tensor:
    return measure(torch.stack(images)[:, None])


def test_output_shape_dtype_and_layouts():
    bar = stroke(16, 3)
    out = measured(bar, bar)
    assert MEASURES == ("area", "length", "thickness", "slant", "width", "height")
    assert out.shape == (2, 6) and out.dtype == torch.float32
    assert torch.equal(measure(torch.stack([bar, bar])), out)  # (N, 28, 28) as well as (N, 1, 28, 28)
    assert torch.equal(measure((torch.stack([bar, bar]) * 255).round().to(torch.uint8)), out)  # uint8 0..255


def test_upright_bar_matches_its_geometry():
    # a 3 x 16 px rectangle: area 48 px^2, no slant; width and height are the 1%-99% extent, 0.98 of the sides
    area, _, thickness, slant, width, height = measured(stroke(16, 3, round_ends=False))[0].tolist()
    assert area == pytest.approx(48, rel=0.10)  # 10%
    assert thickness == pytest.approx(3, abs=0.5)  # 0.5 px
    assert slant == pytest.approx(0, abs=0.05)  # 0.05 rad
    assert width == pytest.approx(0.98 * 3, abs=0.5)  # 0.5 px
    assert height == pytest.approx(0.98 * 16, abs=1.0)  # 1 px


@pytest.mark.parametrize("angle", [0.3, -0.3, 0.5])
def test_sheared_bar_has_the_slant_of_its_shear(angle):
    # shearing by tan(angle) keeps the area, the de-slanted width and the height; moments see exactly that shear
    area, _, thickness, slant, width, height = measured(stroke(16, 3, round_ends=False, shear=math.tan(angle)))[0]
    assert slant.item() == pytest.approx(angle, abs=0.05)  # 0.05 rad, and the sign: top to the right is positive
    assert area.item() == pytest.approx(48, rel=0.10)
    assert width.item() == pytest.approx(0.98 * 3, abs=1.0)
    assert height.item() == pytest.approx(0.98 * 16, abs=1.0)
    assert thickness.item() == pytest.approx(3 * math.cos(angle), abs=0.5)  # measured across the slanted stroke


def test_slant_sign_for_right_and_left_leaning_strokes():
    upright, right, left = measured(stroke(16, 2), stroke(16, 2, angle=0.4), stroke(16, 2, angle=-0.4))[:, SLANT]
    assert abs(upright) < 0.01
    assert right > 0.25 and left < -0.25  # a turned stroke is a shear plus a squeeze: slant near, not at, 0.4
    assert right.item() == pytest.approx(-left.item(), abs=0.02)  # mirror images


def test_capsule_length_and_thickness():
    # round ends: the medial axis is the centre segment, length 16, with the stroke's radius all along
    area, length, thickness, slant, width, height = measured(stroke(16, 3))[0].tolist()
    assert length == pytest.approx(16, rel=0.15)  # 15%: the digital skeleton zig-zags and may reach into the ends
    assert thickness == pytest.approx(3, abs=0.5)  # 0.5 px
    assert area == pytest.approx(16 * 3 + math.pi * 1.5**2, rel=0.10)  # 10%


@pytest.mark.parametrize(("thickness", "angle"), [(2, 0.0), (3, 0.4), (4, 0.0), (4, 0.4)])
def test_capsule_length_lies_between_segment_and_full_extent(thickness, angle):
    # at least the centre segment (less 10%), at most the segment extended to both tips (plus 15% for zig-zags)
    length = measured(stroke(16, thickness, angle=angle))[0, LENGTH].item()
    assert 0.9 * 16 <= length <= 1.15 * (16 + thickness)
    assert measured(stroke(16, thickness, angle=angle))[0, THICKNESS].item() == pytest.approx(thickness, abs=0.5)


def test_thicker_and_longer_strokes_measure_thicker_and_longer():
    thick = measured(stroke(16, 2), stroke(16, 3), stroke(16, 4.5))[:, THICKNESS]
    assert (thick.diff() > 0.5).all()
    long = measured(stroke(8, 3), stroke(12, 3), stroke(16, 3), stroke(20, 3))[:, LENGTH]
    assert (long.diff() > 2).all()  # 4 px longer each time
    tall = measured(stroke(8, 3), stroke(20, 3))[:, HEIGHT]
    assert tall[1] - tall[0] == pytest.approx(12, abs=1.0)
    wide = measured(stroke(16, 2, round_ends=False), stroke(16, 5, round_ends=False))[:, WIDTH]
    assert wide[1] - wide[0] == pytest.approx(0.98 * 3, abs=0.5)


def test_blank_and_faint_images_give_zeros():
    faint = torch.full((28, 28), 0.3)  # below the 0.5 threshold everywhere: no foreground
    tiny = torch.zeros(28, 28)
    tiny[0, 0] = 1.0  # a corner pixel, about at the threshold once upsampled
    out = measured(torch.zeros(28, 28), faint, tiny)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:2], torch.zeros(2, 6))
    assert measure(torch.zeros(0, 1, 28, 28)).shape == (0, 6)


def test_batch_equals_one_image_at_a_time():
    images = torch.stack([stroke(16, 3), stroke(10, 2, angle=0.3), torch.zeros(28, 28), stroke(18, 4, shear=-0.4)])
    batched = measure(images[:, None])
    single = torch.cat([measure(image[None, None]) for image in images])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_standardize_gives_z_scores_and_reuses_given_statistics():
    values = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)) * torch.tensor([1, 2, 3, 4, 5, 6]) + 7
    values[:, 2] = 3.0  # a constant column: std 0 must not divide by zero
    z, mean, std = standardize(values)
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z.mean(dim=0), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(z[:, [0, 1, 3, 4, 5]].std(dim=0), torch.ones(5), atol=1e-5, rtol=0)
    assert torch.equal(z[:, 2], torch.zeros(50))
    other = values[:10] * 2
    z2, mean2, std2 = standardize(other, mean, std)
    assert torch.equal(mean2, mean) and torch.equal(std2, std)
    torch.testing.assert_close(z2, (other - mean) / std)


@pytest.fixture(scope="module")
def mnist_test():
    data = torchvision.datasets.MNIST(str(need_mnist()), train=False, download=False)
    return data.data[:200].float() / 255, data.targets[:200]


def test_skeleton_is_scikit_image_medial_axis(mnist_test):
    binary = upsample(mnist_test[0][:20], 4) >= 0.5
    skeleton, distance = skeletons(binary)
    for k in range(20):
        expected_skeleton, expected_distance = skimage_medial_axis(binary[k].numpy(), return_distance=True, rng=0)
        assert np.array_equal(skeleton[k].numpy(), expected_skeleton)
        np.testing.assert_allclose(distance[k].numpy(), expected_distance, rtol=1e-6)


def test_real_digits_have_plausible_measures(mnist_test):
    images, labels = mnist_test
    out = measure(images[:, None])
    assert out.shape == (200, 6) and torch.isfinite(out).all()
    assert (out[:, AREA] > 0).all() and (out[:, LENGTH] > 0).all()
    assert ((out[:, THICKNESS] > 1) & (out[:, THICKNESS] < 6)).all()  # MNIST strokes are 1 to 6 px thick
    assert (out[:, HEIGHT] <= 28).all() and (out[:, WIDTH] <= 28).all()
    # slant on real digits: shearing by x -> x + s * (y_centre - y) adds s to tan(slant), whatever the digit's own
    # slant, and with its sign (top to the right: positive); a mirror image has the opposite slant
    for s in (0.3, -0.3):
        change = torch.tan(measure(sheared(images, s)[:, None])[:, SLANT]) - torch.tan(out[:, SLANT])
        torch.testing.assert_close(change, torch.full_like(change, s), atol=0.05, rtol=0)
    torch.testing.assert_close(measure(images.flip(-1)[:, None])[:, SLANT], -out[:, SLANT], atol=1e-6, rtol=0)
    ones, zeros = out[labels == 1], out[labels == 0]
    assert len(ones) >= 10 and len(zeros) >= 10
    assert ones[:, WIDTH].mean() < 0.5 * zeros[:, WIDTH].mean()  # a "1" is a bar, a "0" a ring
    assert ones[:, LENGTH].mean() < zeros[:, LENGTH].mean()
