"""The report's downstream section and the verdicts over seeds, on hand-computed studies."""
import json
import os

import pytest

from doremi_jax import aggregate
from doremi_jax import curves
from doremi_jax import report
from doremi_jax import report_downstream
from tests import test_report


def _history(points, tasks=("qa", "cloze")):
  """Downstream records: points maps step -> (qa, cloze) exact match; average their mean."""
  return [{
      "step": s,
      "suite": "demo",
      "tasks": dict(zip(tasks, v)),
      "average": sum(v) / len(v),
      "examples": {
          t: 200 for t in tasks
      }
  } for s, v in points.items()]


def _study():
  study = test_report._study({"doremi": [3.0, 2.0, 1.5], "natural": [3.0, 2.5, 2.0]})
  study["mains"]["doremi"]["downstream"] = _history({500: (10.0, 20.0), 1000: (30.0, 40.0)})
  study["mains"]["natural"]["downstream"] = _history({500: (5.0, 15.0), 1000: (20.0, 50.0)})
  study["downstream"] = {"suite": "demo", "description": "Two hand-made tasks."}
  return study


def test_steps_to_reach_higher_is_better():
  assert curves.steps_to_reach([0, 100, 200], [0.0, 10.0, 30.0], 20.0,
                               higher_is_better=True) == pytest.approx(150)
  assert curves.steps_to_reach([0, 100], [0.0, 10.0], 11.0, higher_is_better=True) is None
  assert curves.steps_to_reach([0, 100], [5.0, 10.0], 4.0, higher_is_better=True) == 0


def test_compute_deltas_tasks_and_steps_to_reach():
  ds = report_downstream.compute(_study())
  assert ds["tasks"] == ["cloze", "qa"]
  assert ds["final"]["doremi"]["average"] == pytest.approx(35.0)
  natural = ds["baselines"]["natural"]
  assert natural["delta_average"] == pytest.approx(0.0)  # 35 - 35
  assert natural["delta_tasks"] == {"cloze": pytest.approx(-10.0), "qa": pytest.approx(10.0)}
  assert natural["tasks_better"] == 1 and natural["num_tasks"] == 2
  # DoReMi's average: 15 at step 500, 35 at 1000; natural's final 35 is reached at 1000.
  assert natural["steps_to_reach"] == pytest.approx(1000)
  assert natural["fraction_of_steps"] == pytest.approx(1.0)


def test_steps_to_reach_interpolates_downstream():
  study = _study()
  study["mains"]["natural"]["downstream"] = _history({1000: (20.0, 30.0)})  # final 25
  natural = report_downstream.compute(study)["baselines"]["natural"]
  assert natural["steps_to_reach"] == pytest.approx(750)  # 15 -> 35 over 500..1000
  assert natural["speedup"] == pytest.approx(1000 / 750)


def test_a_baseline_at_zero_has_no_steps_to_reach():
  study = _study()
  study["mains"]["natural"]["downstream"] = _history({1000: (0.0, 0.0)})
  natural = report_downstream.compute(study)["baselines"]["natural"]
  assert natural["steps_to_reach"] is None and natural["delta_average"] == pytest.approx(35.0)
  assert natural["reach_status"] == "baseline_zero"
  md = report_downstream.section_md(study, report_downstream.compute(study))
  assert "| `natural` | +35.00 | 2/2 | - (the baseline scored 0) |" in md
  assert "One example is 0.5 points" in md and "at the floor" not in md
  study["mains"]["doremi"]["downstream"] = _history({1000: (0.5, 0.0)})
  md = report_downstream.section_md(study, report_downstream.compute(study))
  assert "**Every main model is at the floor**" in md


def test_one_evaluation_has_no_steps_to_reach():
  study = _study()
  study["mains"]["doremi"]["downstream"] = study["mains"]["doremi"]["downstream"][-1:]
  natural = report_downstream.compute(study)["baselines"]["natural"]
  assert natural["reach_status"] == "one_evaluation" and natural["steps_to_reach"] is None


def test_no_downstream_no_section(tmp_path):
  study = test_report._study({"doremi": [3.0, 2.0, 1.5], "natural": [3.0, 2.5, 2.0]})
  summary = report.write_report(study, str(tmp_path))
  assert summary["downstream"] is None
  with open(os.path.join(tmp_path, "report.md")) as f:
    assert "exact match" not in f.read()


def test_report_has_downstream_table_and_plot(tmp_path):
  summary = report.write_report(_study(), str(tmp_path))
  with open(os.path.join(tmp_path, "report.md")) as f:
    md = f.read()
  assert "## Downstream: one-shot exact match" in md and "Two hand-made tasks." in md
  assert "| qa (200 examples) | **30.00** | 20.00 |" in md
  assert "| **average** | **35.00** | **35.00** |" in md
  assert "| `natural` | +0.00 | 1/2 | 1000 (100% of the steps) |" in md
  assert os.path.exists(os.path.join(tmp_path, "plots", "downstream_vs_steps.png"))
  with open(os.path.join(tmp_path, "summary.json")) as f:
    assert json.load(f)["downstream"]["baselines"]["natural"]["tasks_better"] == 1
  assert summary["downstream"]["suite"] == "demo"


def test_downstream_over_seeds_higher_is_better():

  def summary(delta, reach, status=None):
    return {
        "baselines": {},
        "downstream": {
            "baselines": {
                "uniform": {
                    "delta_average": delta,
                    "steps_to_reach": reach,
                    "reach_status": status or ("never" if reach is None else "reached")
                }
            }
        }
    }

  per_seed = {
      "seed0_eta1": summary(5.0, 100),
      "seed1_eta1": summary(6.0, None),
      "seed2_eta1": summary(4.0, 200),
      "seed3_eta1": summary(5.0, None, "baseline_zero"),  # not a measurement: left out
      "seed0_eta0.1": summary(-3.0, None, "baseline_zero"),
      "seed1_eta0.1": summary(-3.5, None, "one_evaluation"),
      "seed2_eta0.1": summary(-2.5, None, "baseline_zero")
  }
  out = aggregate._downstream(per_seed)  # pylint: disable=protected-access
  assert out["1"]["uniform"]["average"]["mean"] == pytest.approx(5.0)
  assert out["1"]["uniform"]["average"]["verdict"] == "better"  # higher exact match
  assert out["0.1"]["uniform"]["average"]["verdict"] == "worse"
  assert out["1"]["uniform"]["steps_to_reach"]["reached"] == "2/3 seeds"
  assert out["1"]["uniform"]["steps_to_reach"]["mean"] == pytest.approx(150)
  assert aggregate.significance(aggregate.mean_sd_se([1.0, -1.0, 0.5]),
                                higher_is_better=True) == aggregate.NO_DIFFERENCE
  md = "\n".join(aggregate._downstream_md(out["1"]))  # pylint: disable=protected-access
  assert "| uniform | +5.00 ± 0.82 | better | 150 ± 71 (2/3 seeds) |" in md
  md = "\n".join(aggregate._downstream_md(out["0.1"]))  # pylint: disable=protected-access
  assert "| uniform | -3.00 ± 0.50 | worse | - (not measured" in md


def _floor_study(doremi_qa: float):
  """One task of 400 examples; DoReMi scores doremi_qa points, natural 0."""
  study = test_report._study({"doremi": [3.0, 2.0, 1.5], "natural": [3.0, 2.5, 2.0]})
  for name, qa in (("doremi", doremi_qa), ("natural", 0.0)):
    history = _history({500: (0.0,), 1000: (qa,)}, tasks=("qa",))
    for h in history:
      h["examples"] = {"qa": 400}
    study["mains"][name]["downstream"] = history
  return study


def test_one_example_stays_visible_in_report_and_console(tmp_path):
  # Catches rounding that changes the story: 1 of 400 correct (0.25 points) printed as 0.2
  # in the report and as "+0.2 points" on the console.
  from doremi_jax import pipeline  # pylint: disable=g-import-not-at-top
  summary = report.write_report(_floor_study(0.25), str(tmp_path))
  with open(os.path.join(tmp_path, "report.md")) as f:
    md = f.read()
  assert summary["downstream"]["decimals"] == 2
  assert "| qa (400 examples) | **0.25** | 0.00 |" in md
  assert "| `natural` | +0.25 |" in md
  assert "One example is 0.25 points" in md
  console = pipeline.console_summary(summary, "report.md")
  assert "downstream exact match +0.25 points" in console
  # Every model under a point: the flag is in the report and on the console; 3 points is not.
  assert "Every main model is at the floor" in md
  assert "warning: every main model is at the downstream floor" in console
  high = report.compute_summary(_floor_study(3.0))
  assert "floor" not in pipeline.console_summary(high, "report.md")


def test_downstream_plot_axis_and_lines(tmp_path):
  # Catches an axis that autoscales to 0-0.25 (one example looks like a climb) and a line
  # hidden under an identical one.
  study = _floor_study(0.25)
  study["mains"]["uniform"] = dict(study["mains"]["natural"])
  fig = report_downstream.curves_figure(study)
  ax = fig.axes[0]
  assert ax.get_ylim() == pytest.approx((-0.03 * 5 * 0.25, 5 * 0.25))
  assert len({(l.get_linestyle(), l.get_marker()) for l in ax.get_lines()}) == 3
  assert len({tuple(l.get_xdata()) for l in ax.get_lines()}) == 3  # equal curves side by side
  assert report_downstream.plot_curves(study, str(tmp_path / "d.png"))
  assert (tmp_path / "d.png").read_bytes().startswith(test_report.PNG_MAGIC)
