"""Faults of long runs: a checkpoint that cannot be restored, a save that fails (read-only
directory, full disk), a failed metrics write, an unfinished save or metrics line left by a
crash. Each gives one clear message, keeps what was complete, and a rerun continues exactly."""
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings

import gin
import jax
import numpy as np
import pytest

from doremi_jax import checkpoint
from doremi_jax import outputs
from tests import helpers

STEPS = 40
FLAGS = [
    "--gin.train.log_every=1", "--gin.train.checkpoint_every=10", "--gin.train.keep_checkpoints=3"
]


def _cmd(model_dir, *extra, steps=STEPS):
  return [sys.executable, *helpers.train_args(model_dir, steps, extra=[*FLAGS, *extra])]


def _steps(model_dir, sub="checkpoints"):
  d = os.path.join(model_dir, sub)
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _params(path):
  """The parameters saved in the checkpoint directory `path`, as numpy arrays."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Sharding info not provided")
    restored = ocp.PyTreeCheckpointer().restore(os.path.join(path, "state"))
  return jax.tree.map(np.asarray, restored["params"])


def _assert_same_run(got_dir, want_dir):
  """Same metrics at every step and bit-identical final parameters."""
  got, want = helpers.read_metrics(got_dir), helpers.read_metrics(want_dir)
  assert [m["step"] for m in got] == list(range(1, STEPS + 1))
  for g, w in zip(got, want):
    for key in ("loss", "ce_loss", "grad_norm", "learning_rate", "domain_loss"):
      assert g[key] == w[key], (g["step"], key)
  final = lambda d: _params(os.path.join(d, "checkpoints", str(STEPS)))
  jax.tree.map(np.testing.assert_array_equal, final(got_dir), final(want_dir))


def _truncate_data_files(step_dir):
  """Bit rot or a bad copy: every array data file of a checkpoint cut short (all of them:
  which arrays a given file holds varies from run to run)."""
  data = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
  names = sorted(os.listdir(data))
  assert names, data
  for name in names:
    with open(os.path.join(data, name), "r+b") as f:
      f.truncate(10)


def _error_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith("error:")]


def _assert_one_clear_error(proc, *fragments):
  assert proc.returncode not in (0, None), proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-5000:]
  errors = _error_lines(proc.stderr)
  assert len(errors) == 1, proc.stderr[-3000:]
  for fragment in fragments:
    assert fragment in proc.stderr, (fragment, proc.stderr[-3000:])
  return errors[0]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("faults") / "baseline")
  helpers.run(_cmd(path))
  return path


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, baseline):
  """A run stopped at step 20 of 40: checkpoints 10 and 20."""
  del baseline  # built first: it fills the input cache
  path = str(tmp_path_factory.mktemp("faults") / "stopped")
  helpers.run(_cmd(path, "--gin.train.stop_after_steps=20"))
  assert _steps(path) == [10, 20]
  return path


def _copy(src, tmp_path):
  dst = str(tmp_path / "run")
  shutil.copytree(src, dst)
  return dst


# ------------------------------------------------------------- checkpoints that cannot be read


def test_unreadable_latest_falls_back_to_the_previous_and_equals_uninterrupted(
    stopped, baseline, tmp_path):
  model_dir = _copy(stopped, tmp_path)
  _truncate_data_files(os.path.join(model_dir, "checkpoints", "20"))
  proc = helpers.run(_cmd(model_dir))
  # One warning names the checkpoint; the abandoned read's background errors may add orbax's
  # one-line summary, never a traceback.
  lines = [l for l in proc.stderr.splitlines() if "WARNING" in l]
  warned = [l for l in lines if "cannot be restored" in l]
  assert len(warned) == 1, proc.stderr[-3000:]
  assert all("orbax logged" in l for l in lines if l not in warned), lines
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert f"checkpoint {model_dir}/checkpoints/20 cannot be restored: ValueError: " in warned[0]
  assert "\n" not in warned[0] and "Requested byte range" in warned[0]  # the cause, first line
  kept = os.path.join(model_dir, "checkpoints_set_aside", "20.unreadable")
  assert f"moved to {kept}" in warned[0]
  assert os.listdir(os.path.join(kept, "state"))  # kept for a person to inspect
  assert "resumed from" in proc.stderr and "at step 10" in proc.stderr
  info = json.load(open(os.path.join(model_dir, "run_info.json")))
  [fallback] = info["checkpoint_fallbacks"]
  assert fallback["restored_step"] == 10 and fallback["restore_step"] is None
  assert [(a["step"], a["why"], a["moved_to"]) for a in fallback["set_aside"]
         ] == [(20, "unreadable", kept)]
  _assert_same_run(model_dir, baseline)


def test_no_readable_checkpoint_is_one_error_and_nothing_moves(stopped, tmp_path):
  model_dir = _copy(stopped, tmp_path)
  for step in (10, 20):
    _truncate_data_files(os.path.join(model_dir, "checkpoints", str(step)))
  metrics_before = open(os.path.join(model_dir, "metrics.jsonl")).read()
  proc = helpers.run(_cmd(model_dir), check=False)
  error = _assert_one_clear_error(proc, "  step 20: ValueError: ", "  step 10: ValueError: ")
  assert f"no checkpoint in {model_dir}/checkpoints can be restored" in error
  assert _steps(model_dir) == [10, 20]
  assert not os.path.exists(os.path.join(model_dir, "checkpoints_set_aside"))
  # Not silently started from scratch: nothing was trained or rewritten.
  assert open(os.path.join(model_dir, "metrics.jsonl")).read() == metrics_before


def test_restore_step_goes_back_once_and_keeps_newer_checkpoints(stopped, baseline, tmp_path):
  model_dir = _copy(stopped, tmp_path)
  proc = helpers.run(_cmd(model_dir, "--gin.train.restore_step=10"))
  assert "at step 10" in proc.stderr
  kept = os.path.join(model_dir, "checkpoints_set_aside", "20.superseded")
  assert os.path.isdir(kept)
  _assert_same_run(model_dir, baseline)
  # The same command again (after a preemption, say) does not go back a second time.
  proc = helpers.run(_cmd(model_dir, "--gin.train.restore_step=10"))
  assert "was applied by an earlier start" in proc.stderr
  assert f"at step {STEPS}" in proc.stderr
  assert helpers.read_metrics(model_dir)[-1]["step"] == STEPS
  info = json.load(open(os.path.join(model_dir, "run_info.json")))
  [record] = info["checkpoint_fallbacks"]  # kept across restarts, recorded once
  assert record["restore_step"] == 10 and record["restored_step"] == 10
  assert [(a["step"], a["why"]) for a in record["set_aside"]] == [(20, "superseded")]


def _run_main_error(model_dir, *bindings) -> str:
  """The one-line error of the CLI entry point, run in this process."""
  argv = [
      a for a in helpers.train_args(model_dir, STEPS)[2:] if not a.startswith("--gin.MODEL_DIR")
  ]
  argv += [*FLAGS, f"--gin.MODEL_DIR='{model_dir}'", *(f"--gin.{b}" for b in bindings)]
  return helpers.train_cli_error(argv)


@pytest.mark.parametrize("value", ["-1", "'20'"])
def test_restore_step_not_a_step(tmp_path, value):
  message = _run_main_error(str(tmp_path / "run"), f"train.restore_step={value}")
  assert message.startswith("error: train.restore_step=") and "integer >= 0" in message


def test_restore_step_without_that_checkpoint(stopped, tmp_path):
  model_dir = _copy(stopped, tmp_path)
  message = _run_main_error(model_dir, "train.restore_step=15")
  assert "train.restore_step=15" in message and "holds steps [10, 20]" in message
  assert _steps(model_dir) == [10, 20]


# ------------------------------------------------------------------------- failing saves


def _make_read_only(path):
  """A directory nobody can add to: chmod for a user; as root (chmod does not stop root),
  the immutable attribute. Returns the undo, or skips where neither is possible."""
  if os.geteuid() != 0:
    os.chmod(path, 0o555)
    return lambda: os.chmod(path, 0o755)
  if shutil.which("chattr") is None:
    pytest.skip("running as root without chattr: cannot make a directory read-only")
  done = subprocess.run(["chattr", "+i", path], capture_output=True, text=True)
  if done.returncode != 0:
    pytest.skip(f"chattr +i is not supported here: {done.stderr.strip()}")
  return lambda: subprocess.run(["chattr", "-i", path], check=True)


def test_save_into_a_directory_made_read_only_mid_run(stopped, tmp_path):
  model_dir = _copy(stopped, tmp_path)
  ckpt_dir = os.path.join(model_dir, "checkpoints")
  before = {s: os.listdir(os.path.join(ckpt_dir, str(s), "state")) for s in (10, 20)}
  proc = helpers.start(_cmd(model_dir, steps=400), tmp_path / "log")
  while not helpers.read_metrics(model_dir) or helpers.read_metrics(model_dir)[-1]["step"] < 22:
    assert proc.poll() is None, (tmp_path / "log").read_text()[-3000:]
    time.sleep(0.02)
  undo = _make_read_only(ckpt_dir)
  t0 = time.time()
  try:
    code = proc.wait(timeout=120)
  finally:
    undo()
  assert time.time() - t0 < 60, "did not stop promptly"
  stopped_at = helpers.read_metrics(model_dir)[-1]["step"]
  log = (tmp_path / "log").read_text()
  done = subprocess.CompletedProcess(proc.args, code, "", log)
  error = _assert_one_clear_error(done, "PermissionError")
  failed = (stopped_at // 10) * 10
  assert error.startswith(f"error: could not save the checkpoint of step {failed} in {ckpt_dir}: "
                          f"PermissionError: [Errno ")
  assert f"it resumes from step {failed - 10}, the last complete checkpoint" in error
  assert stopped_at - failed <= 2  # stopped at the save, not steps later
  for s, files in before.items():  # complete checkpoints untouched
    assert os.listdir(os.path.join(ckpt_dir, str(s), "state")) == files
    params = jax.tree.leaves(_params(os.path.join(ckpt_dir, str(s))))
    assert params and all(np.isfinite(p).all() for p in params)


# Python with a 200 kB file-size limit: above the metrics and TensorBoard files of these runs,
# below a checkpoint's data file.
_SMALL_DISK = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, "
               "200_000)); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


def test_disk_full_during_a_save_then_rerun_cleans_up_and_equals_uninterrupted(
    stopped, baseline, tmp_path):
  """A file-size limit (RLIMIT_FSIZE, which binds root too) fails the save's writes with
  EFBIG, the way a full disk fails them with ENOSPC."""
  model_dir = _copy(stopped, tmp_path)
  _truncate_last_metrics_line(model_dir)  # a crash mid-append: repaired on resume
  t0 = time.time()
  proc = helpers.run([sys.executable, "-c", _SMALL_DISK, *_cmd(model_dir)[1:]], check=False)
  ckpt_dir = os.path.join(model_dir, "checkpoints")
  error = _assert_one_clear_error(proc, "File too large")
  assert error.startswith(f"error: could not save the checkpoint of step 30 in {ckpt_dir}: ")
  assert "it resumes from step 20, the last complete checkpoint" in error
  assert helpers.read_metrics(model_dir)[-1]["step"] < 40  # promptly: before the next save
  assert time.time() - t0 < 120
  leftovers = [n for n in os.listdir(ckpt_dir) if ".orbax-checkpoint-tmp" in n]
  assert leftovers and _steps(model_dir) == [10, 20]
  # Space freed: the same command removes the unfinished save, says so, and resumes.
  proc = helpers.run(_cmd(model_dir))
  for name in leftovers:
    assert f"removing {os.path.join(ckpt_dir, name)}: an unfinished checkpoint save" in proc.stderr
  assert not [n for n in os.listdir(ckpt_dir) if ".orbax-checkpoint-tmp" in n]
  assert "at step 20" in proc.stderr
  _assert_same_run(model_dir, baseline)


def _truncate_last_metrics_line(model_dir):
  path = os.path.join(model_dir, "metrics.jsonl")
  text = open(path).read()
  with open(path, "w") as f:
    f.write(text + text.splitlines()[-1][:25])  # half of a line, no newline


def test_failed_metrics_write_is_one_clear_error(stopped, tmp_path):
  model_dir = _copy(stopped, tmp_path)
  path = os.path.join(model_dir, "metrics.jsonl")
  proc = helpers.start(_cmd(model_dir, steps=400), tmp_path / "log")
  while not helpers.read_metrics(model_dir) or helpers.read_metrics(model_dir)[-1]["step"] < 24:
    assert proc.poll() is None, (tmp_path / "log").read_text()[-3000:]
    time.sleep(0.02)
  os.replace(path, path + ".moved")
  os.mkdir(path)  # nothing can be appended to it now, not even by root
  code = proc.wait(timeout=120)
  done = subprocess.CompletedProcess(proc.args, code, "", (tmp_path / "log").read_text())
  error = _assert_one_clear_error(done)
  assert error.startswith(f"error: could not write {path}: "), error
  assert "rerun the same command" in error


# ---------------------------------------------------------------------------- in-process


def test_unfinished_save_is_removed_with_a_log_line(tmp_path, caplog):
  ckpt_dir = tmp_path / "run" / "checkpoints"
  leftover = ckpt_dir / "30.orbax-checkpoint-tmp"
  (leftover / "state").mkdir(parents=True)
  (leftover / "state" / "junk").write_text("x")
  with caplog.at_level(logging.WARNING):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "run"), save_every=10, keep=2)
    assert ckpt.latest_step() is None
    state = {"w": jax.numpy.ones(3)}
    ckpt.save(30, state, {"step": np.array(30)}, force=True)  # waits for the cleanup
    ckpt.close()
  assert f"removing {leftover}: an unfinished checkpoint save" in caplog.text
  assert sorted(os.listdir(ckpt_dir)) == ["30"]


def test_truncated_last_line_is_repaired_and_a_bad_line_named(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "w") as f:
    f.write('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
  outputs.truncate_jsonl(path, 2)
  assert open(path).read() == '{"step": 1}\n{"step": 2}\n'
  with open(path, "w") as f:
    f.write('{"step": 1}\n{"st\n{"step": 3}\n')
  with pytest.raises(ValueError, match=f"{path} line 2 is not valid JSON"):
    outputs.truncate_jsonl(path, 3)


def test_failed_write_names_the_file(tmp_path):
  (tmp_path / "run_info.json.tmp").mkdir()  # where the atomic write puts its temporary file
  with pytest.raises(outputs.OutputError, match="could not write .*run_info.json: "):
    outputs.write_json(str(tmp_path / "run_info.json"), {"a": 1})
