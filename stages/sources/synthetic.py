"""The default data set: procedurally drawn 32x32 colour images of ten shapes and textures.

Every colour, position, scale, rotation, the clutter and the noise are drawn independently
of the class, so the class is not visible in an image's mean colour: a model has to learn
shape (edges, corners, curvature, periodicity). Drawing is vectorised numpy over chunks of
images, deterministic for a given seed (one random stream per chunk, spawned from it).
"""

from __future__ import annotations

import numpy as np

from stages.params import SyntheticParams
from stages.sources.raw import RawData

#: Class names, in label order.
CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "cross", "ring",
    "star", "crescent", "stripes", "checkerboard", "dots",
)
SIZE = 32
#: Images drawn per vectorised step: big enough to amortise numpy's per-call cost, small
#: enough that its float arrays (6 MB) are reused by the allocator instead of being faulted
#: in afresh. Part of the format: changing it changes the images.
CHUNK = 512
_SPLIT_KEYS = {"train": 0, "test": 1}


# Signed distances in the shape's own units (radius 1), negative inside.
def _circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.sqrt(u * u + v * v) - 1.0


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) - 0.8


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # intersection of three half-planes: an equilateral triangle with circumradius 1.2
    d = v.copy()
    for ang in (np.pi / 6, 5 * np.pi / 6):
        np.maximum(d, -(np.cos(ang) * u + np.sin(ang) * v), out=d)
    return d - 0.6


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return np.minimum(np.maximum(au - 0.3, av - 1.0), np.maximum(av - 0.3, au - 1.0))


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.abs(np.sqrt(u * u + v * v) - 0.78) - 0.22


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r = np.sqrt(u * u + v * v)
    # five points: the boundary radius swings between 0.45 and 1.15 with the angle
    return r - (0.8 + 0.35 * np.cos(5 * np.arctan2(v, u)))


def _crescent(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    bite = np.sqrt((u - 0.5) ** 2 + v * v) - 0.8
    return np.maximum(np.sqrt(u * u + v * v) - 1.0, -bite)


def _bands(t: np.ndarray) -> np.ndarray:
    """Distance (in periods) to the nearest band of a square wave with duty cycle 0.5."""
    return np.abs(t - np.floor(t) - 0.5) - 0.25


_SHAPES = {0: _circle, 1: _square, 2: _triangle, 3: _cross, 4: _ring, 5: _star, 6: _crescent}


def _alpha(label: int, u: np.ndarray, v: np.ndarray, radius: np.ndarray,
           period: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage (0-1) of class ``label`` at rotated pixel offsets ``u, v``."""
    if label in _SHAPES:
        sd_px = _SHAPES[label](u / radius, v / radius) * radius
    else:
        tu, tv = u / period, v / period
        if label == 7:  # stripes
            sd_px = _bands(tu) * period
        elif label == 8:  # checkerboard: XOR of two band patterns
            a = np.clip(0.5 - _bands(tu) * period, 0, 1)
            b = np.clip(0.5 - _bands(tv) * period, 0, 1)
            return a + b - 2 * a * b
        else:  # dots on a square lattice
            fu, fv = tu - np.floor(tu) - 0.5, tv - np.floor(tv) - 0.5
            sd_px = (np.sqrt(fu * fu + fv * fv) - 0.27) * period
    return np.clip(0.5 - sd_px, 0.0, 1.0)


def _segment_alpha(px: np.ndarray, py: np.ndarray, ends: np.ndarray,
                   width: np.ndarray) -> np.ndarray:
    """Coverage of line segments (one per image; ends = x0, y0, x1, y1) of ``width`` px."""
    x0, y0, x1, y1 = (ends[:, i, None, None] for i in range(4))
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((px - x0) * dx + (py - y0) * dy) / (dx * dx + dy * dy + 1e-6), 0, 1)
    dist = np.hypot(px - (x0 + t * dx), py - (y0 + t * dy))
    return np.clip(width[:, None, None] / 2 + 0.5 - dist, 0, 1)


def _draw_chunk(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw ``len(labels)`` images (uint8, N x 3 x 32 x 32)."""
    n = len(labels)
    f32 = np.float32
    grid = np.arange(SIZE, dtype=f32) + 0.5
    px, py = grid[None, None, :], grid[None, :, None]

    # colours: uniform, independent of the class; the object differs from the background
    # by at least a quarter of the range in every channel so it is always visible
    fg = rng.random((n, 3), dtype=f32)
    bg = (fg + rng.uniform(0.25, 0.75, (n, 3)).astype(f32)) % 1.0
    bg_far = np.clip(bg + rng.uniform(-0.15, 0.15, (n, 3)).astype(f32), 0, 1)
    grad_ang = rng.uniform(0, 2 * np.pi, n).astype(f32)
    t = (np.cos(grad_ang)[:, None, None] * (px - 16) + np.sin(grad_ang)[:, None, None] * (py - 16))
    t = (t / 45.0 + 0.5)[:, None]
    # channel planes (N x 3 x H x W) while drawing, so per-image colours broadcast over long
    # contiguous rows; in-place arithmetic, as fresh arrays cost page faults, not just flops
    img = np.multiply(t, (bg_far - bg)[:, :, None, None])
    img += bg[:, :, None, None]

    # clutter: up to two thin line segments in random colours, behind the object
    for _ in range(2):
        ends = rng.uniform(-4, SIZE + 4, (n, 4)).astype(f32)
        width = rng.uniform(0.8, 1.8, n).astype(f32)
        colour = rng.random((n, 3), dtype=f32)
        on = (rng.random(n) < 0.75).astype(f32)[:, None, None, None]
        _blend(img, colour, _segment_alpha(px, py, ends, width)[:, None] * on)

    # the object: position, scale, rotation; textures get a period instead of a radius
    cx = rng.uniform(11, 21, n).astype(f32)[:, None, None]
    cy = rng.uniform(11, 21, n).astype(f32)[:, None, None]
    radius = rng.uniform(7, 12, n).astype(f32)[:, None, None]
    period = rng.uniform(4.5, 8, n).astype(f32)[:, None, None]
    ang = rng.uniform(0, 2 * np.pi, n).astype(f32)[:, None, None]
    dx, dy = px - cx, py - cy
    c, s = np.cos(ang), np.sin(ang)
    u, v = c * dx + s * dy, c * dy - s * dx
    alpha = np.empty((n, SIZE, SIZE), f32)
    for label in range(len(CLASSES)):
        idx = np.flatnonzero(labels == label)
        if len(idx):
            alpha[idx] = _alpha(label, u[idx], v[idx], radius[idx], period[idx])
    _blend(img, fg, alpha[:, None])

    return _add_noise(img, rng)


def _add_noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise on float images in [0, 1]; returns them as uint8."""
    # uniform with a per-image std of 3-12 grey levels; drawn as int8 because a float
    # normal per pixel would cost more than drawing the images
    f32 = np.float32
    std = rng.uniform(3, 12, len(img)).astype(f32)[:, None, None, None] / 255
    noise = rng.integers(-127, 128, img.shape, dtype=np.int8).astype(f32)
    noise *= std * f32(np.sqrt(3) / 127)
    img += noise
    img *= 255
    img += 0.5
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


def _blend(img: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> None:
    """In place: ``img = img * (1 - alpha) + colour * alpha`` (colour per image)."""
    delta = colour[:, :, None, None] - img
    delta *= alpha
    img += delta


def generate(n: int, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (uint8 N x 3 x 32 x 32) and balanced int64 labels, deterministic in ``seed``."""
    root = np.random.SeedSequence([seed, _SPLIT_KEYS[split]])
    n_chunks = -(-n // CHUNK)
    images = np.empty((n, 3, SIZE, SIZE), np.uint8)
    labels = np.empty(n, np.int64)
    for i, child in enumerate(root.spawn(n_chunks)):
        rng = np.random.default_rng(child)
        lo, hi = i * CHUNK, min(n, (i + 1) * CHUNK)
        # labels cycle through the classes over the whole split (exactly balanced when n is
        # a multiple of 10) and are shuffled within each chunk
        chunk_labels = rng.permutation(np.arange(lo, hi) % len(CLASSES)).astype(np.int64)
        labels[lo:hi] = chunk_labels
        images[lo:hi] = _draw_chunk(chunk_labels, rng)
    return images, labels


def load_synthetic(p: SyntheticParams) -> RawData:
    """The synthetic data set sized and seeded by ``data.synthetic.*``."""
    train_images, train_labels = generate(p.n_train, p.seed, "train")
    test_images, test_labels = generate(p.n_test, p.seed, "test")
    return RawData(train_images, train_labels, test_images, test_labels, CLASSES,
                   source="synthetic", details={"seed": p.seed})
