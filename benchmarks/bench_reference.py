"""The tutorial's training loop, the reference ``bench_train.py`` compares the stage's
loop with: float32 NCHW tensors, ``DataLoader`` at batch 64, Adam 1e-3, no augmentation."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (DDP workers): the work done,
    which a busy machine's other processes do not inflate the way they inflate wall time."""
    import resource

    own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                  resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def tutorial_net() -> torch.nn.Sequential:
    """The tutorial's network as it writes it: conv, ReLU, ``nn.MaxPool2d`` in that order
    (the stage's ``SeedNet`` pools before the ReLU: the same function, less work)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.BatchNorm2d(16), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def reference(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
              test_y: np.ndarray, budget: float) -> dict[str, float]:
    """The tutorial's loop: float32 tensors, DataLoader batch 64, Adam 1e-3, until the budget."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x = torch.tensor(train_x, dtype=torch.float32) / 255.0
    y = torch.tensor(train_y, dtype=torch.long)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    net = tutorial_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    seen, t0, c0 = 0, time.perf_counter(), _cpu_seconds()
    done = False
    while not done:
        for xb, yb in loader:
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(xb)
            if time.perf_counter() - t0 >= budget:
                done = True
                break
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    net.eval()
    with torch.no_grad():
        xt = torch.tensor(test_x, dtype=torch.float32) / 255.0
        pred = torch.cat([net(xt[i:i + 1000]).argmax(1) for i in range(0, len(xt), 1000)])
    return {"img_per_s": seen / seconds, "seconds": seconds, "img_per_cpu_s": seen / cpu,
            "epochs": seen / len(x), "test_acc": float((pred.numpy() == test_y).mean())}
