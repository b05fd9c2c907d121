"""bench/bench_device.py: its tiny form runs on CPU and prints every figure; its peak table."""
import os
import re
import sys
import types

import pytest

from tests import helpers

sys.path.insert(0, os.path.join(helpers.ROOT, "bench"))
import bench_device  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.parametrize(
    "kind, tflops",
    [
        ("TPU v5 lite", 197),  # v5e: a "TPU v5" prefix match would give v5p's 459
        ("TPU v5", 459),
        ("TPU v5p", 459),
        ("TPU v6 lite", 918),
        ("TPU v4", 275),
        ("NVIDIA H200", 989),
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
    ])
def test_peak_table_by_device_kind(kind, tflops):
  flops, note = bench_device.peak_flops(types.SimpleNamespace(device_kind=kind))
  assert flops == tflops * 1e12 and "(table)" in note


def test_tiny_runs_on_cpu_and_prints_every_figure():
  """The whole benchmark on the tiny model, two CPU devices (an FSDP mesh of 2): catches a
  figure that is missing, zero or not a number, and a settings line that is not stated."""
  proc = helpers.run([sys.executable, "bench/bench_device.py", "--tiny"],
                     env=helpers.child_env(devices=2), timeout=600)
  out = proc.stdout
  assert "on 2 x cpu" in out and "peak unknown" in out  # CPU: a measured matmul, stated
  for impl in ("einsum", "xla"):
    assert f"compute bfloat16, remat none, logits_chunk 0, attention {impl}" in out
    row = re.search(
        rf"^tiny\s+{impl}\s+(\d+)x128\s+([\d,]+)\s+([\d.]+)%\s+([\d,]+)\s+"
        rf"([\d.]+)%\s+([\d.]+)\s+([\d.]+) GiB\s+n/a\s+([\d,]+)$", out, re.M)
    assert row, out
    batch, train_tps, train_mfu, proxy_tps, proxy_mfu, overhead, est, decode = row.groups()
    assert int(batch) == 16
    for figure in (train_tps, train_mfu, proxy_tps, proxy_mfu, overhead, est, decode):
      assert float(figure.replace(",", "")) > 0, out
    assert 0.3 < float(overhead) < 3.0, out  # proxy ~ train + a forward: not off by a factor
  m = re.search(
      r"input \(tiny, demo_natural store, B=16 L=128\): ([\d,]+) tokens/s per host = "
      r"([\d.,]+)x the fastest train step's per-host demand", out)
  assert m and float(m.group(1).replace(",", "")) > 0, out
