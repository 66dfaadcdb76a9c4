"""Test-time augmentation: a model's logits averaged over mirrored and translated views.

As airbench94.py's ``infer_mirror_translate`` (KellerJordan/cifar10-airbench): level 0 =
the image; 1 = the mean of the image and its mirror; 2 = half of level 1, plus half the
mean of level 1 on the image translated one pixel up-left and one pixel down-right
(reflect-padded): 6 views, weights 1/4, 1/4, 1/8 x 4.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LEVELS = (0, 1, 2)


def _mirror(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return 0.5 * model(x).float() + 0.5 * model(x.flip(-1)).float()


def tta_logits(model: nn.Module, x: torch.Tensor, level: int = 2) -> torch.Tensor:
    """Logits of ``model`` on the batch ``x`` (N x C x H x W) averaged over the TTA views."""
    if level == 0:
        return model(x).float()
    if level == 1:
        return _mirror(model, x)
    h, w = x.shape[-2:]
    padded = F.pad(x.float(), (1, 1, 1, 1), mode="reflect")
    shifted = [padded[..., 0:h, 0:w], padded[..., 2:h + 2, 2:w + 2]]
    translated = torch.stack([_mirror(model, s) for s in shifted]).mean(0)
    return 0.5 * _mirror(model, x) + 0.5 * translated


@torch.inference_mode()
def tta_accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int,
                 device: torch.device | str = "cpu", level: int = 2) -> float:
    """Accuracy of ``model`` on uint8 N x C x H x W ``images`` with TTA at ``level``."""
    model = model.to(device).eval()
    x_all = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    y_all = torch.from_numpy(np.asarray(labels, np.int64)).to(device)
    correct = 0
    for i in range(0, len(x_all), batch_size):
        pred = tta_logits(model, x_all[i:i + batch_size], level).argmax(1)
        correct += int((pred == y_all[i:i + batch_size]).sum())
    return correct / max(1, len(x_all))
