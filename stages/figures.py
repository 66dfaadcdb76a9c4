"""The pipeline's figures as pure functions: arrays in, a matplotlib ``Figure`` out.

No pyplot and no global state: each function builds a ``Figure`` on matplotlib's Agg
canvas, so figures render the same headless, in tests and on servers. Saving is the plot
stage's job (:mod:`stages.plot`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: The tutorial's two 3 x 3 kernels.
BLUR_KERNEL = np.ones((3, 3), dtype=np.float64)
EDGE_KERNEL = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)

#: The 4 x 4 feature map of the max-pooling illustration (the classic textbook example).
POOL_EXAMPLE = np.array([[1, 1, 2, 4], [5, 6, 7, 8], [3, 2, 1, 0], [1, 2, 3, 4]])

WRONG_COLOUR = "#c62828"
RIGHT_COLOUR = "#1b5e20"


def new_figure(width: float, height: float, dpi: int) -> Figure:
    """A Figure with constrained layout (no overlapping text) on an Agg canvas."""
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# ----------------------------------------------------------------------------- pure maths
def to_gray(image: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 -> H x W float luminance in 0-255 (ITU-R BT.601 weights)."""
    return np.asarray(image, np.float64) @ np.array([0.299, 0.587, 0.114])


def convolve2d(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2-D convolution of a gray image, same size out, borders padded by repeating the edge.

    Edge padding (not zeros) keeps the edge kernel from drawing a frame around every image.
    """
    kernel = np.asarray(kernel, np.float64)[::-1, ::-1]  # convolution flips the kernel
    kh, kw = kernel.shape
    padded = np.pad(np.asarray(image, np.float64), ((kh // 2, kh // 2), (kw // 2, kw // 2)),
                    mode="edge")
    h, w = image.shape
    out = np.zeros((h, w), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            out += kernel[i, j] * padded[i:i + h, j:j + w]
    return out


def max_pool(feature_map: np.ndarray, size: int = 2) -> np.ndarray:
    """Non-overlapping ``size`` x ``size`` max pooling (stride = size) of a 2-D map."""
    h, w = feature_map.shape
    if h % size or w % size:
        raise ValueError(f"a {h}x{w} map does not tile into {size}x{size} windows")
    return feature_map.reshape(h // size, size, w // size, size).max(axis=(1, 3))


def filters_to_rgb(weights: np.ndarray) -> np.ndarray:
    """Conv weights (out x in x k x k) -> displayable out x k x k x 3 in [0, 1], each filter
    scaled on its own so weak and strong filters are both visible."""
    w = np.asarray(weights, np.float64)
    if w.shape[1] == 1:
        w = np.repeat(w, 3, axis=1)
    w = w[:, :3].transpose(0, 2, 3, 1)
    lo = w.min(axis=(1, 2, 3), keepdims=True)
    hi = w.max(axis=(1, 2, 3), keepdims=True)
    return (w - lo) / np.where(hi > lo, hi - lo, 1.0)


def grid_shape(n: int, max_cols: int = 10) -> tuple[int, int]:
    """Rows and columns for ``n`` panels, at most ``max_cols`` per row."""
    cols = max(1, min(n, max_cols))
    return (n + cols - 1) // cols, cols


# ----------------------------------------------------------------------------- figures
def loss_history_figure(iterations: Sequence[float], losses: Sequence[float],
                        dpi: int) -> Figure:
    """The tutorial's training loss per logged iteration."""
    fig = new_figure(8, 4.5, dpi)
    ax = fig.add_subplot()
    ax.plot(iterations, losses, color="#1565c0", linewidth=1.2)
    ax.set_title("Global loss for the CNN model")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.grid(alpha=0.3)
    return fig


def image_strip_figure(images: np.ndarray, labels: Sequence[str], title: str, dpi: int,
                       true_labels: Sequence[str] | None = None) -> Figure:
    """Images (N x H x W x 3 uint8) with a label each; with ``true_labels`` the labels are
    predictions and wrong ones are marked in red with the true class."""
    n = len(images)
    rows, cols = grid_shape(n)
    fig = new_figure(1.3 * cols + 0.2, 1.65 * rows + 0.5, dpi)
    fig.suptitle(title)
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(images[k], interpolation="nearest")
        if true_labels is None:
            ax.set_title(labels[k], fontsize=9)
        elif labels[k] == true_labels[k]:
            ax.set_title(f"{labels[k]}\n(correct)", fontsize=9, color=RIGHT_COLOUR)
        else:
            ax.set_title(f"✗ {labels[k]}\ntrue: {true_labels[k]}", fontsize=9,
                         color=WRONG_COLOUR)
    return fig


def kernel_demo_figure(image: np.ndarray, dpi: int, caption: str = "") -> Figure:
    """A dataset image beside its 3x3 all-ones blur and its 0,1,0/1,-4,1/0,1,0 edge map."""
    gray = to_gray(image)
    panels = [
        ("original", image, None),
        ("blur: 3×3 all-ones kernel\n[1 1 1] [1 1 1] [1 1 1]", convolve2d(gray, BLUR_KERNEL),
         "gray"),
        ("edges: Laplacian kernel\n[0 1 0] [1 −4 1] [0 1 0]", convolve2d(gray, EDGE_KERNEL),
         "gray"),
    ]
    fig = new_figure(10, 4.2, dpi)
    fig.suptitle("Convolution kernels applied to a dataset image" + (f" ({caption})"
                                                                      if caption else ""))
    for ax, (name, img, cmap) in zip(fig.subplots(1, 3), panels, strict=True):
        # imshow rescales each result to its own min..max, as the tutorial's plots do
        ax.imshow(img, cmap=cmap, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    return fig


def max_pooling_figure(dpi: int, feature_map: np.ndarray = POOL_EXAMPLE) -> Figure:
    """A 4x4 feature map, its 2x2 windows coloured, pooled to 2x2 with the values shown."""
    pooled = max_pool(feature_map, 2)
    colours = np.array([["#bbdefb", "#ffe0b2"], ["#c8e6c9", "#f8bbd0"]])
    fig = new_figure(8, 4.2, dpi)
    fig.suptitle("Max pooling: 2×2 window, stride 2 (4×4 → 2×2)")
    left, right = fig.subplots(1, 2, width_ratios=[2, 1.4])
    for ax, grid, cell in ((left, feature_map, 2), (right, pooled, 1)):
        h, w = grid.shape
        for i in range(h):
            for j in range(w):
                window_max = cell == 1 or grid[i, j] == pooled[i // 2, j // 2]
                ax.add_patch(_cell(j, h - 1 - i, colours[i // cell, j // cell]))
                ax.text(j + 0.5, h - 0.5 - i, str(grid[i, j]), ha="center", va="center",
                        fontsize=16, fontweight="bold" if window_max else "normal")
        ax.set_xlim(0, w)
        ax.set_ylim(0, h)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    left.set_title("feature map (4×4)\neach colour is one 2×2 window; bold = its max",
                   fontsize=10)
    right.set_title("pooled (2×2)\nthe max of each window", fontsize=10)
    return fig


def _cell(x: float, y: float, colour: str) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), 1, 1, facecolor=colour, edgecolor="#424242", linewidth=1.5)


def accuracy_figure(series: dict[str, tuple[Sequence[float], Sequence[float]]],
                    dpi: int) -> Figure:
    """Accuracy per epoch, one line per split (``{"train": (epochs, acc), "validation": ...}``)."""
    fig = new_figure(7, 4.5, dpi)
    ax = fig.add_subplot()
    for name, (epochs, acc) in series.items():
        ax.plot(epochs, acc, marker="o", label=name)
    ax.set_title("Accuracy per epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def confusion_figure(cm: np.ndarray, classes: Sequence[str], dpi: int) -> Figure:
    """Heatmap of test counts: true class down, predicted class across, counts in cells."""
    n = len(classes)
    side = max(5.0, 0.6 * n + 2.5)
    fig = new_figure(side + 1.2, side, dpi)
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, shrink=0.8, label="test images")
    ax.set_xticks(range(n), labels=classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels=classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix (test set, accuracy {np.trace(cm) / max(cm.sum(), 1):.1%})")
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > threshold else "black")
    return fig


def filters_figure(weights: np.ndarray, dpi: int,
                   title: str = "Learned first-layer filters") -> Figure:
    """The first-layer convolution filters as small RGB images (``title`` says what they are:
    learned, or an airbench net's fixed whitening)."""
    rgb = filters_to_rgb(weights)
    rows, cols = grid_shape(len(rgb), 8)
    k = weights.shape[-1]
    fig = new_figure(1.3 * cols + 0.3, 1.4 * rows + 0.6, dpi)
    fig.suptitle(f"{title} ({len(rgb)} × {weights.shape[1]}×{k}×{k}, "
                 "each scaled to its own range)")
    for idx, ax in enumerate(fig.subplots(rows, cols, squeeze=False).flat):
        ax.axis("off")
        if idx < len(rgb):
            ax.imshow(rgb[idx], interpolation="nearest")
            ax.set_title(f"filter {idx}", fontsize=9)
    return fig


def wrong_grid_figure(images: np.ndarray, entries: Sequence[dict[str, Any]],
                      classes: Sequence[str], dpi: int) -> Figure:
    """The most confidently wrong test images, with true class, prediction and confidence."""
    n = len(images)
    if n == 0:
        fig = new_figure(6, 2, dpi)
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "No misclassified test images", ha="center", va="center",
                fontsize=14)
        return fig
    rows, cols = grid_shape(n, 8)
    fig = new_figure(1.45 * cols + 0.2, 1.85 * rows + 0.5, dpi)
    fig.suptitle("Most confidently wrong test images")
    for k, ax in enumerate(fig.subplots(rows, cols, squeeze=False).flat):
        ax.axis("off")
        if k >= n:
            continue
        e = entries[k]
        ax.imshow(images[k], interpolation="nearest")
        ax.set_title(f"true: {classes[e['actual']]}\npred: {classes[e['predicted']]}\n"
                     f"({e['confidence']:.0%}, #{e['index']})", fontsize=8, color=WRONG_COLOUR)
    return fig
