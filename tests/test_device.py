"""The device helper speaks for the stage that calls it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from train_data import write_processed, write_train_params

from stages.device import pick_device, resolve_settings
from stages.errors import UserError


def test_auto_logs_under_the_callers_logger_and_param(caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    caplog.set_level(logging.INFO, logger="convflow")
    pick_device("auto", logger=logging.getLogger("convflow.evaluate"))
    pick_device("auto", logger=logging.getLogger("convflow.train"), param="train.device")
    (ev, tr) = caplog.records
    assert ev.name == "convflow.evaluate" and "train.device" not in ev.getMessage()
    assert ev.getMessage().endswith("device (auto)")
    assert tr.name == "convflow.train" and tr.getMessage().endswith("(train.device: auto)")


def test_errors_quote_the_callers_param() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match=r"^predict.device: 'cuda' was asked for"):
        pick_device("cuda", logger=logging.getLogger("t"), param="predict.device")
    with pytest.raises(UserError, match=r"^device: 'tpu' is not a device name"):
        pick_device("tpu", logger=logging.getLogger("t"))


def test_auto_policy_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    s = resolve_settings(cpu)
    assert s.channels_last and not s.compile and s.precision in ("fp32", "bf16")
    assert resolve_settings(cpu, "fp32", "off", "on") == type(s)("fp32", False, True)
    with pytest.raises(UserError, match="fp16 is not supported on the CPU"):
        resolve_settings(cpu, "fp16")


def test_evaluate_stage_logs_as_evaluate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    from stages import evaluate, train

    write_processed(tmp_path / "proc", n_train=64, n_val=16)
    write_train_params(tmp_path, epochs=1, device="auto")
    monkeypatch.chdir(tmp_path)
    train.main(["--data", "proc", "--model", "m.pt", "--checkpoint", "c.pt", "--live", "live"])
    caplog.clear()
    caplog.set_level(logging.INFO, logger="convflow")
    evaluate.main(["--data", "proc", "--model", "m.pt", "--metrics", "metrics", "--out", "ev"])
    device_lines = [r for r in caplog.records if "device" in r.getMessage()
                    and r.getMessage().startswith("using")]
    assert [r.name for r in device_lines] == ["convflow.evaluate"]
    assert "train.device" not in caplog.text
    # and beside the plain accuracy, the flip + translate TTA accuracy (stages.tta)
    test = json.loads((tmp_path / "metrics/evaluate.json").read_text())["test"]
    assert {"accuracy", "accuracy_tta"} <= set(test)


_FAULTS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from stages.device import keep_freed_memory
    assert keep_freed_memory()
from stages.models import build_model
torch.set_num_threads(1)
torch.manual_seed(0)
model = build_model("seed_net", 10, [0.5] * 3, [0.25] * 3)
opt = torch.optim.Adam(model.parameters())
x = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
y = torch.randint(0, 10, (256,))
def step():
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not __import__("platform").libc_ver()[0] == "glibc", reason="glibc only")
def test_kept_memory_is_reused_without_page_faults() -> None:
    """keep_freed_memory: a seed-net step's freed activations (~7,500 pages) serve the next
    step, so a step faults in almost nothing new: 10-80 page faults per step measured. With
    glibc's defaults most runs return the memory to the OS and fault it in again, 1,000-5,000
    per step, but not every run does (its thresholds adapt), so only the kept case is
    asserted."""
    import subprocess
    import sys

    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], check=True,
                             capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1]).stdout
        return int(out.split()[-1])

    assert faults("keep") < 20 * 200  # 20 steps


_PRECISION = """
import json, torch
from stages.device import cpu_caps, cpu_flags, resolve_settings
print(json.dumps({"caps": cpu_caps(), "flags": cpu_flags(),
                  "precision": resolve_settings(torch.device("cpu")).precision}))
"""


def _auto_precision(env: dict[str, str]) -> dict:
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items()
             if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    out = subprocess.run([sys.executable, "-c", _PRECISION], env={**clean, **env},
                         cwd=Path(__file__).resolve().parents[1], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def test_auto_precision_follows_the_cpu_and_the_caps_in_force() -> None:
    """bf16 where the CPU has bf16 instructions and no cap hides them; fp32 under the AVX2
    emulation (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2) or on an AVX2-only CPU."""
    native = _auto_precision({})
    flags = native["flags"]
    has_bf16 = flags["avx512_bf16"] or flags["amx_bf16"] or flags["amx_tile"]
    assert native["precision"] == ("bf16" if has_bf16 and flags["avx512f"] else "fp32")
    assert native["caps"]["onednn_max_isa"] == ""
    capped = _auto_precision({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert capped["precision"] == "fp32"
    assert capped["caps"] == {"aten": "AVX2" if flags["avx2"] else "DEFAULT",
                              "onednn_max_isa": "AVX2"}
    # either cap alone is enough: oneDNN's convolutions or ATen's kernels would emulate bf16
    assert _auto_precision({"ONEDNN_MAX_CPU_ISA": "avx512_core"})["precision"] == "fp32"
    assert _auto_precision({"ATEN_CPU_CAPABILITY": "avx2"})["precision"] == "fp32"
