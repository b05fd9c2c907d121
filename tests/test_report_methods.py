"""The report's other mixture methods: judged like DoReMi, sentences from the numbers, the
weights-in-force plot, and the verdicts over seeds."""
import os

from doremi_jax import aggregate
from doremi_jax import report
from doremi_jax import report_flags

DOMAINS = ["code", "prose"]


def _evals(avg):
  return [{
      "step": s,
      "per_domain": {
          "code": a - 0.1,
          "prose": a + 0.1
      },
      "average": a,
      "worst": a + 0.1
  } for s, a in zip((2, 4), avg)]


def _study(online_avg=(3.0, 2.0), beaten_from=None):
  rows = [{
      "step": s,
      "weights": {
          "code": 0.5 + 0.1 * s,
          "prose": 0.5 - 0.1 * s
      }
  } for s in (1, 2, 3, 4)]
  return {
      "name": "t",
      "mixture": "demo",
      "domains": DOMAINS,
      "rounds": [],
      "converged": False,
      "config": {},
      "seed": None,
      "eta": 1.0,
      "equal_compute": {
          "train_steps": 4,
          "batch_size": 8,
          "seq_len": 32,
          "tokens": 1024
      },
      "mains": {
          "doremi": {
              "weights": {
                  "code": 0.6,
                  "prose": 0.4
              },
              "evals": _evals((3.0, 2.5))
          },
          "uniform": {
              "weights": {
                  "code": 0.5,
                  "prose": 0.5
              },
              "evals": _evals((3.0, 2.4))
          }
      },
      "methods": {
          "online_doremi": {
              "weights": {
                  "code": 0.75,
                  "prose": 0.25
              },
              "evals": _evals(online_avg),
              "trajectory": rows,
              "cost": {
                  "reference_forward_fraction": 0.125,
                  "reference_params": 1000,
                  "main_params": 3000
              },
              "online": {
                  "method": "doremi",
                  "steps": 4,
                  "reference_beaten_from_step": beaten_from,
                  "steps_with_reference_beaten": 2
              }
          }
      },
  }


def test_methods_are_judged_like_doremi_against_baselines_and_offline_doremi():
  s = report.compute_summary(_study())
  m = s["methods"]["online_doremi"]
  assert set(m["baselines"]) == {"uniform", "doremi (offline)"}
  assert m["baselines"]["uniform"]["verdict_average"] == "better"  # 2.0 vs 2.4
  assert abs(m["baselines"]["doremi (offline)"]["delta_average"] - (2.0 - 2.5)) < 1e-12
  worse = report.compute_summary(_study(online_avg=(3.0, 2.6)))["methods"]["online_doremi"]
  assert worse["baselines"]["uniform"]["verdict_average"] == "worse"
  # The DoReMi comparison itself is unchanged by the methods.
  assert set(s["baselines"]) == {"uniform"}


def test_reference_beaten_sentence_follows_the_numbers(tmp_path):
  out = str(tmp_path / "a")
  report.write_report(_study(beaten_from=3), out)
  text = open(os.path.join(out, "report.md")).read()
  assert "### `online_doremi`" in text
  assert "below the reference's on every domain from step 3 to the end" in text
  assert "plots/weights_in_force.png" in text
  assert "the reference's forward each step, 12.5% of a main step's FLOPs" in text
  assert open(os.path.join(out, "plots", "weights_in_force.png"), "rb").read(4) == b"\x89PNG"
  out2 = str(tmp_path / "b")
  report.write_report(_study(beaten_from=None), out2)
  text2 = open(os.path.join(out2, "report.md")).read()
  assert "on every domain from step" not in text2 and "on 2 of 4 steps" in text2
  # The report's flag list (and so the console's closing lines) carries it too.
  flags = report_flags.flags(report.compute_summary(_study(beaten_from=3)))
  assert any(
      f.startswith("online_doremi: the main model's loss was below the reference's on every "
                   "domain from step 3 on") for f in flags)
  assert not any(
      "below the reference" in f for f in report_flags.flags(report.compute_summary(_study())))


def test_methods_over_seeds():
  per_seed = {
      f"seed{s}_eta1": report.compute_summary(_study(online_avg=(3.0, 2.0 + 0.1 * s)))
      for s in (0, 1, 2)
  }
  stats = aggregate.methods_over_seeds(per_seed)["online_doremi"]["1"]["uniform"]["average"]
  assert stats["n"] == 3 and abs(stats["mean"] - (2.1 - 2.4)) < 1e-9
  assert stats["verdict"] == "better"
  md = "\n".join(aggregate.methods_md(aggregate.methods_over_seeds(per_seed)))
  assert "## Other mixture methods over seeds" in md and "| doremi (offline) |" in md
