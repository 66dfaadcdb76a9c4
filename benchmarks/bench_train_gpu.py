"""``bench_train.py --gpu``: the seed net's epoch time and airbench's time to accuracy on
CUDA (README.md, Training)."""

from __future__ import annotations

import time

import numpy as np
import torch
from bench_train import _fmt, channel_stats

from stages.loop import Dataset, fit, validate
from stages.params import TrainParams

#: GPU recipes: the seed net at a large batch (speed), and airbench (accuracy).
GPU_SEED = dict(model="seed_net", batch_size=2048, optimizer="adam", lr=0.01,
                schedule="onecycle", augment_flip=True, augment_crop=2, precision="bf16",
                channels_last="on", compile="on", log_every=1000)
GPU_AIRBENCH = dict(model="airbench", batch_size=1024, optimizer="sgd", lr=0.2, momentum=0.85,
                    weight_decay=5e-4, schedule="onecycle", label_smoothing=0.2,
                    augment_flip=True, augment_crop=2, precision="bf16", channels_last="on",
                    compile="on", log_every=1000)


def gpu_mode(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray
             ) -> dict[str, dict]:
    """Seed-net seconds per 50k-image epoch, and airbench's time to its test accuracy."""
    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    device = torch.device("cuda")
    out = {"device": {"name": torch.cuda.get_device_name(0)}}
    print("device:", out["device"]["name"])
    # epoch 1 includes compilation; the per-epoch times after it are the steady state
    mean, std = channel_stats(train_x)
    data = Dataset(train_x, train_y, train_x[:0], train_y[:0], [str(i) for i in range(10)],
                   mean, std)
    for name, recipe, epochs in (("seed_net", GPU_SEED, 6), ("airbench", GPU_AIRBENCH, 10)):
        p = TrainParams(**{**recipe, "epochs": epochs})
        t0 = time.perf_counter()
        result = fit(p, data, device)
        total = time.perf_counter() - t0
        times = result.epoch_seconds
        xt = torch.from_numpy(test_x).to(device)
        yt = torch.from_numpy(np.asarray(test_y, np.int64)).to(device)
        _, acc = validate(result.model, xt, yt, result.settings)
        out[name] = {"epochs": epochs, "epoch_times": times,
                     "steady_epoch_s": float(np.median(times[1:])) if len(times) > 1 else None,
                     "total_s_incl_compile": total, "test_acc": acc}
        print(f"{name}: {_fmt({k: v for k, v in out[name].items() if k != 'epoch_times'})}")
    return out
