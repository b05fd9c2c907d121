"""Tests for doremi_jax.report: verdicts, interpolated steps-to-reach, files written."""
import json
import math
import os
import sys

from matplotlib.figure import Figure
import pytest

from doremi_jax import curves
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
  assert "280M proxy" in md and "1000 steps per main model (0.50% of the paper's)" in md


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


# ------------------------------------------------ sentences from numbers, flags, plots


def _diagnostics(gap, settled=True):
  return {
      "settled": settled,
      "half_drift": 0.02 if settled else 0.2,
      "threshold": 0.0333,
      "tail_drift": 0.01,
      "effective_domains": 2.5,
      "leader_changes": 0,
      "tail_excess": {
          d: 0.1 for d in DOMAINS
      },
      "tail_loss_gap": dict(zip(DOMAINS, gap))
  }


@pytest.mark.parametrize("gap, expected, absent", [
    ((0.2, 0.1, 0.05), "positive on every domain: the proxy has not caught up", "negative"),
    ((0.2, 0.1, -0.0574), "positive on 2 of 3 domains (code, docs", "every domain"),
    ((-0.2, -0.1, -0.05), "negative on every domain", "positive"),
])
def test_loss_gap_sentence_follows_the_signs(tmp_path, gap, expected, absent):
  # Catches a fixed sentence: the report said "positive on every domain" above a
  # table with a negative row (prose -0.0574).
  study = _study({"doremi": [3.0, 2.0, 1.5], "natural": [3.0, 2.5, 2.25]})
  study["rounds"][-1]["diagnostics"] = _diagnostics(gap)
  report.write_report(study, str(tmp_path))
  md, _ = _read(tmp_path)
  sentence = md.split("the proxy's loss minus the reference's (")[1].split(").")[0]
  assert expected in sentence and absent not in sentence, sentence


def _console(summary):
  from doremi_jax import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.console_summary(summary, "report.md")


def test_flags_are_computed_and_reach_the_console(tmp_path):
  # Catches a console that leaves out a flag the report raises, or a flag that does not
  # follow the numbers (settled weights must not be called unsettled).
  study = _study({"doremi": [3.0, 2.6, 2.4], "natural": [3.0, 2.2, 2.0]})
  study["rounds"][-1]["diagnostics"] = _diagnostics((0.1, 0.1, 0.1), settled=False)
  summary = report.write_report(study, str(tmp_path))
  md, _ = _read(tmp_path)
  flags = report.flags(summary)
  assert any("weights not settled" in f and "0.2000 > 0.0333" in f for f in flags), flags
  assert any("did not beat every baseline" in f and "natural" in f for f in flags), flags
  glance = md.split("**At a glance:**")[1].split("## ")[0]
  console = _console(summary)
  for f in flags:
    assert f"- {f}" in glance and f"warning: {f}" in console
  study["rounds"][-1]["diagnostics"] = _diagnostics((0.1, 0.1, 0.1), settled=True)
  study["mains"]["doremi"]["evals"] = _evals([3.0, 2.0, 1.5])
  calm = report.compute_summary(study)
  assert report.flags(calm) == [] and "warning" not in _console(calm)
  assert "At a glance" not in report.render_markdown(study, calm, {})


def _bar_heights(fig):
  return [p.get_height() for p in fig.axes[0].patches]


def test_final_plot_shows_differences_from_the_baseline():
  # Catches absolute bars: values near 2.8 hide differences of 0.06.
  summary = report.compute_summary(
      _study({
          "doremi": [3.0, 2.9, 2.74],
          "natural": [3.0, 2.9, 2.80],
          "uniform": [3.0, 2.9, 2.86]
      }))
  fig = report.final_ppl_figure(summary)
  heights = _bar_heights(fig)
  assert len(heights) == 2 * (len(DOMAINS) + 2)  # doremi and uniform minus natural
  assert heights[:len(DOMAINS) + 2] == pytest.approx([-0.06] * (len(DOMAINS) + 2))
  assert heights[len(DOMAINS) + 2:] == pytest.approx([0.06] * (len(DOMAINS) + 2))
  assert "natural" in fig.axes[0].get_title()
  assert report.final_ppl_figure(report.compute_summary(_study({"doremi": [3.0]},
                                                               steps=[0]))) is None


def test_curves_plot_draws_differences_and_keeps_every_line_visible():
  # Catches identical styles: an identical curve drawn on top hid the one below.
  study = _study({
      "doremi": [3.0, 2.5, 2.25],
      "natural": [3.0, 2.5, 2.25],
      "uniform": [3, 2.6, 2.3]
  })
  fig = report.curves_figure(study)
  left, right = fig.axes
  styles = {(l.get_linestyle(), l.get_marker()) for l in left.get_lines()}
  assert len(styles) == 3
  diffs = {l.get_label(): list(l.get_ydata()) for l in right.get_lines() if l.get_label()[0] != "_"}
  assert diffs["doremi"] == pytest.approx([0, 0, 0])
  assert diffs["uniform"] == pytest.approx([0, 0.1, 0.05])
  assert "natural" not in diffs  # the baseline is the zero line


def test_over_seed_plot_has_spread_bars(tmp_path):
  # Catches a plot without the over-seed spread: each bar carries a +-sd error bar.
  from doremi_jax import aggregate  # pylint: disable=g-import-not-at-top
  per_seed = {
      f"seed{s}_eta1": {
          "baselines": {
              "natural": {
                  "delta_average": d,
                  "delta_worst": 2 * d,
                  "steps_to_reach": None
              }
          }
      } for s, d in enumerate((-0.1, -0.2, -0.3))
  }
  fig = aggregate.deltas_figure(aggregate.summarize(per_seed))
  assert _bar_heights(fig) == pytest.approx([-0.2, -0.4])
  caps = [c for c in fig.axes[0].containers if getattr(c, "errorbar", None)]
  seg = caps[0].errorbar.lines[2][0].get_segments()[0]
  assert abs(seg[1][1] - seg[0][1]) == pytest.approx(2 * 0.1)  # one sd either side
  path = aggregate._write_plot(fig, str(tmp_path / "plots" / "d.png"))
  assert open(path, "rb").read().startswith(PNG_MAGIC)
  assert isinstance(fig, Figure) and curves.baseline_of(["doremi"]) is None
