"""The whole study end to end on the demo corpus with tiny settings."""
import json
import os
import sys

import pytest

from tests import helpers
from tests import test_console


def _pipeline_cmd(out_dir, *bindings):
  return [
      sys.executable, "-m", "doremi_jax.pipeline", "--gin_file=gin/pipelines/demo_cpu.gin",
      f"--gin.PIPELINE_DIR='{out_dir}'", "--gin.SEQ_LEN=32",
      "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.pipeline.main_steps=4",
      "--gin.pipeline.main_batch_size=8", "--gin.reference/train.train_steps=4",
      "--gin.proxy/train.train_steps=4", "--gin.main/train.eval_every=2",
      "--gin.main/train.eval_batch_size=16", "--gin.main/train.eval_max_sequences=4",
      "--gin.main/DownstreamConfig.max_examples=8", "--gin.main/DownstreamConfig.every=2",
      "--gin.main/DownstreamConfig.batch_size=8", *bindings
  ]


def _run_pipeline(out_dir, *bindings):
  """Runs the demo pipeline on one CPU device; fails the test if it exits with an error."""
  return helpers.run(
      _pipeline_cmd(out_dir, *bindings), env=helpers.child_env(devices=1), timeout=900)


def test_missing_downstream_data_stops_before_the_first_stage(tmp_path):
  """Main runs on the paper's tasks without prepared TFDS data: one error naming the
  `tfds build` commands, before the reference trains."""
  out = tmp_path / "study"
  env = {**helpers.child_env(devices=1), "TFDS_DATA_DIR": str(tmp_path / "no_tfds")}
  proc = helpers.run(
      _pipeline_cmd(out, "--gin.main/DownstreamConfig.suite='paper'"), env=env, check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  for name in ("trivia_qa/unfiltered.nocontext", "natural_questions_open", "web_questions",
               "squad/v2.0", "lambada"):
    assert f"tfds build {name}" in proc.stderr
  assert not os.path.exists(out / "round1")


@pytest.mark.slow
def test_iterated_pipeline_writes_report(tmp_path):
  out = str(tmp_path / "study")
  _run_pipeline(out, "--gin.pipeline.max_rounds=2", "--gin.pipeline.convergence_tol=0.0")
  study = json.load(open(os.path.join(out, "study.json")))
  assert [r["round"] for r in study["rounds"]] == [1, 2]
  # Iterated DoReMi: round 2's reference trains on round 1's output weights.
  assert study["rounds"][1]["reference_weights"] == study["rounds"][0]["output_weights"]
  assert set(study["mains"]) == {"doremi", "natural", "uniform", "unimax"}
  for main in study["mains"].values():
    assert [e["step"] for e in main["evals"]] == [2, 4]
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert set(summary["baselines"]) == {"natural", "uniform", "unimax"}
  report = open(os.path.join(out, "report.md")).read()
  for plot in ("weight_trajectories", "final_log_ppl", "log_ppl_vs_steps", "final_weights"):
    assert os.path.exists(os.path.join(out, "plots", f"{plot}.png"))
    assert f"plots/{plot}.png" in report
  weights = json.load(open(os.path.join(out, "domain_weights.json")))
  assert abs(sum(weights["domains"].values()) - 1) < 1e-5 and weights["rounds"] == 2

  # Rerunning the same command skips finished stages and gives the same study.
  _run_pipeline(out, "--gin.pipeline.max_rounds=2", "--gin.pipeline.convergence_tol=0.0")
  assert json.load(open(os.path.join(out, "study.json")))["mains"] == study["mains"]


def test_pipeline_stops_when_converged(tmp_path):
  out = str(tmp_path / "study")
  proc = _run_pipeline(out, "--gin.pipeline.max_rounds=3", "--gin.pipeline.convergence_tol=2.0",
                       "--gin.pipeline.baselines=['uniform']")
  # A real run prints none of the notices a user cannot act on (quiet.py), and its closing
  # summary carries the report's flags (4 steps: every model at the downstream floor).
  for noise in test_console.NOISE:
    assert noise not in proc.stderr, (noise, proc.stderr[-3000:])
  assert "warning: every main model is at the downstream floor" in proc.stdout, proc.stdout
  study = json.load(open(os.path.join(out, "study.json")))
  assert len(study["rounds"]) == 1 and study["converged"]
  assert set(study["mains"]) == {"doremi", "uniform"}
  # The main runs answered the demo's downstream tasks at steps 2 and 4.
  for main in study["mains"].values():
    history = main["downstream"]
    assert [h["step"] for h in history] == [2, 4]
    assert set(history[-1]["tasks"]) == {"demo_unicode", "demo_cloze"}
    assert history[-1]["examples"] == {"demo_unicode": 8, "demo_cloze": 8}
  assert study["downstream"]["suite"] == "demo"
  report = open(os.path.join(out, "report.md")).read()
  assert "## Downstream: one-shot exact match" in report and "code point" in report
  assert "plots/downstream_vs_steps.png" in report
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert "delta_average" in summary["downstream"]["baselines"]["uniform"]


def test_seeds_and_etas_pipeline(tmp_path):
  """2 seeds x 2 etas: every stage per seed, one proxy and main run per eta, the baselines
  shared by the etas; the report gives mean +- sd over seeds; a rerun skips every stage."""
  out = str(tmp_path / "study")
  flags = ("--gin.pipeline.seeds=[0, 1]", "--gin.pipeline.etas=[1.0, 0.1]",
           "--gin.pipeline.baselines=['uniform']")
  _run_pipeline(out, *flags)
  for seed in (0, 1):
    base = os.path.join(out, f"seed{seed}")
    for run in ("round1/reference", "round1/doremi_eta1", "round1/doremi_eta0.1",
                "main/doremi_eta1", "main/doremi_eta0.1", "main/uniform"):
      info = json.load(open(os.path.join(base, run, "run_info.json")))
      assert info["random_seed"] == seed, run
    eta = json.load(open(os.path.join(base, "round1/doremi_eta0.1/domain_weights.json")))
    assert eta["eta"] == 0.1 and "half_drift" in eta["diagnostics"]
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert set(summary["etas"]) == {"1", "0.1"}
  stats = summary["etas"]["0.1"]["uniform"]["average"]
  assert stats["n"] == 2 and stats["sd"] is not None
  assert summary["downstream"]["0.1"]["uniform"]["average"]["n"] == 2
  assert stats["verdict"] in ("better", "worse", "no significant difference")
  report = open(os.path.join(out, "report.md")).read()
  assert "## eta = 0.1" in report and "reports/seed1_eta0.1/report.md" in report
  assert os.path.exists(os.path.join(out, "reports", "seed1_eta0.1", "report.md"))
  runs = ("seed0/main/uniform", "seed1/round1/doremi_eta1", "seed1/main/doremi_eta0.1")
  before = {
      p: (open(os.path.join(out, p, "metrics.jsonl")).read(),
          sorted(os.listdir(os.path.join(out, p, "checkpoints")))) for p in runs
  }
  study = json.load(open(os.path.join(out, "reports", "seed1_eta1", "study.json")))
  _run_pipeline(out, *flags)  # finished stages are skipped: no step runs again
  for p in runs:
    assert (open(os.path.join(out, p, "metrics.jsonl")).read(),
            sorted(os.listdir(os.path.join(out, p, "checkpoints")))) == before[p], p
  assert json.load(open(os.path.join(out, "reports", "seed1_eta1", "study.json"))) == study


def test_pipeline_with_changing_mixtures_writes_one_report(tmp_path):
  """Offline DoReMi, online DoReMi, ODM and a schedule, each one main run at equal compute,
  judged in one report against the baseline and offline DoReMi."""
  out = str(tmp_path / "study")
  _run_pipeline(
      out, "--gin.pipeline.baselines=['uniform']",
      "--gin.pipeline.methods=['doremi', 'online_doremi', 'online_doremi_reweight', 'odm', "
      "'schedule']", "--gin.main/train.downstream=None")
  study = json.load(open(os.path.join(out, "study.json")))
  assert set(study["mains"]) == {"doremi", "uniform"}
  assert set(study["methods"]) == {"online_doremi", "online_doremi_reweight", "odm", "schedule"}
  for name, run in study["methods"].items():
    assert [e["step"] for e in run["evals"]] == [2, 4], name
    assert [r["step"] for r in run["trajectory"]] == [1, 2, 3, 4], name
  # The schedule switches from natural to DoReMi's weights at half the 4 main steps.
  sched = study["methods"]["schedule"]["trajectory"]
  doremi_w = study["mains"]["doremi"]["weights"]
  for d in doremi_w:
    assert abs(sched[2]["weights"][d] - doremi_w[d] / sum(doremi_w.values())) < 1e-9
  assert sched[0]["weights"] != sched[2]["weights"]
  assert sched[1]["weights"] == sched[0]["weights"]  # steps 1-2 natural, DoReMi's from 3
  assert study["methods"]["schedule"]["setting"] == ("natural for steps 1-2, DoReMi's weights "
                                                     "from step 3 of 4")
  # Reweighting: stratified batches, the loss weights move from uniform each step.
  reweight = study["methods"]["online_doremi_reweight"]["trajectory"]
  assert [r["step"] for r in reweight] == [1, 2, 3, 4]
  assert study["methods"]["online_doremi_reweight"]["cost"]["reference_forward_fraction"] > 0
  assert study["methods"]["odm"]["online"]["method"] == "odm"
  cost = study["methods"]["online_doremi"]["cost"]["reference_forward_fraction"]
  assert 0 < cost < 1 / 3  # the reference is smaller than the main model
  summary = json.load(open(os.path.join(out, "summary.json")))
  for name in ("online_doremi", "online_doremi_reweight", "odm", "schedule"):
    assert set(summary["methods"][name]["baselines"]) == {"uniform", "doremi (offline)"}
  report = open(os.path.join(out, "report.md")).read()
  assert "## Other mixture methods" in report and "### `odm`" in report
  assert "plots/weights_in_force.png" in report
  assert os.path.exists(os.path.join(out, "plots", "weights_in_force.png"))
