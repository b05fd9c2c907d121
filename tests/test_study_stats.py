"""Convergence diagnostics and the over-seeds verdict rule, on constructed numbers."""
import io
import math

import numpy as np
import pytest

from doremi_jax import aggregate
from doremi_jax import diagnostics


def _settled(t=400, k=4, seed=0):
  rng = np.random.default_rng(seed)
  target = np.array([0.4, 0.3, 0.2, 0.1])[:k]
  a = target + 0.002 * rng.standard_normal((t, k))
  return a / a.sum(1, keepdims=True)


def _hopping(t=400, k=4, period=30):
  """Near one-hot weights whose leader moves to the next domain every `period` steps."""
  a = np.full((t, k), 0.01)
  a[np.arange(t), (np.arange(t) // period) % k] = 1 - 0.01 * (k - 1)
  a[:t // 2, 0] += 0.5  # and the first half favours domain 0: the average drifts
  return a / a.sum(1, keepdims=True)


def test_settled_trajectory():
  d = diagnostics.weight_diagnostics(_settled())
  assert d["settled"] and d["half_drift"] < 0.002 and d["tail_drift"] < 0.002
  assert d["leader_changes"] == 0 and 3.4 < d["effective_domains"] < 4.0
  assert d["threshold"] == pytest.approx(0.1 / 4)


def test_hopping_trajectory():
  d = diagnostics.weight_diagnostics(_hopping())
  assert not d["settled"] and d["half_drift"] > 0.1 and d["tail_drift"] > 0.02
  assert d["leader_changes"] == pytest.approx(200 / 30, abs=1)
  assert d["effective_domains"] < 1.3


def test_hand_computed_drifts_and_entropy():
  a = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
  d = diagnostics.weight_diagnostics(a)
  assert d["half_drift"] == pytest.approx(0.75)  # first half [1, 0], second [0.25, 0.75]
  assert d["tail_drift"] == pytest.approx(0.625 - 0.5)  # all [0.625, 0.375], last 3 [0.5, 0.5]
  # Tail = last 2 rows: exp(H) = 1 for one-hot, 2 for uniform.
  assert d["effective_domains"] == pytest.approx(1.5, abs=1e-6)
  assert d["leader_changes"] == 1  # argmax 1, then 0 (a tie goes to the first)


def test_run_diagnostics_tail_means():
  traj = [{"domain_weights": w.tolist()} for w in _settled(t=8, k=2)]
  metrics = [{
      "domain_excess": {
          "a": e,
          "b": 0.0
      },
      "domain_loss": {
          "a": 2.0 + e,
          "b": 1.0
      },
      "domain_ref_loss": {
          "a": 2.0,
          "b": 1.5
      }
  } for e in (0.0, 0.0, 1.0, 3.0)]
  d = diagnostics.run_diagnostics(traj, metrics, ["a", "b"])
  assert d["tail_excess"] == {"a": 2.0, "b": 0.0}  # the last half: excess 1 and 3
  assert d["tail_loss_gap"] == {"a": 2.0, "b": -0.5}


def test_moving_average():
  a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
  m = diagnostics.moving_average(a, 2)
  np.testing.assert_allclose(m, [[1, 0], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])


def test_mean_sd_and_two_standard_errors():
  s = aggregate.mean_sd_se([-0.03, -0.02, -0.04])
  assert s["n"] == 3 and s["mean"] == pytest.approx(-0.03)
  assert s["sd"] == pytest.approx(0.01) and s["se"] == pytest.approx(0.01 / math.sqrt(3))
  assert aggregate.significance(s) == "better"  # |-0.03| > 2 x 0.00577
  noisy = aggregate.mean_sd_se([-0.05, 0.04, 0.0])
  assert aggregate.significance(noisy) == aggregate.NO_DIFFERENCE
  assert aggregate.significance(aggregate.mean_sd_se([0.02, 0.021, 0.019])) == "worse"
  assert aggregate.significance(aggregate.mean_sd_se([0.5])) == aggregate.PROVISIONAL


def test_summarize_groups_by_eta_and_baseline():

  def summary(da, dw, reach):
    return {
        "baselines": {
            "uniform": {
                "delta_average": da,
                "delta_worst": dw,
                "steps_to_reach": reach
            }
        }
    }

  per_seed = {
      "seed0_eta1": summary(0.1, 0.2, None),
      "seed1_eta1": summary(0.12, 0.1, 40),
      "seed0_eta0.1": summary(-0.01, 0.0, 50),
      "seed1_eta0.1": summary(0.01, 0.0, 70)
  }
  out = aggregate.summarize(per_seed)
  assert set(out) == {"1", "0.1"}
  assert out["1"]["uniform"]["average"]["mean"] == pytest.approx(0.11)
  assert out["1"]["uniform"]["average"]["verdict"] == "worse"
  assert out["0.1"]["uniform"]["average"]["verdict"] == aggregate.NO_DIFFERENCE
  assert out["0.1"]["uniform"]["steps_to_reach"]["mean"] == pytest.approx(60)
  assert out["1"]["uniform"]["steps_to_reach"]["reached"] == "1/2 seeds"


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def test_study_progress_line_and_time_left(monkeypatch):
  """Stage i of n and the study's time left: this stage's, then each later stage at its
  kind's measured length (a kind not measured yet: the mean of those measured; a reused
  run: 0). Catches a line without the study's position or an estimate that ignores it."""
  from doremi_jax import metrics  # pylint: disable=g-import-not-at-top
  from doremi_jax import pipeline  # pylint: disable=g-import-not-at-top
  kinds = pipeline._stage_kinds(1, 1, 1, 3)
  assert kinds == ["reference", "proxy", "main", "main", "main", "main"]
  assert pipeline._stage_kinds(1, 2, 1,
                               1) == ["reference", "proxy", "main", None, "proxy", "main", "main"]
  clock = [100.0]
  monkeypatch.setattr(metrics.time, "time", lambda: clock[0])
  out = _Terminal()
  assert metrics.current_study() is None
  with metrics.StudyProgress(["reference", "proxy", None, "main"]) as study:
    with study.stage("reference", "reference reference"):
      progress = metrics.Progress(100, 0, stream=out)
      clock[0] += 20.0  # 25 steps in 20 s: the stage takes 80 s, 60 s are left
      progress.update(25, 2.5, 1000.0)
      # later: proxy and main not measured, each counted as the reference's 80 s; None is 0
      assert study.left(60.0, 80.0) == 60.0 + 80.0 + 0.0 + 80.0
      progress.close()
    line = out.getvalue().split("\n")[0]
    assert line.startswith("\rstage 1/4 reference reference [##--------] 25/100 loss 2.5000")
    assert "0:01:00 left; study ~0:03:40" in line
    with study.stage("proxy", "proxy doremi"):
      assert study.label() == "stage 2/4 proxy doremi"
      study.record(10.0)
      assert study.left(5.0, 10.0) == 5.0 + 0.0 + (80.0 + 10.0) / 2
  assert metrics.current_study() is None


def test_over_seeds_report_plot_and_console_flags(tmp_path):
  """The report over seeds links its difference plot; the console carries the runs' flags.
  Catches a console that drops 'weights not settled' when several seeds ran."""
  from doremi_jax import report  # pylint: disable=g-import-not-at-top
  from tests import test_report  # pylint: disable=g-import-not-at-top
  studies, per_seed = {}, {}
  for seed, settled in ((0, True), (1, False)):
    study = test_report._study({"doremi": [3.0, 2.0, 1.5 + 0.1 * seed], "natural": [3.0, 2.5, 2.0]})
    study["rounds"][-1]["diagnostics"] = test_report._diagnostics((0.1, 0.1, 0.1), settled)
    studies[(seed, 1.0)] = study
    per_seed[f"seed{seed}_eta1"] = report.compute_summary(study)
  summary = aggregate.write(studies, per_seed, str(tmp_path))
  md = (tmp_path / "report.md").read_text()
  assert f"]({aggregate.PLOT})" in md
  assert (tmp_path / aggregate.PLOT).read_bytes().startswith(test_report.PNG_MAGIC)
  console = aggregate.console(summary, "report.md")
  assert "warning: weights not settled in 1 of 2 runs: seed1_eta1" in console


def test_a_log_line_starts_below_the_progress_line():
  # Catches a log record written onto the end of the progress line ("0:13:172026-12-04 ...").
  import logging  # pylint: disable=g-import-not-at-top
  from doremi_jax import metrics  # pylint: disable=g-import-not-at-top
  out = _Terminal()
  handler = logging.StreamHandler(out)
  root = logging.getLogger()
  root.addHandler(handler)
  try:
    progress = metrics.Progress(10, 0, stream=out)
    progress.update(5, 1.0, 10.0)
    root.warning("evaluated")
    progress.update(6, 1.0, 10.0)
    progress.close()
    root.warning("after")
  finally:
    root.removeHandler(handler)
  text = out.getvalue()
  assert "left\nevaluated\n\r[" in text.replace(" \n", "\n"), repr(text)
  assert text.endswith("left\nafter\n"), repr(text)
