"""Tests for doremi_jax.report: verdicts, interpolated steps-to-reach, files written."""
import json
import math
import os
import sys

import pytest

from doremi_jax import report
from tests import helpers

DOMAINS = ["code", "docs", "prose"]
STEPS = [0, 500, 1000]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _evals(averages, steps=STEPS):
  """Evals whose per-domain values are average -0.1, average, average +0.1."""
  out = []
  for s, a in zip(steps, averages):
    per = {d: a + off for d, off in zip(DOMAINS, (-0.1, 0.0, 0.1))}
    out.append({"step": s, "per_domain": per, "average": a, "worst": a + 0.1})
  return out


def _study(curves, steps=STEPS, rounds=1):
  """A hand-made study; curves maps each main's name to its average log-ppl per eval."""
  w = {d: 1.0 / len(DOMAINS) for d in DOMAINS}
  out_w = {"code": 0.5, "docs": 0.3, "prose": 0.2}
  rs = []
  for r in range(1, rounds + 1):
    traj = [[1 / 3, 1 / 3, 1 / 3], [0.45, 0.35, 0.2], [0.55, 0.25, 0.2]]
    avg = [[1 / 3, 1 / 3, 1 / 3], [0.4, 0.34, 0.26], [0.5, 0.3, 0.2]]
    rs.append({
        "round": r,
        "reference_weights": w if r == 1 else out_w,
        "output_weights": out_w,
        "trajectory": {
            "steps": [0, 10, 20],
            "domain_weights": traj,
            "avg_domain_weights": avg
        },
        "max_abs_change": 0.17
    })
  mains = {
      n: {
          "weights": out_w if n == "doremi" else w,
          "evals": _evals(c, steps)
      } for n, c in curves.items()
  }
  return {
      "name": "test_study",
      "mixture": "demo",
      "domains": DOMAINS,
      "config": {
          "proxy": {
              "layers": 2,
              "d_model": 64
          },
          "eta": 1.0,
          "c": 1e-3
      },
      "rounds": rs,
      "converged": False,
      "mains": mains,
      "equal_compute": {
          "train_steps": 1000,
          "batch_size": 8,
          "seq_len": 128,
          "tokens": 1024000
      }
  }


def _write(tmp_path, curves, **kwargs):
  """Writes the report of `_study(curves, **kwargs)` to tmp_path: (study, summary, natural's
  comparison)."""
  study = _study(curves, **kwargs)
  summary = report.write_report(study, str(tmp_path))
  return study, summary, summary["baselines"].get("natural")


def _read(out_dir):
  with open(os.path.join(out_dir, "report.md")) as f:
    md = f.read()
  with open(os.path.join(out_dir, "summary.json")) as f:
    summary = json.load(f)
  return md, summary


def test_verdict_rule():
  assert report.verdict(1.0, 2.0)["verdict"] == "better"
  assert report.verdict(2.0, 1.0)["verdict"] == "worse"
  assert report.verdict(2.009, 2.0)["verdict"] == "equal"  # 0.45% <= 0.5%
  assert report.verdict(2.011, 2.0)["verdict"] == "worse"  # 0.55% > 0.5%
  assert report.verdict(2.011, 2.0, tolerance=0.01)["verdict"] == "equal"
  v = report.verdict(1.5, 2.0)
  assert v["delta"] == pytest.approx(-0.5) and v["relative"] == pytest.approx(-0.25)
  assert report.verdict(float("nan"), 2.0)["verdict"] == "diverged"
  assert report.verdict(2.0, float("nan"))["verdict"] == "better"


def test_steps_to_reach_interpolates():
  # Target 2.25 lies between (0, 3.0) and (500, 2.0): 0.75 / 1.0 * 500 = 375.
  assert report.steps_to_reach([0, 500, 1000], [3.0, 2.0, 1.5], 2.25) == pytest.approx(375)
  assert report.steps_to_reach([0, 500, 1000], [3.0, 2.0, 1.5], 1.75) == pytest.approx(750)
  assert report.steps_to_reach([0, 500], [3.0, 2.0], 1.0) is None
  assert report.steps_to_reach([100], [1.0], 2.0) == 100  # single eval point
  assert report.steps_to_reach([0, 500], [float("nan"), 1.0], 2.0) == 500
  assert report.steps_to_reach([0, 500], [3.0, 2.0], float("nan")) is None


def test_doremi_better(tmp_path):
  _, summary, nat = _write(tmp_path, {
      "doremi": [3.0, 2.0, 1.5],
      "natural": [3.0, 2.5, 2.25],
      "uniform": [3.0, 2.4, 2.0]
  })
  uni = summary["baselines"]["uniform"]
  assert nat["verdict_average"] == nat["verdict_worst"] == "better"
  assert nat["delta_average"] == pytest.approx(-0.75)
  assert nat["delta_worst"] == pytest.approx(-0.75)
  assert nat["domains_better"] == 3
  assert nat["steps_to_reach"] == pytest.approx(375)  # hand-computed above
  assert nat["fraction_of_steps"] == pytest.approx(0.375)
  assert nat["speedup"] == pytest.approx(1000 / 375)
  assert uni["steps_to_reach"] == pytest.approx(500)
  assert uni["speedup"] == pytest.approx(2.0)
  assert summary["better_than_all_baselines"] is True
  assert summary["doremi_weights"] == {"code": 0.5, "docs": 0.3, "prose": 0.2}
  assert summary["final"]["natural"]["average"] == pytest.approx(2.25)
  md, loaded = _read(tmp_path)
  assert loaded == summary  # round-trips
  assert "better on 3/3 domains" in md
  assert "reaches natural's final average at step 375, 38% of steps (2.67x)" in md
  assert "**1.5000**" in md  # best average in bold
  assert "did not beat every baseline" not in md


def test_doremi_worse(tmp_path):
  _, summary, nat = _write(tmp_path, {"doremi": [3.0, 2.6, 2.4], "natural": [3.0, 2.2, 2.0]})
  assert nat["verdict_average"] == nat["verdict_worst"] == "worse"
  assert nat["delta_average"] == pytest.approx(0.4)
  assert nat["steps_to_reach"] is None
  assert nat["fraction_of_steps"] is None and nat["speedup"] is None
  assert nat["domains_better"] == 0
  md, _ = _read(tmp_path)
  assert "**worse** by 0.4000 nats (20.00%)" in md
  assert "never reached natural's final average within the run" in md
  assert "DoReMi did not beat every baseline" in md
  assert "Aioli, ICLR 2025" in md and "UtiliMax, 2025" in md
  assert "280M proxy" in md and "tiny CPU demo runs" in md


def test_equal_within_tolerance(tmp_path):
  study, summary, nat = _write(tmp_path, {"doremi": [3.0, 2.5, 2.005], "natural": [3.0, 2.5, 2.0]})
  assert nat["verdict_average"] == nat["verdict_worst"] == "equal"
  assert nat["delta_average"] == pytest.approx(0.005)
  assert summary["better_than_all_baselines"] is False
  md, _ = _read(tmp_path)
  assert "**equal**: differs by 0.0050 nats (0.25%), within the 0.5% tolerance" in md
  assert "0.5% of the baseline's value" in md and "noise" in md
  # A looser tolerance is a parameter; a tighter one turns the verdict to worse.
  tight = report.compute_summary(study, tolerance=0.001)
  assert tight["baselines"]["natural"]["verdict_average"] == "worse"


def test_plots_are_valid_pngs(tmp_path):
  _write(tmp_path, {"doremi": [3.0, 2.0, 1.5], "natural": [3.0, 2.5, 2.25]}, rounds=2)
  md, _ = _read(tmp_path)
  names = [
      "weight_trajectories.png", "final_log_ppl.png", "log_ppl_vs_steps.png", "final_weights.png"
  ]
  for name in names:
    path = tmp_path / "plots" / name
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000, name
    assert f"](plots/{name})" in md  # relative link
  assert "DoReMi round 1" in md and "DoReMi round 2" in md


def test_only_doremi(tmp_path):
  _, summary, _ = _write(tmp_path, {"doremi": [3.0, 2.0, 1.5]})
  assert summary["baselines"] == {}
  assert summary["better_than_all_baselines"] is False
  md, loaded = _read(tmp_path)
  assert loaded == summary
  assert "No baselines in this study: no comparison." in md
  assert (tmp_path / "plots" / "log_ppl_vs_steps.png").exists()


def test_single_eval_point(tmp_path):
  _, summary, nat = _write(tmp_path, {"doremi": [1.5], "natural": [2.0]}, steps=[1000])
  assert nat["verdict_average"] == "better"
  assert nat["steps_to_reach"] == 1000 and nat["speedup"] == pytest.approx(1.0)


def test_nan_doremi_is_diverged(tmp_path):
  _, summary, nat = _write(tmp_path, {
      "doremi": [3.0, 2.0, float("nan")],
      "natural": [3.0, 2.5, 2.25]
  })
  assert nat["verdict_average"] == nat["verdict_worst"] == "diverged"
  assert nat["delta_average"] is None
  assert summary["final"]["doremi"]["diverged"] is True
  assert summary["final"]["doremi"]["average"] is None
  md, loaded = _read(tmp_path)
  assert loaded == summary
  assert "NaN (diverged)" in md and "**diverged**" in md
  assert "DoReMi did not beat every baseline" in md


def test_nan_baseline_counts_as_better(tmp_path):
  _, summary, nat = _write(tmp_path, {
      "doremi": [3.0, 2.0, 1.5],
      "natural": [3.0, float("nan"), float("nan")]
  })
  assert nat["verdict_average"] == "better" and nat["baseline_diverged"] is True
  assert nat["steps_to_reach"] is None
  assert nat["domains_better"] == 3
  md, _ = _read(tmp_path)
  assert "natural diverged" in md
  assert all(not (isinstance(v, float) and math.isnan(v)) for v in nat.values())


def test_imports_no_jax():
  """report.py stays import-light: no jax, tensorflow or pyplot."""
  code = ("import sys; from doremi_jax import report; "
          "assert not {'jax', 'tensorflow', 'matplotlib.pyplot'} & set(sys.modules)")
  helpers.run([sys.executable, "-c", code])
