"""The training split on the device, served as augmented batches (as airbench's loader).

The whole split stays on the device as uint8. Each epoch draws one permutation and the
augmentation (flips, crop offsets) from a seeded generator up front; the split is padded
once, and every batch is then one ``index_select`` of whole images and one gather that
crops and flips at once: no DataLoader, no per-sample Python. Under DDP each process takes
its slice of every global batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from stages.errors import UserError
from stages.params import TrainParams


def draw_augmentation(n: int, p: TrainParams, gen: torch.Generator,
                      device: torch.device) -> tuple[torch.Tensor | None, ...]:
    """One epoch's random flips and crop offsets, drawn up front from the seeded generator."""
    random_flip = p.augment_flip and p.flip_mode == "random"
    flip = torch.rand(n, generator=gen, device=device) < 0.5 if random_flip else None
    if p.augment_crop:
        span = 2 * p.augment_crop + 1
        dx = torch.randint(0, span, (n,), generator=gen, device=device)
        dy = torch.randint(0, span, (n,), generator=gen, device=device)
    else:
        dx = dy = None
    return flip, dx, dy


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """Index ``i`` (may lie up to ``size - 1`` outside) mirrored into ``[0, size)``, as
    ``F.pad(mode="reflect")``: -1 -> 1, size -> size - 2."""
    i = i.abs()
    return torch.where(i >= size, 2 * (size - 1) - i, i)


def pad_images(x: torch.Tensor, pad: int, fill: str = "zeros") -> torch.Tensor:
    """``x`` (uint8 N x C x H x W) with ``pad`` pixels added on each side, filled with
    zeros or mirrored (as ``F.pad(mode="reflect")``); done once per run for the loader."""
    if pad == 0:
        return x
    if fill == "zeros":
        return torch.nn.functional.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[-2:]
    rows = _reflect(torch.arange(-pad, h + pad, device=x.device), h)
    cols = _reflect(torch.arange(-pad, w + pad, device=x.device), w)
    return x[:, :, rows][:, :, :, cols]


def crop_flip(padded: torch.Tensor, flip: torch.Tensor | None, dx: torch.Tensor | None,
              dy: torch.Tensor | None, pad: int) -> torch.Tensor:
    """Crop each padded image at its corner (``dx``, ``dy`` in ``[0, 2 * pad]``) back to its
    unpadded size, then mirror those with ``flip``: one gather for the batch, the flip
    folded into the column index."""
    n, c, hp, wp = padded.shape
    h, w = hp - 2 * pad, wp - 2 * pad
    rows = torch.arange(h, device=padded.device).expand(n, h)
    cols = torch.arange(w, device=padded.device).expand(n, w)
    if flip is not None:
        cols = torch.where(flip[:, None], w - 1 - cols, cols)
    if dx is not None:
        rows, cols = rows + dy[:, None], cols + dx[:, None]
    offset = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w)
    out = torch.gather(padded.reshape(n, c, hp * wp), 2, offset.expand(n, c, h * w))
    return out.reshape(n, c, h, w)


class TrainLoader:
    """This process's augmented batches of the device-resident training split.

    ``len(loader)`` steps per epoch (the ragged last batch is dropped: one shape for the
    whole run). ``flip_mode: alternating`` is airbench94's: each image gets one random flip
    for the whole run, inverted on every odd epoch, so consecutive epochs see both sides.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, p: TrainParams, gen: torch.Generator,
                 rank: int = 0, world: int = 1, channels_last: bool = False) -> None:
        self.y, self.p, self.gen = y, p, gen
        self.n, self.device = len(x), x.device
        self.batch = min(p.batch_size, len(x))
        if self.batch % world:
            raise UserError(f"train.batch_size: {p.batch_size} does not split evenly over "
                            f"train.nproc={world} processes; use a multiple of {world}")
        self.rank, self.world, self.channels_last = rank, world, channels_last
        self.pad = p.augment_crop
        # padded once for the run (crop = one gather per batch, no bounds masks); the loader
        # keeps only this copy (x itself when there is no crop): 1.27x x at a 2-pixel crop
        self.padded = pad_images(x, self.pad, p.crop_fill)
        self.epoch = 0  # the epoch the next iteration serves
        self.base_flip = None
        if p.augment_flip and p.flip_mode == "alternating":
            # its own generator: the same flips whether or not the run was resumed
            fixed = torch.Generator(device=x.device).manual_seed(p.seed + 1)
            self.base_flip = torch.rand(len(x), generator=fixed, device=x.device) < 0.5

    def __len__(self) -> int:
        return self.n // self.batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, share = self.n, self.batch // self.world
        perm = torch.randperm(n, device=self.device, generator=self.gen)
        flip, dx, dy = draw_augmentation(n, self.p, self.gen, self.device)
        if self.base_flip is not None:
            flip = (self.base_flip ^ bool(self.epoch % 2))[perm]  # by position, as dx, dy
        self.epoch += 1
        for i in range(len(self)):
            lo = i * self.batch + self.rank * share
            idx = perm[lo:lo + share]
            # index_select copies whole images (memcpy); x[idx] goes byte by byte, ~15x slower
            xb = torch.index_select(self.padded, 0, idx)
            if flip is not None or dx is not None:
                xb = crop_flip(xb, None if flip is None else flip[lo:lo + share],
                               None if dx is None else dx[lo:lo + share],
                               None if dy is None else dy[lo:lo + share], self.pad)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, torch.index_select(self.y, 0, idx)
