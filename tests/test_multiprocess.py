"""Multi-process runs on JAX's distributed runtime over loopback (gloo CPU collectives).

The same DoReMi proxy run as 2 processes x 4 devices (launch/local_run.py) and as 1 process
x 8 devices gives the same losses and domain weights; a dead or stuck peer stops the others
with an error in bounded time; an unreachable coordinator is a clear error after a bounded
wait; the launcher names the process that failed.
"""
import functools
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import helpers

LAUNCHER = os.path.join(helpers.ROOT, "launch", "local_run.py")
_spec = importlib.util.spec_from_file_location("local_run", LAUNCHER)
local_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local_run)

MESH = "(2, 2, 2)"
STEPS = 4
FLAGS = [f"--gin.MESH_SHAPE={MESH}", "--gin.train.log_every=1"]


def _train_args(model_dir, steps=STEPS, doremi_ref=None, extra=(), run_file=None):
  return helpers.train_args(model_dir, steps, reference=doremi_ref, extra=[*FLAGS, *extra],
                            run_file=run_file)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("mp") / "ref")
  helpers.run([sys.executable, *_train_args(path, steps=3)])
  return path


def test_doremi_two_processes_equal_one_process(reference_dir, tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  helpers.run([sys.executable, *_train_args(one, doremi_ref=reference_dir)])
  helpers.run([
      sys.executable, LAUNCHER, "--num_processes=2", "--devices_per_process=4", "--",
      *_train_args(two, doremi_ref=reference_dir)
  ])

  m1, m2 = helpers.read_metrics(one), helpers.read_metrics(two)
  assert [m["step"] for m in m1] == [m["step"] for m in m2] == list(range(1, STEPS + 1))
  for a, b in zip(m1, m2):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["ref_loss"], b["ref_loss"], rtol=1e-5, atol=1e-6)
    for key in ("domain_weights", "avg_domain_weights"):
      assert list(a[key]) == list(b[key])
      np.testing.assert_allclose(list(a[key].values()), list(b[key].values()), rtol=1e-5, atol=1e-7)
  w1, w2 = (json.load(open(os.path.join(d, "domain_weights.json"))) for d in (one, two))
  assert list(w1["domains"]) == list(w2["domains"])
  np.testing.assert_allclose(
      list(w1["domains"].values()), list(w2["domains"].values()), rtol=1e-5, atol=1e-7)
  assert abs(sum(w2["domains"].values()) - 1) < 1e-5
  # Written once (process 0), not once per process.
  assert len(helpers.read_metrics(two)) == STEPS


def test_doremi_resume_onto_another_process_count(reference_dir, tmp_path):
  """Stopped (with its checkpoint) as 2 processes x 4 devices after 2 of 4 steps, resumed
  as 1 process x 8 devices: the same steps as one uninterrupted process. The global batch
  is mixed globally and sliced per host, and the input position is a few integers, so the
  number of hosts may change on resume."""
  one, moved = str(tmp_path / "one"), str(tmp_path / "moved")
  helpers.run([sys.executable, *_train_args(one, doremi_ref=reference_dir)])
  helpers.run([
      sys.executable, LAUNCHER, "--num_processes=2", "--devices_per_process=4", "--",
      *_train_args(moved, doremi_ref=reference_dir, extra=["--gin.train.stop_after_steps=2"])
  ])
  assert [m["step"] for m in helpers.read_metrics(moved)] == [1, 2]
  helpers.run([sys.executable, *_train_args(moved, doremi_ref=reference_dir)])
  m1, m2 = helpers.read_metrics(one), helpers.read_metrics(moved)
  assert [m["step"] for m in m2] == list(range(1, STEPS + 1))
  for a, b in zip(m1, m2):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        list(a["domain_weights"].values()), list(b["domain_weights"].values()), rtol=1e-5,
        atol=1e-7)


@pytest.mark.parametrize(
    "run_file",
    # A schedule's host slices across a change are also checked on the input alone
    # (test_mixing.py); end to end it is slow.
    ["runs/online_doremi.gin",
     pytest.param("runs/schedule.gin", marks=pytest.mark.slow)])
def test_changing_weights_two_processes_equal_one_process(reference_dir, tmp_path, run_file):
  """Online DoReMi (weights from the state, one step late) and a schedule (a change at step
  7 of 8): 2 processes x 4 devices draw the same batches and weights as 1 x 8."""
  online = run_file == "runs/online_doremi.gin"
  args = functools.partial(_train_args, steps=8, doremi_ref=reference_dir if online else None,
                           run_file=run_file,
                           extra=["--gin.train.eval_every=0", *([] if online else helpers.SCHEDULE_FLAGS)])
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  helpers.run([sys.executable, *args(one)])
  helpers.run(
      [sys.executable, LAUNCHER, "--num_processes=2", "--devices_per_process=4", "--", *args(two)])
  m1, m2 = helpers.read_metrics(one), helpers.read_metrics(two)
  assert [m["step"] for m in m1] == [m["step"] for m in m2] == list(range(1, 9))
  for a, b in zip(m1, m2):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    assert list(a["domain_loss"]) == list(b["domain_loss"])  # the same domains drawn
    np.testing.assert_allclose(
        list(a["sampling_weights"].values()), list(b["sampling_weights"].values()), rtol=1e-5,
        atol=1e-7)
  w = [m["sampling_weights"] for m in m1]
  assert w[0] != w[-1], "the weights never changed"


def _start_two(model_dir, tmp_path, extra=()):
  """Two processes of a long run, started directly (no launcher)."""
  coordinator = f"127.0.0.1:{local_run.free_port()}"
  cmd = [
      sys.executable,
      *_train_args(model_dir, steps=100000,
                   extra=("--heartbeat_timeout=10", "--shutdown_timeout=10", *extra))
  ]
  procs = []
  for i in range(2):
    env = local_run.process_env(
        helpers.child_env(4), process_id=i, num_processes=2, devices=4, coordinator=coordinator)
    procs.append(helpers.start(cmd, tmp_path / f"p{i}.log", env=env))
  path = os.path.join(model_dir, "metrics.jsonl")
  deadline = time.time() + 240
  while not (os.path.exists(path) and os.path.getsize(path) > 0):
    assert all(p.poll() is None for p in procs), (tmp_path / "p0.log").read_text()[-3000:]
    assert time.time() < deadline, "the 2-process run did not start training"
    time.sleep(0.2)
  return procs


def _stops_in_bounded_time(survivor, limit):
  t0 = time.time()
  try:
    code = survivor.wait(timeout=limit)
  except subprocess.TimeoutExpired:
    survivor.kill()
    survivor.wait()
    pytest.fail(f"the surviving process was still running {limit}s after its peer died")
  return code, time.time() - t0


def test_killed_process_stops_the_other(tmp_path):
  procs = _start_two(str(tmp_path / "run"), tmp_path)
  procs[1].send_signal(signal.SIGKILL)
  code, took = _stops_in_bounded_time(procs[0], 90)
  procs[1].wait()
  assert code != 0, (code, took)


@pytest.mark.slow
def test_killed_coordinator_stops_the_other(tmp_path):
  procs = _start_two(str(tmp_path / "run"), tmp_path)
  procs[0].send_signal(signal.SIGKILL)
  code, _ = _stops_in_bounded_time(procs[1], 90)
  procs[0].wait()
  assert code != 0


@pytest.mark.slow
def test_stuck_process_is_declared_dead_by_heartbeat(tmp_path):
  """A stopped (not dead) peer keeps its sockets open: only the heartbeat timeout helps."""
  procs = _start_two(str(tmp_path / "run"), tmp_path)
  procs[1].send_signal(signal.SIGSTOP)
  try:
    code, took = _stops_in_bounded_time(procs[0], 90)
  finally:
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
  assert code != 0
  assert took >= 5, took  # it was the heartbeat (10 s), not an immediate socket error


def test_unreachable_coordinator_is_a_clear_error(tmp_path):
  port = local_run.free_port()  # nothing listens there
  t0 = time.time()
  proc = helpers.run([
      sys.executable, *_train_args(str(tmp_path / "run")),
      f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=1",
      "--initialization_timeout=3"
  ], env=helpers.child_env(4), timeout=120, check=False)
  assert proc.returncode != 0
  assert time.time() - t0 < 60
  assert f"could not reach the JAX coordinator at 127.0.0.1:{port} within 3s" in proc.stderr
  assert not os.path.exists(tmp_path / "run")


def test_distributed_flags_are_checked():
  from doremi_jax import distributed  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="needs --num_processes and --process_id"):
    distributed.initialize(coordinator_address="127.0.0.1:1")
  with pytest.raises(ValueError, match="heartbeat_timeout=0"):
    distributed.initialize(coordinator_address="127.0.0.1:1", num_processes=2, process_id=1,
                           heartbeat_timeout=0)
  with pytest.raises(ValueError, match="host:port"):
    distributed.wait_for_coordinator("nohost", 1)


_CHILD = ("import os, sys, time\n"
          "i = int(os.environ['DOREMI_PROCESS_ID'])\n"
          "print('dev', os.environ['XLA_FLAGS'], os.environ['DOREMI_NUM_PROCESSES'],"
          " os.environ['DOREMI_COORDINATOR_ADDRESS'], flush=True)\n"
          "if i == 1: sys.exit(3)\n"
          "time.sleep(600)\n")


def test_launcher_stops_the_others_and_names_the_failed_process():
  t0 = time.time()
  proc = helpers.run([
      sys.executable, LAUNCHER, "--num_processes=3", "--devices_per_process=2", "--grace_seconds=1",
      "--", "-c", _CHILD
  ], timeout=60, check=False)
  assert time.time() - t0 < 30
  assert proc.returncode == 3
  assert "process 1 of 3 exited with status 3" in proc.stderr
  lines = [l for l in proc.stdout.splitlines() if " dev " in f" {l}"]
  assert sorted(l[:5] for l in lines) == ["[p0] ", "[p1] ", "[p2] "]
  assert all("--xla_force_host_platform_device_count=2 3 127.0.0.1:" in l for l in lines)


def test_launcher_success_and_killed_child():
  ok = helpers.run([sys.executable, LAUNCHER, "--num_processes=2", "--", "-c", "print('hi')"],
                   timeout=60)
  assert sorted(ok.stdout.split("\n")[:2]) == ["[p0] hi", "[p1] hi"]
  killed = helpers.run([
      sys.executable, LAUNCHER, "--num_processes=2", "--grace_seconds=1", "--", "-c",
      "import os, signal, time\n"
      "if os.environ['DOREMI_PROCESS_ID'] == '0': os.kill(os.getpid(), signal.SIGKILL)\n"
      "time.sleep(600)\n"
  ], timeout=60, check=False)
  assert killed.returncode != 0
  assert "process 0 of 2 was killed by SIGKILL" in killed.stderr


def test_process_env_replaces_the_device_count():
  env = local_run.process_env({"XLA_FLAGS": "--foo --xla_force_host_platform_device_count=8"},
                              process_id=1, num_processes=2, devices=4, coordinator="127.0.0.1:5")
  assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4"
  assert (env["DOREMI_PROCESS_ID"], env["DOREMI_NUM_PROCESSES"], env["DOREMI_COORDINATOR_ADDRESS"],
          env["JAX_PLATFORMS"]) == ("1", "2", "127.0.0.1:5", "cpu")


def test_downstream_two_processes_equal_one_process(reference_dir, tmp_path):
  """Downstream evaluation of one checkpoint as 2 processes x 4 devices and as 1 x 8, on a
  (2, 2, 2) mesh: the same generations and exact match, written once."""
  results = {}
  for name, launch in (("one", []),
                       ("two", [LAUNCHER, "--num_processes=2", "--devices_per_process=4", "--"])):
    model_dir = tmp_path / name
    shutil.copytree(reference_dir, model_dir)
    helpers.run([
        sys.executable, *launch, "-m", "doremi_jax.evaluate", "--gin_file=gin/runs/downstream.gin",
        f"--gin.MODEL_DIR='{model_dir}'", f"--gin.evaluate.mesh_shape={MESH}",
        "--gin.DownstreamConfig.suite='demo'", "--gin.DownstreamConfig.max_examples=4",
        "--gin.DownstreamConfig.batch_size=4", "--gin.DownstreamConfig.inputs_length=112",
        "--gin.DownstreamConfig.targets_length=16"
    ])
    with open(model_dir / "downstream.json") as f:
      results[name] = json.load(f)
  one, two = results["one"], results["two"]
  assert one["samples"] == two["samples"] and len(one["samples"]["demo_unicode"]) == 4
  assert one["tasks"] == two["tasks"] and one["step"] == two["step"] == 3
