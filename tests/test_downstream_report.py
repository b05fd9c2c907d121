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
  assert "| `natural` | +35.0 | 2/2 | - (the baseline scored 0) |" in md
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
  assert "| qa (200 examples) | **30.0** | 20.0 |" in md
  assert "| **average** | **35.0** | **35.0** |" in md
  assert "| `natural` | +0.0 | 1/2 | 1000 (100% of the steps) |" in md
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
