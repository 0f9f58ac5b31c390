"""Morpho-MNIST morphometrics of digit images: area, length, thickness, slant, width and height.

After Castro et al. (2019), "Morpho-MNIST: Quantitative Assessment and Diagnostics for Representation Learning",
JMLR 20(178); reference code: github.com/dccastro/Morpho-MNIST (``morphomnist/morpho.py``, ``measure.py``).

Method, per image:

1. Upsample ``upscale`` times (default 4, so 28x28 -> 112x112): bicubic interpolation (torch's, a = -0.75,
   ``align_corners=False``) followed by a Gaussian blur of sigma = upscale / 3, as scikit-image's
   ``pyramid_expand`` in the reference does (its interpolation is a cubic spline instead); clip to [0, 1].
2. Binarise at ``threshold`` (default 0.5, half of the [0, 1] intensity range). The threshold is absolute, where
   the reference puts it halfway between each image's own min and max: the two agree on MNIST digits (which span
   0 to 1), and a faint decoder output is not stretched to look like a full-strength stroke.
3. Skeletonise the binary image with the medial axis and keep its Euclidean distance transform. This is
   ``skimage.morphology.medial_axis(binary, return_distance=True, rng=0)`` (tie-break seed fixed at 0, so a given
   image always gets the same skeleton), rebuilt from the same scikit-image parts with its lookup tables built once
   instead of on every call: identical output, about twenty times faster.

The measures, all in ORIGINAL 28x28 pixel units (lengths divided by ``upscale``, areas by ``upscale**2``):

- ``area``: number of foreground (binary) pixels.
- ``length``: length of the skeleton; each pair of 8-neighbouring skeleton pixels adds 1 (side by side) or
  sqrt(2) (diagonal), as in the reference. A stroke with round ends of length L (between the end centres) and
  thickness T measures between about L and L + T, a few percent more where the skeleton zig-zags.
- ``thickness``: mean stroke thickness, twice the mean distance-to-background over the skeleton pixels.
- ``slant``: the angle (radians) of the horizontal shear that makes the digit upright, from the second-order
  central moments of the foreground, with x to the right and y (rows) downwards: ``slant = atan(-mu11 / mu02)``.
  POSITIVE when the top of the digit leans to the RIGHT (like "/"), negative when it leans left (like a
  backslash), 0 for an upright digit. A shape sheared by x -> x + s * (y_centre - y) has slant atan(s).
- ``width``, ``height``: extent of the foreground between its 1% and 99% quantiles (2% of the area left out),
  the width measured along rows of the de-slanted digit (rows shifted back by the shear), the height vertically:
  the sides of the reference's bounding parallelogram. A w x h bar measures about 0.98 w by 0.98 h.

Slant, width and height use the binary foreground, where the reference weights pixels by their upsampled
intensity: on real digits the slant barely changes (correlation above 0.999 with the reference on MNIST), and
width and height are the digit's own extent rather than that of its blurred edge (the reference's are about
0.6 px larger on MNIST, and more than a pixel larger for a thin bar).

Everything except the medial axis is computed for the whole batch at once with torch; the medial axis, which has
no batched implementation, runs image by image on the bounding box of the foreground. Images with no foreground
pixel get all six measures equal to 0.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from semvae import stopping

MEASURES = ("area", "length", "thickness", "slant", "width", "height")

BOUND_FRAC = 0.02  # fraction of the foreground left outside width and height (half on each side)
SKELETON_SEED = 0  # tie-break seed of the medial axis, fixed so that a given image always gets the same skeleton
CHUNK = 1000  # images upsampled and measured together, to bound memory


def measure(images: Tensor, upscale: int = 4, threshold: float = 0.5) -> Tensor:
    """Morphometrics of a batch of digits: (N, 1, H, W) or (N, H, W) in [0, 1] -> (N, 6) float32, MEASURES order."""
    if int(upscale) != upscale or upscale < 1:
        raise ValueError(f"upscale must be a positive integer, got {upscale}")
    x = _as_batch(images)
    if x.shape[0] == 0:
        return torch.zeros(0, len(MEASURES))
    measured = []
    for chunk in x.split(CHUNK):
        stopping.check("morphometrics stopped")  # a stop signal is honoured between chunks
        measured.append(_measure_chunk(chunk, upscale, threshold))
    return torch.cat(measured)


def standardize(values: Tensor, mean: Tensor | None = None, std: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-column z-scores ``(values - mean) / std``; mean and std are computed from ``values`` unless given.

    Returns ``(z, mean, std)`` so that the statistics of one set (e.g. the test set) can be reused on another.
    A column with zero (or undefined) spread gets std 1, hence z = values - mean.
    """
    values = values.float()
    if mean is None:
        mean = values.mean(dim=0)
    if std is None:
        std = values.std(dim=0) if values.shape[0] > 1 else torch.zeros(values.shape[1:])
    std = torch.where(torch.isfinite(std) & (std > 0), std, torch.ones_like(std))
    return (values - mean) / std, mean, std


def _as_batch(images: Tensor) -> Tensor:
    """(N, 1, H, W) or (N, H, W) tensor or array -> (N, H, W) float32 on the CPU; uint8 is read as 0..255."""
    x = torch.as_tensor(images).detach().cpu()
    if x.dim() == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"expected images of shape (N, 1, H, W) or (N, H, W), got {tuple(x.shape)}")
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _measure_chunk(x: Tensor, upscale: int, threshold: float) -> Tensor:
    """All six measures for one chunk (N, H, W); see the module docstring."""
    hires = upsample(x, upscale)
    binary = hires >= threshold
    skeleton, distance = skeletons(binary)
    area = binary.sum(dim=(1, 2)).float() / upscale**2
    length = stroke_length(skeleton) / upscale
    thickness = mean_thickness(skeleton, distance) / upscale
    foreground = binary.float()
    shear = horizontal_shear(foreground)
    width, height = extent(foreground, shear)
    out = torch.stack([area, length, thickness, torch.atan(-shear), width / upscale, height / upscale], dim=1)
    return torch.where(binary.flatten(1).any(dim=1, keepdim=True), out, torch.zeros_like(out))


def upsample(x: Tensor, upscale: int) -> Tensor:
    """(N, H, W) -> (N, H*upscale, W*upscale): bicubic, then a Gaussian blur of sigma upscale/3, clipped to [0, 1].

    Both steps are linear and separable, so they are applied as one matrix per axis: ``A_h @ x @ A_w.T``.
    """
    if upscale == 1:
        return x.clamp(0.0, 1.0)
    rows = _upsample_matrix(x.shape[1], upscale)
    cols = _upsample_matrix(x.shape[2], upscale)
    return (rows @ x @ cols.T).clamp(0.0, 1.0)


@functools.cache
def _upsample_matrix(size: int, upscale: int) -> Tensor:
    """(size*upscale, size) matrix of 1-D bicubic upsampling (torch's, align_corners=False) then Gaussian blur."""
    basis = torch.eye(size, dtype=torch.float64).view(size, 1, size, 1)
    up = F.interpolate(basis, scale_factor=(upscale, 1), mode="bicubic", align_corners=False)[:, :, :, 0]
    sigma = upscale / 3
    radius = max(1, int(4 * sigma + 0.5))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    blurred = F.conv1d(F.pad(up, (radius, radius), mode="reflect"), (kernel / kernel.sum()).view(1, 1, -1))
    return blurred[:, 0].T.float().contiguous()


# --- moments, slant, width and height: batched --------------------------------------------------------------------


def horizontal_shear(image: Tensor) -> Tensor:
    """mu11 / mu02 of each (N, H, W) image: the x-offset per row (rows counted downwards) of the mass; 0 if blank."""
    rows = image.sum(dim=2).double()
    cy, mass = _centroid_row(rows)
    x_by_row = (image @ torch.arange(image.shape[2], dtype=image.dtype)).double()  # sum over x of x * I, per row
    ys = torch.arange(image.shape[1], dtype=torch.float64)
    cx = x_by_row.sum(dim=1) / mass
    mu11 = (x_by_row @ ys) / mass - cx * cy
    mu02 = (rows @ ys**2) / mass - cy**2
    shear = torch.where(mu02 > 1e-9, mu11 / mu02.clamp_min(1e-9), torch.zeros_like(mu11))
    return shear.float()


def _centroid_row(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Centroid row (N,) and total mass (N,, at least 1e-12) of images given by their row sums (N, H)."""
    mass = rows.sum(dim=1).clamp_min(1e-12)
    return (rows @ torch.arange(rows.shape[1], dtype=rows.dtype)) / mass, mass


def extent(image: Tensor, shear: Tensor, frac: float = BOUND_FRAC) -> tuple[Tensor, Tensor]:
    """Width (across the de-slanted digit) and height of each image's mass between its frac/2 and 1-frac/2 quantiles.

    Each pixel's mass is spread uniformly over its unit cell; lengths are in pixels of ``image``; 0 if blank.
    """
    row_cdf = F.pad(image.cumsum(dim=2), (1, 0))  # (N, H, W+1): mass of each row left of each cell edge
    rows = row_cdf[:, :, -1].double()
    cy, mass = _centroid_row(rows)
    levels = torch.tensor([frac / 2, 1 - frac / 2], dtype=torch.float64)
    top, bottom = _profile_quantiles(rows, levels).unbind(dim=1)
    # mass of row y left of x = t in the de-slanted frame is its cumulative sum read at x = t + shear * (y - cy)
    offsets = shear.double()[:, None] * (torch.arange(image.shape[1], dtype=torch.float64) - cy[:, None])
    left, right = _bisect_quantiles(row_cdf, offsets.float(), (levels * mass[:, None]).float()).unbind(dim=1)
    blank = rows.sum(dim=1) <= 0
    width = torch.where(blank, 0.0, right - left)
    height = torch.where(blank, 0.0, (bottom - top).float())
    return width, height


def _profile_quantiles(profile: Tensor, levels: Tensor) -> Tensor:
    """Quantiles (N, L) at ``levels`` (fractions) of mass profiles (N, B), the mass of bin k uniform on [k, k+1]."""
    cdf = profile.cumsum(dim=1) / profile.sum(dim=1, keepdim=True).clamp_min(1e-12)
    target = levels.expand(profile.shape[0], -1).contiguous()
    k = torch.searchsorted(cdf, target).clamp_max(profile.shape[1] - 1)
    below = torch.where(k > 0, cdf.gather(1, (k - 1).clamp_min(0)), torch.zeros_like(target))
    in_bin = cdf.gather(1, k) - below
    return k + ((target - below) / in_bin.clamp_min(1e-12)).clamp(0.0, 1.0)


def _bisect_quantiles(row_cdf: Tensor, offsets: Tensor, targets: Tensor, steps: int = 16) -> Tensor:
    """Positions t (N, L) where the mass left of t, summed over rows shifted by ``offsets`` (N, H), reaches ``targets``.

    ``row_cdf`` (N, H, W+1) holds each row's mass left of every cell edge; between edges it grows linearly.
    """
    width = row_cdf.shape[2] - 1
    span = offsets.abs().amax(dim=1, keepdim=True)
    lo = (-span - 1).expand_as(targets).contiguous()
    hi = (width + span + 1).expand_as(targets).contiguous()
    offsets = offsets[:, :, None]
    for _ in range(steps):  # 16 halvings take a range of a few hundred pixels below 0.01 pixel
        mid = (lo + hi) / 2
        below = _shifted_mass(row_cdf, mid[:, None, :] + offsets) < targets
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return (lo + hi) / 2


def _shifted_mass(row_cdf: Tensor, edge: Tensor) -> Tensor:
    """Mass (N, L) summed over rows left of positions ``edge`` (N, H, L) (row-wise), by linear interpolation."""
    width = row_cdf.shape[2] - 1
    edge = edge.clamp(0.0, float(width))  # the cell edges sit at x = 0 .. width
    k = edge.long().clamp_max(width - 1)
    left = row_cdf.gather(2, k)
    return torch.lerp(left, row_cdf.gather(2, k + 1), edge - k).sum(dim=1)


# --- skeleton, length, thickness ----------------------------------------------------------------------------------


def stroke_length(skeleton: Tensor) -> Tensor:
    """Skeleton length of (N, H, W) bool skeletons: 1 per side-by-side pair of pixels, sqrt(2) per diagonal pair."""
    s = skeleton.numpy()  # numpy's & and count on strided bool views are several times faster than torch's

    def pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.count_nonzero(a & b, axis=(1, 2))

    straight = pairs(s[:, :, 1:], s[:, :, :-1]) + pairs(s[:, 1:, :], s[:, :-1, :])
    diagonal = pairs(s[:, 1:, 1:], s[:, :-1, :-1]) + pairs(s[:, 1:, :-1], s[:, :-1, 1:])
    return torch.from_numpy(straight + math.sqrt(2.0) * diagonal).float()


def mean_thickness(skeleton: Tensor, distance: Tensor) -> Tensor:
    """Twice the mean distance-to-background over the skeleton pixels of each image; 0 for an empty skeleton."""
    count = skeleton.sum(dim=(1, 2))
    total = torch.where(skeleton, distance, 0.0).sum(dim=(1, 2))
    return 2.0 * total / count.clamp_min(1)


def skeletons(binary: Tensor) -> tuple[Tensor, Tensor]:
    """Medial axes (N, H, W) bool and Euclidean distance transforms (N, H, W) float32 of binary images.

    Each image is cropped to its foreground's bounding box plus a one-pixel margin first: the nearest background
    pixel of any foreground pixel lies inside that box, so the result is the same as on the whole image.
    """
    masks = binary.numpy()
    skel = np.zeros(masks.shape, dtype=bool)
    dist = np.zeros(masks.shape, dtype=np.float32)
    boxes = _bounding_boxes(binary, margin=1)
    for k in np.flatnonzero(masks.any(axis=(1, 2))):
        top, bottom, left, right = boxes[k]
        skel[k, top:bottom, left:right], dist[k, top:bottom, left:right] = medial_axis(masks[k, top:bottom, left:right])
    return torch.from_numpy(skel), torch.from_numpy(dist)


def _bounding_boxes(binary: Tensor, margin: int) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) slice bounds of each image's True pixels, grown by ``margin`` within the image."""
    _, h, w = binary.shape
    rows, cols = binary.any(dim=2), binary.any(dim=1)
    top = _first_true(rows) - margin
    bottom = h - _first_true(rows.flip(1)) + margin
    left = _first_true(cols) - margin
    right = w - _first_true(cols.flip(1)) + margin
    return torch.stack([top.clamp_min(0), bottom.clamp_max(h), left.clamp_min(0), right.clamp_max(w)], 1).tolist()


def _first_true(flags: Tensor) -> Tensor:
    """Index of the first True in each row of (N, L) bool flags (0 where there is none)."""
    return flags.int().argmax(dim=1)


def medial_axis(mask: np.ndarray, seed: int = SKELETON_SEED) -> tuple[np.ndarray, np.ndarray]:
    """``skimage.morphology.medial_axis(mask, return_distance=True, rng=seed)``: the same steps and output, with the
    lookup tables built once and the processing order found by one integer sort."""
    tables = _medial_axis_tables()
    if tables is None or min(mask.shape) < 3:  # helpers moved, or too small for them: the public function
        from skimage.morphology import medial_axis as skimage_medial_axis

        return skimage_medial_axis(mask, return_distance=True, rng=seed)
    from scipy import ndimage as ndi  # here, not at the top: run.py imports this module for every task

    keep_table, corner_table, table_index, skeletonize_loop = tables
    mask = np.ascontiguousarray(mask, dtype=bool)
    distance = ndi.distance_transform_edt(mask)
    rows, cols = np.nonzero(mask)
    corner = corner_table[table_index(mask.view(np.uint8))][rows, cols]
    tiebreak = np.random.default_rng(seed).permutation(rows.size)
    # the order of np.lexsort((tiebreak, corner, distance)), as one integer key: squared distances are integers
    key = (np.rint(distance[rows, cols] ** 2).astype(np.int64) * 10 + corner) * rows.size + tiebreak
    order = np.argsort(key).astype(np.int32)
    result = mask.astype(np.uint8)
    skeletonize_loop(result, rows.astype(np.intp), cols.astype(np.intp), order, keep_table)
    return result.astype(bool), distance


@functools.cache
def _medial_axis_tables() -> tuple | None:
    """The two 512-entry lookup tables of scikit-image's medial axis and its Cython helpers, built once; None if
    this scikit-image does not have the helpers."""
    try:
        from skimage.morphology._skeletonize_various_cy import _skeletonize_loop, _table_lookup_index
    except ImportError:
        try:  # scikit-image < 0.22
            from skimage.morphology._skeletonize_cy import _skeletonize_loop, _table_lookup_index
        except ImportError:
            return None
    keep = np.array([_keeps_centre(i) for i in range(512)], dtype=np.uint8)
    corner = np.array([9 - i.bit_count() for i in range(512)])  # background pixels around: more is more of a corner
    return keep, corner, _table_lookup_index, _skeletonize_loop


def _keeps_centre(index: int) -> bool:
    """Whether the medial axis keeps the centre of neighbourhood ``index`` (bit k set where pixel k, row-major, is
    foreground; bit 4 is the centre): if it is foreground and removing it would change the number of 8-connected
    components, or if it has fewer than two foreground neighbours."""
    from scipy import ndimage as ndi

    if not index & 16:
        return False
    eight = ndi.generate_binary_structure(2, 2)
    splits = ndi.label(_pattern(index), eight)[1] != ndi.label(_pattern(index & ~16), eight)[1]
    return bool(splits or index.bit_count() < 3)


def _pattern(index: int) -> np.ndarray:
    """The 3x3 bool neighbourhood that a lookup-table index encodes."""
    return ((index >> np.arange(9)) & 1).astype(bool).reshape(3, 3)
