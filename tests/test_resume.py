"""Resume: a run stopped any way (kill -9, SIGTERM, stop_after_steps) and started again with
the same command continues exactly as if never stopped (bit for bit on CPU)."""
import json
import os
import signal
import sys
import time
import warnings

import numpy as np
import pytest

from tests import helpers

STEPS = 80
FLAGS = ["--gin.train.log_every=1", "--gin.train.checkpoint_every=5"]


def _cmd(model_dir, steps=STEPS, reference=None, extra=()):
  return [
      sys.executable,
      *helpers.train_args(model_dir, steps, reference=reference, extra=[*FLAGS, *extra])
  ]


def _wait_for_step(model_dir, step, proc, timeout=240):
  deadline = time.time() + timeout
  while True:
    m = helpers.read_metrics(model_dir)
    if m and m[-1]["step"] >= step:
      return m[-1]["step"]
    assert proc.poll() is None, f"the run exited ({proc.returncode}) before step {step}"
    assert time.time() < deadline, f"step {step} not reached"
    time.sleep(0.02)


def _checkpoint_steps(model_dir):
  d = os.path.join(model_dir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _kill9_after_checkpoint(cmd, model_dir, step, log_path):
  """Starts a run, waits for logged `step` and a checkpoint, then SIGKILLs it mid-run."""
  proc = helpers.start(cmd, log_path)
  _wait_for_step(model_dir, step, proc)
  while not _checkpoint_steps(model_dir):
    time.sleep(0.02)
  assert proc.poll() is None, "finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()


def _params(model_dir, step):
  """The saved parameters at `step`, as numpy arrays."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(model_dir, "checkpoints", str(step), "state")
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Sharding info not provided")
    restored = ocp.PyTreeCheckpointer().restore(path)
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(np.asarray, restored["params"])


def _assert_same_run(got_dir, want_dir, steps=STEPS):
  got, want = helpers.read_metrics(got_dir), helpers.read_metrics(want_dir)
  assert [m["step"] for m in got] == list(range(1, steps + 1))
  for g, w in zip(got, want):
    for key in ("loss", "ce_loss", "grad_norm", "learning_rate", "domain_loss", "domain_weights",
                "avg_domain_weights"):
      assert g.get(key) == w.get(key), (g["step"], key, g.get(key), w.get(key))
  got_p, want_p = _params(got_dir, steps), _params(want_dir, steps)
  import jax  # pylint: disable=g-import-not-at-top
  flat_g, flat_w = jax.tree.leaves_with_path(got_p), jax.tree.leaves_with_path(want_p)
  assert [p for p, _ in flat_g] == [p for p, _ in flat_w]
  for (path, g), (_, w) in zip(flat_g, flat_w):
    np.testing.assert_array_equal(g, w, err_msg=str(path))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("resume") / "baseline")
  helpers.run(_cmd(path))
  return path


def test_kill9_then_restart_equals_uninterrupted(baseline, tmp_path):
  model_dir = str(tmp_path / "run")
  _kill9_after_checkpoint(_cmd(model_dir), model_dir, 12, tmp_path / "log")
  killed_at = helpers.read_metrics(model_dir)[-1]["step"]
  assert killed_at < STEPS
  helpers.run(_cmd(model_dir))
  _assert_same_run(model_dir, baseline)


def test_stop_after_steps_then_resume(baseline, tmp_path):
  model_dir = str(tmp_path / "run")
  helpers.run(_cmd(model_dir, extra=["--gin.train.stop_after_steps=33"]))
  assert helpers.read_metrics(model_dir)[-1]["step"] == 33
  assert _checkpoint_steps(model_dir)[-1] == 33  # saved where it stopped, off the 5-grid
  helpers.run(_cmd(model_dir))
  _assert_same_run(model_dir, baseline)


def test_sigterm_saves_exits_cleanly_and_resumes(baseline, tmp_path):
  model_dir = str(tmp_path / "run")
  proc = helpers.start(_cmd(model_dir), tmp_path / "log")
  _wait_for_step(model_dir, 12, proc)
  proc.send_signal(signal.SIGTERM)
  code = proc.wait(timeout=120)
  assert code == 0, (tmp_path / "log").read_text()[-3000:]
  stopped = helpers.read_metrics(model_dir)[-1]["step"]
  assert 12 <= stopped < STEPS
  assert _checkpoint_steps(model_dir)[-1] == stopped  # the checkpoint of the step it stopped at
  assert "preempted: checkpoint saved at step" in (tmp_path / "log").read_text()
  helpers.run(_cmd(model_dir))
  _assert_same_run(model_dir, baseline)


@pytest.mark.parametrize(
    "run_file",
    # The schedule's resume across a change is also checked on the input alone
    # (test_mixing.py); end to end it is slow.
    ["runs/online_doremi.gin",
     pytest.param("runs/schedule.gin", marks=pytest.mark.slow)])
def test_changing_weights_kill9_resume_equals_uninterrupted(tmp_path, run_file):
  """Killed after its step-5 checkpoint and past a weight change (online DoReMi: every step;
  the schedule: step 7), before the next checkpoint (10): resumed, it draws the same batches
  with the same weights as an uninterrupted run, bit for bit."""
  ref, want, got = (str(tmp_path / n) for n in ("ref", "want", "got"))
  online = run_file == "runs/online_doremi.gin"
  if online:
    helpers.run(_cmd(ref, steps=3))
  steps, extra = 16, ["--gin.train.eval_every=0", *([] if online else helpers.SCHEDULE_FLAGS)]
  cmd = lambda d: [
      sys.executable, *helpers.train_args(d, steps, reference=ref if online else None,
                                          run_file=run_file, extra=[*FLAGS, *extra])
  ]
  helpers.run(cmd(want))
  _kill9_after_checkpoint(cmd(got), got, 8, tmp_path / "log")
  killed_at = helpers.read_metrics(got)[-1]["step"]
  assert killed_at < steps
  helpers.run(cmd(got))
  _assert_same_run(got, want, steps=steps)
  for g, w in zip(helpers.read_metrics(got), helpers.read_metrics(want)):
    assert g["sampling_weights"] == w["sampling_weights"], g["step"]
  rows = helpers.read_jsonl(os.path.join(got, "sampling_weights.jsonl"))
  assert [r["step"] for r in rows] == list(range(1, steps + 1))
  assert rows == helpers.read_jsonl(os.path.join(want, "sampling_weights.jsonl"))


def _trajectory(model_dir):
  return helpers.read_jsonl(os.path.join(model_dir, "domain_weights_trajectory.jsonl"))


@pytest.mark.slow
def test_doremi_kill9_resume_same_weight_trajectory(tmp_path):
  ref, want, got = (str(tmp_path / n) for n in ("ref", "want", "got"))
  helpers.run(_cmd(ref, steps=3))
  steps = 40
  helpers.run(_cmd(want, steps=steps, reference=ref))
  _kill9_after_checkpoint(_cmd(got, steps=steps, reference=ref), got, 8, tmp_path / "log")
  helpers.run(_cmd(got, steps=steps, reference=ref))
  _assert_same_run(got, want, steps=steps)
  assert _trajectory(got) == _trajectory(want)
  assert [t["step"] for t in _trajectory(got)] == list(range(1, steps + 1))
  w_got, w_want = (json.load(open(os.path.join(d, "domain_weights.json"))) for d in (got, want))
  assert w_got["domains"] == w_want["domains"]
  assert w_got["final_domain_weights"] == w_want["final_domain_weights"]
