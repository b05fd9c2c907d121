"""Tests for launch/tpu_run.sh: the commands it generates, its errors, and its behaviour against
a fake `gcloud` that simulates the slice (states, preemption, errors) and runs every ssh
command on local worker directories (launch/tpu_worker.sh included)."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from tests import helpers

SCRIPT = os.path.join(helpers.ROOT, "launch", "tpu_run.sh")
WORKER_SCRIPT = os.path.join(helpers.ROOT, "launch", "tpu_worker.sh")


def _run(*args, env=None, check=True, timeout=60):
  return helpers.run(["bash", SCRIPT, *args], env={
      **os.environ,
      **(env or {})
  }, timeout=timeout, check=check)


def _dry_run(*args):
  """Returns the dry run's commands, each as a list of words."""
  proc = _run("--dry-run", *args, env={"PATH": "/usr/bin:/bin"})
  cmds = []
  for line in proc.stdout.splitlines():
    assert line.startswith("+ "), line
    words = shlex.split(line[2:], comments=True)
    if words:
      cmds.append(words)
  return cmds


def _find(cmds, *prefix):
  return [c for c in cmds if c[:len(prefix)] == list(prefix)]


def _remote(cmd):
  """The --command string of a gcloud ssh command, split into shell words."""
  return shlex.split(cmd[cmd.index("--command") + 1])


def _worker_calls(cmds, sub):
  """The ssh commands that run `tpu_worker.sh SUB ...` on the workers, with their arguments."""
  out = []
  for c in _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh"):
    words = _remote(c)
    if "tpu_worker" in words and words[words.index("tpu_worker") + 1] == sub:
      out.append((c, words[words.index("tpu_worker") + 2:]))
  return out


def _python_args(cmds):
  """The python arguments of the run that every worker starts (detached)."""
  starts = _worker_calls(cmds, "start")
  assert len(starts) == 1, cmds
  ssh, (run_id, gs_logs, run_cmd) = starts[0]
  words = shlex.split(run_cmd)
  start = next(i for i, w in enumerate(words) if w.endswith("/bin/python"))
  return ssh, words[start + 1:]


def _verbs(cmds):
  """gcloud's verbs in order, with worker commands named: ssh:preflight, scp, ssh:install..."""
  out = []
  for c in cmds:
    if c[:3] != ["gcloud", "compute", "tpus"]:
      continue
    if c[4] == "ssh":
      words = _remote(c)
      out.append("ssh:" + (words[words.index("tpu_worker") + 1] if "tpu_worker" in words else
                           "install"))
    else:
      out.append(c[4])
  return out


BASE = ["--gin_file", "gin/runs/doremi.gin", "--gin_file", "gin/models/280m.gin"]
V4 = ["--zone", "us-central2-b", "--accelerator-type", "v4-8"]


@pytest.mark.parametrize("accel,zone,runtime", [
    ("v5litepod-8", "us-west4-a", "v2-alpha-tpuv5-lite"),
    ("v4-8", "us-central2-b", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "us-west4-a", "v2-alpha-tpuv5-lite"),
    ("v4-32", "us-central2-b", "tpu-ubuntu2204-base"),
])
def test_create_install_run(accel, zone, runtime):
  cmds = _dry_run("--name", "dr", "--zone", zone, "--accelerator-type", accel, "--project", "proj",
                  *BASE, "--gin", "TRAIN_STEPS=100", "--model-dir", "gs://bucket/run1")
  create = _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "create")
  assert create == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "dr", "--zone", zone, "--project", "proj",
      "--accelerator-type", accel, "--version", runtime
  ]]
  assert not _find(cmds, "gcloud", "compute", "tpus", "queued-resources")
  # The local tree goes to every worker, then is installed on every worker.
  scp = _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "scp")
  assert len(scp) == 1 and "--worker=all" in scp[0] and scp[0][6].startswith("dr:")
  ssh = _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")
  for c in ssh:
    assert c[5:9] == ["dr", "--zone", zone, "--project"] and "--worker=all" in c
  install = [c for c in ssh if "tpu_worker" not in c[c.index("--command") + 1]]
  assert len(install) == 1
  text = install[0][install[0].index("--command") + 1]
  assert "tar -xzf" in text and "pip install" in text and "'.[tpu]'" in text
  _, args = _python_args(cmds)
  assert args == [
      "-m", "doremi_jax.train", "--multihost_tpu", "--gin_file=gin/runs/doremi.gin",
      "--gin_file=gin/models/280m.gin", "--gin.MODEL_DIR='gs://bucket/run1'",
      "--gin.TRAIN_STEPS=100"
  ]
  # Order: check, create, wait, stale processes, copy, install, start detached, follow.
  assert _verbs(cmds) == [
      "describe", "create", "ssh:preflight", "scp", "ssh:install", "ssh:start", "ssh:watch"
  ]


def test_single_and_multi_host_are_both_worker_all():
  for accel in ("v4-8", "v4-32"):
    cmds = _dry_run("--name", "n", "--zone", "us-central2-b", "--accelerator-type", accel, *BASE,
                    "--model-dir", "gs://b/r")
    for c in _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh"):
      assert "--worker=all" in c


@pytest.mark.parametrize("accel,zone", [("v5litepod-16", "us-west4-a"), ("v4-32", "us-central2-b")])
def test_queued_spot(accel, zone):
  cmds = _dry_run("--name", "q", "--zone", zone, "--accelerator-type", accel, "--queued", "--spot",
                  *BASE, "--model-dir", "gs://b/r", "--queue-timeout", "2h")
  create = _find(cmds, "gcloud", "compute", "tpus", "queued-resources", "create")
  assert len(create) == 1
  c = create[0]
  assert c[5] == "q" and c[c.index("--node-id") + 1] == "q"
  assert c[c.index("--accelerator-type") + 1] == accel and "--spot" in c
  assert "--runtime-version" in c
  # An expired request leaves the queue by itself, even if this script is killed.
  assert c[c.index("--valid-until-duration") + 1] == "7200s"
  waits = _find(cmds, "gcloud", "compute", "tpus", "queued-resources", "describe")
  assert all("--format=value(state.state)" in w for w in waits)
  # Check for an existing request, create it, then poll until ACTIVE.
  verbs = [c[4] for c in _find(cmds, "gcloud", "compute", "tpus", "queued-resources")]
  assert verbs == ["describe", "create", "describe"]
  assert not _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "create")


def test_preemptible_and_runtime_override():
  cmds = _dry_run("--name", "p", *V4, "--preemptible", "--runtime-version", "tpu-vm-v4-base", *BASE)
  (create,) = _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "create")
  assert create[-3:] == ["--version", "tpu-vm-v4-base", "--preemptible"]


def test_network_options():
  common = ["--internal-ip", "--network", "net", "--subnetwork", "sub", "--service-account",
            "sa@p.iam.gserviceaccount.com", "--scopes", "cloud-platform", "--labels", "team=lm,x=y"]
  extra = ["--network", "net", "--subnetwork", "sub", "--service-account",
           "sa@p.iam.gserviceaccount.com", "--scopes", "cloud-platform", "--labels", "team=lm,x=y"]
  for queued, verb in ((False, "tpu-vm"), (True, "queued-resources")):
    cmds = _dry_run("--name", "n", *V4, *BASE, *common, *(["--queued"] if queued else []))
    (create,) = _find(cmds, "gcloud", "compute", "tpus", verb, "create")
    assert "--internal-ips" in create and create[-len(extra):] == extra
    for c in (_find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh") +
              _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "scp")):
      assert "--internal-ip" in c


def test_gin_quoting_survives_two_shells():
  cmds = _dry_run("--name", "g", "--zone", "us-west4-a", "--accelerator-type", "v5litepod-8", *BASE,
                  "--gin", "MODEL_DIR='gs://b/x'", "--gin", "train.run_name=\"it's a b\"", "--gin",
                  "MIXTURE_OR_TASK_NAME='pile_$HOME;`x`'", "--gin",
                  "TASK_FEATURE_LENGTHS={'targets': 1024}")
  _, args = _python_args(cmds)
  assert args[-4:] == [
      "--gin.MODEL_DIR='gs://b/x'", "--gin.train.run_name=\"it's a b\"",
      "--gin.MIXTURE_OR_TASK_NAME='pile_$HOME;`x`'", "--gin.TASK_FEATURE_LENGTHS={'targets': 1024}"
  ]


@pytest.mark.parametrize("stage,module", [("pipeline", "doremi_jax.pipeline"),
                                          ("eval", "doremi_jax.evaluate"),
                                          ("train", "doremi_jax.train")])
def test_stages(stage, module):
  cmds = _dry_run("--name", "s", *V4, "--stage", stage, "--gin_file",
                  "gin/pipelines/pile_280m.gin")
  _, args = _python_args(cmds)
  assert args == ["-m", module, "--multihost_tpu", "--gin_file=gin/pipelines/pile_280m.gin"]


def test_model_dir_is_pipeline_dir_for_the_pipeline():
  cmds = _dry_run("--name", "s", "--zone", "us-west4-a", "--accelerator-type", "v5litepod-16",
                  "--stage", "pipeline", "--gin_file", "gin/pipelines/pile_280m.gin",
                  "--model-dir", "gs://b/study")
  _, args = _python_args(cmds)
  assert args[-1] == "--gin.PIPELINE_DIR='gs://b/study'"


def test_env_skip_install_pin_and_compilation_cache():
  cmds = _dry_run("--name", "e", *V4, *BASE, "--env", "XLA_FLAGS=--xla_a=1 --xla_b",
                  "--skip-install", "--model-dir", "gs://bkt/runs/r1")
  assert _verbs(cmds) == ["describe", "create", "ssh:preflight", "ssh:start", "ssh:watch"]
  (_, (run_id, gs_logs, run_cmd)), = _worker_calls(cmds, "start")
  words = shlex.split(run_cmd)
  assert "XLA_FLAGS=--xla_a=1 --xla_b" in words
  # The compilation cache lives in the bucket; the logs next to the run.
  assert "JAX_COMPILATION_CACHE_DIR=gs://bkt/jax_compilation_cache" in words
  assert gs_logs == f"gs://bkt/runs/r1/tpu_logs/{run_id}"
  cmds = _dry_run("--name", "e", *V4, *BASE, "--model-dir", "gs://bkt/r", "--compilation-cache",
                  "none")
  (_, (_, _, run_cmd)), = _worker_calls(cmds, "start")
  assert "JAX_COMPILATION_CACHE_DIR" not in run_cmd
  # The workers get this machine's jax, pinned; or the one asked for.
  import importlib.metadata
  install = [c for c in cmds if c[4:5] == ["ssh"] and "pip install" in c[-1]][0][-1]
  assert f"'jax[tpu]=={importlib.metadata.version('jax')}'" in install
  cmds = _dry_run("--name", "e", *V4, *BASE, "--jax-version", "0.7.2")
  install = [c for c in cmds if c[4:5] == ["ssh"] and "pip install" in c[-1]][0][-1]
  assert "'jax[tpu]==0.7.2'" in install
  cmds = _dry_run("--name", "e", *V4, *BASE, "--jax-version", "none")
  install = [c for c in cmds if c[4:5] == ["ssh"] and "pip install" in c[-1]][0][-1]
  assert "jax[tpu]" not in install


def test_git_repo_install():
  cmds = _dry_run("--name", "r", *V4, *BASE, "--repo", "https://github.com/me/doremi_jax.git",
                  "--ref", "v0.1")
  assert not _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "scp")
  install = [c for c in cmds if c[4:5] == ["ssh"] and "git clone" in c[-1]]
  text = install[0][-1]
  assert "git clone --quiet https://github.com/me/doremi_jax.git ~/doremi_jax" in text
  assert "checkout --quiet v0.1" in text


def test_delete_after_run_and_delete_only():
  cmds = _dry_run("--name", "d", *V4, *BASE, "--delete")
  assert cmds[-1] == [
      "gcloud", "compute", "tpus", "tpu-vm", "delete", "d", "--zone", "us-central2-b", "--quiet"
  ]
  for args in (["--delete-only"], ["delete"]):
    cmds = _dry_run(*args, "--name", "d", "--zone", "z")
    assert cmds == [[
        "gcloud", "compute", "tpus", "tpu-vm", "delete", "d", "--zone", "z", "--quiet"
    ]]
  cmds = _dry_run("--name", "d", "--zone", "z", "--delete-only", "--queued")
  assert cmds == [[
      "gcloud", "compute", "tpus", "queued-resources", "delete", "d", "--zone", "z", "--force",
      "--quiet"
  ]]


def test_status_logs_kill_attach_commands():
  scope = ["--name", "n", "--zone", "us-central2-b", "--project", "p"]
  head = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "n", "--zone", "us-central2-b", "--project",
          "p"]
  (c,) = _dry_run("logs", *scope, "--worker", "2", "--lines", "50", "--no-follow")
  assert c[:11] == [*head, "--worker=2"]
  assert _remote(c)[-4:] == ["logs", "current", "50", "0"]
  (c,) = _dry_run("logs", *scope, "--run", "train-1")
  assert c[10] == "--worker=all" and _remote(c)[-4:] == ["logs", "train-1", "100", "1"]
  (c,) = _dry_run("kill", *scope, "--kill-grace", "30")
  assert c[:11] == [*head, "--worker=all"] and _remote(c)[-2:] == ["kill", "30"]
  (c,) = _dry_run("attach", *scope)
  assert c[:11] == [*head, "--worker=all"] and _remote(c)[-3:] == ["watch", "current", "none"]
  # status: describe the slice (and its request), then ask every worker.
  describe, qr, c = _dry_run("status", *scope, "--queued")
  assert describe[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "n"]
  assert qr[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "n"]
  assert c[:11] == [*head, "--worker=all"] and _remote(c)[-1] == "status"


def test_dry_run_pile_pipeline_v5litepod_256_queued_spot_retries():
  cmds = _dry_run("--name", "pile", "--zone", "us-west4-a", "--accelerator-type", "v5litepod-256",
                  "--queued", "--spot", "--retries", "2", "--stage", "pipeline", "--gin_file",
                  "gin/pipelines/pile_280m.gin", "--model-dir", "gs://bkt/pile_280m", "--env",
                  "DOREMI_JAX_DATA_DIR=gs://bkt/data")
  assert _verbs(cmds) == [
      "describe", "create", "describe", "describe", "ssh:preflight", "scp", "ssh:install",
      "ssh:start", "ssh:watch"
  ]
  (create,) = _find(cmds, "gcloud", "compute", "tpus", "queued-resources", "create")
  assert create[create.index("--accelerator-type") + 1] == "v5litepod-256"
  assert "--spot" in create and create[create.index("--valid-until-duration") + 1] == "86400s"
  _, args = _python_args(cmds)
  assert args == [
      "-m", "doremi_jax.pipeline", "--multihost_tpu", "--gin_file=gin/pipelines/pile_280m.gin",
      "--gin.PIPELINE_DIR='gs://bkt/pile_280m'"
  ]
  proc = _run("--dry-run", "--name", "pile", "--zone", "us-west4-a", "--accelerator-type",
              "v5litepod-256", "--queued", "--spot", "--retries", "2", "--stage", "pipeline",
              "--gin_file", "gin/pipelines/pile_280m.gin", "--model-dir", "gs://bkt/pile_280m",
              env={"PATH": "/usr/bin:/bin"})
  assert "# on preemption, up to 2 time(s)" in proc.stdout


def test_compile_check_runs_locally():
  cmds = _dry_run("--stage", "compile_check", "--accelerator-type", "v5litepod-16", *BASE)
  assert len(cmds) == 1
  assert cmds[0][1:] == [
      "-m", "doremi_jax.compile_check", "--gin_file=gin/runs/doremi.gin",
      "--gin_file=gin/models/280m.gin", "--topology=v5e:4x4"
  ]
  cmds = _dry_run("--stage", "compile_check", "--accelerator-type", "v4-32", *BASE)
  assert cmds[0][-1] == "--topology=v4:2x2x4"


@pytest.mark.parametrize("args,message", [
    ([*V4[:2], "--accelerator-type", "v4-8", *BASE], "--name"),
    (["--name", "n", "--accelerator-type", "v4-8", *BASE], "--zone"),
    (["--name", "n", "--zone", "us-central2-b", *BASE], "--accelerator-type"),
    (["--name", "n", *V4], "--gin_file"),
    (["--delete-only", "--zone", "z"], "--name"),
    (["--name", "n", *V4, *BASE, "--stage", "x"], "--stage"),
    (["--name", "n", *V4, *BASE, "--gin", "NOEQUALS"], "NAME=VALUE"),
    (["--name", "n", "--zone", "z", "--accelerator-type", "tpu9", *BASE], "accelerator-type"),
    (["--name", "n", "--zone", "us-west4-a", "--accelerator-type", "v5e-8", *BASE],
     "unknown --accelerator-type"),
    (["--name", "n", "--zone", "us-west4-a", "--accelerator-type", "v5litepod-12", *BASE],
     "unknown --accelerator-type"),
    (["--name", "n", *V4, *BASE, "--bogus"], "unknown flag"),
    (["--name"], "needs a value"),
    # Before paying: gin files, zone, multi-host output dir, bounded waits.
    (["--name", "n", *V4, "--gin_file", "/abs/doremi.gin"], "relative to the repository"),
    (["--name", "n", *V4, "--gin_file", "gin/runs/nope.gin"], "no such file"),
    (["--name", "n", *V4, "--gin_file", "../x/gin/runs/doremi.gin"], "leaves the repository"),
    (["--name", "n", "--zone", "us-west4-a", "--accelerator-type", "v4-8", *BASE],
     "not offered in us-west4-a"),
    (["--name", "n", "--zone", "us-central2-b", "--accelerator-type", "v5litepod-8", *BASE],
     "not offered in us-central2-b"),
    (["--name", "n", "--zone", "us-central2-b", "--accelerator-type", "v4-32", *BASE],
     "must be a gs:// path"),
    (["--name", "n", "--zone", "us-central2-b", "--accelerator-type", "v4-32", *BASE,
      "--model-dir", "/tmp/run"], "must be a gs:// path"),
    (["--name", "n", *V4, *BASE, "--queued", "--queue-timeout", "0"], "more than 0"),
    (["--name", "n", *V4, *BASE, "--queue-timeout", "soon"], "duration"),
])
def test_errors(args, message):
  proc = _run("--dry-run", *args, check=False)
  assert proc.returncode == 2, proc.stderr
  assert message in proc.stderr and "error" in proc.stderr
  assert not proc.stdout


def test_zone_check_can_be_skipped_and_reserved_zones_are_noted():
  cmds = _dry_run("--name", "n", "--zone", "us-west4-a", "--accelerator-type", "v4-8", *BASE,
                  "--skip-zone-check")
  assert _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "create")
  proc = _run("--dry-run", "--name", "n", "--zone", "us-east5-b", "--accelerator-type",
              "v5litepod-8", *BASE, env={"PATH": "/usr/bin:/bin"})
  assert "single-tenant" in proc.stderr


def test_help():
  proc = _run("--help")
  for word in ("--accelerator-type", "--dry-run", "--retries", "status", "attach", "kill"):
    assert word in proc.stdout


# ------------------------------------------------------------------ against a fake gcloud

_FAKE_GCLOUD = r'''"""A fake `gcloud` for the launch/tpu_run.sh tests: a TPU slice as a small state
machine, and workers as local directories on which `tpu-vm ssh --command` really runs.

Installed on PATH as `gcloud` by tests/test_tpu_run.py, with FAKE_DIR in the environment. It
records every call (one JSON list a line in FAKE_DIR/calls.jsonl) and keeps the slice in
FAKE_DIR/state.json:

  tpu, qr          the TPU VM's and the queued resource's state ("MISSING": NOT_FOUND)
  tpu_next         states the next describes go through (the last one stays)
  qr_next          states the queued resource goes through after create
  accel, workers   the slice's accelerator type and worker count
  create_sleep     seconds a tpu-vm create takes (FAKE_DIR/creating exists while it runs)
  auth_error       describe fails with an auth error

A worker is FAKE_DIR/workers/wN (its HOME): ssh runs `bash -c COMMAND` there with
DOREMI_WORKER_ID=N, every worker at once, and streams their output. The file FAKE_DIR/preempt
(written by a fake trainer) preempts the slice: the next call finds it PREEMPTED (its queued
resource SUSPENDED) and every run on the workers killed, as on a real preemption.
"""
import fcntl
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

FAKE = os.environ["FAKE_DIR"]
STATE = os.path.join(FAKE, "state.json")


def _locked(fn):
  with open(os.path.join(FAKE, "lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    with open(STATE) as f:
      state = json.load(f)
    out = fn(state)
    with open(STATE, "w") as f:
      json.dump(state, f)
    return out


def _kill_runs():
  for pid_file in glob.glob(os.path.join(FAKE, "workers", "*", "doremi_runs", "*", "pid")):
    try:
      os.killpg(int(open(pid_file).read()), signal.SIGKILL)
    except (ValueError, OSError):
      pass


def _worker_home(i):
  home = os.path.join(FAKE, "workers", f"w{i}")
  os.makedirs(os.path.join(home, ".local", "bin"), exist_ok=True)
  uv = os.path.join(home, ".local", "bin", "uv")
  if not os.path.exists(uv):
    shutil.copy(os.path.join(FAKE, "fake_uv"), uv)
  return home


def _wipe_workers():
  shutil.rmtree(os.path.join(FAKE, "workers"), ignore_errors=True)


def _step(state, args):
  """Applies one call to the state; returns (exit status, stdout, stderr)."""
  if os.path.exists(os.path.join(FAKE, "preempt")):
    os.remove(os.path.join(FAKE, "preempt"))
    _kill_runs()
    state["tpu"] = "PREEMPTED"
    state["tpu_next"] = []
    if state["qr"] != "MISSING":
      state["qr"] = "SUSPENDED"
      state["qr_next"] = []
  words = [a for a in args if not a.startswith("-")]
  kind, verb = words[2], words[3]
  fmt = next((a.split("=", 1)[1] for a in args if a.startswith("--format=")), "")
  if verb == "describe":
    if state.get("auth_error"):
      return 1, "", ("ERROR: (gcloud.compute.tpus.describe) There was a problem refreshing your "
                     "current auth tokens: Reauthentication failed.\n")
    if kind == "queued-resources":
      if state["qr_next"]:
        state["qr"] = state["qr_next"].pop(0)
        if state["qr"] == "ACTIVE" and state["tpu"] == "MISSING":
          state["tpu"] = "READY"
      if state["qr"] == "MISSING":
        return 1, "", ("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: "
                       "not found\n")
      return 0, state["qr"] + "\n", ""
    if state["tpu_next"]:
      state["tpu"] = state["tpu_next"].pop(0)
    if state["tpu"] == "MISSING":
      return 1, "", ("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource "
                     "'projects/p/locations/z/nodes/x' was not found\n")
    if fmt == "value(state,acceleratorType)":
      return 0, f"{state['tpu']}\t{state['accel']}\n", ""
    return 0, state["tpu"] + "\n", ""
  if verb == "create":
    _wipe_workers()
    if kind == "queued-resources":
      state["qr"] = "ACCEPTED"
      state["qr_next"] = list(state.get("qr_sequence", ["ACTIVE"]))
    else:
      state["tpu"] = "CREATING"
      state["tpu_next"] = list(state.get("create_sequence", ["READY"]))
    return 0, "", ""
  if verb == "delete":
    _kill_runs()
    _wipe_workers()
    if kind == "queued-resources":
      state["qr"] = "MISSING"
    state["tpu"] = "MISSING"
    state["tpu_next"] = []
    return 0, "", ""
  return 0, "", ""


def _workers(args, count):
  flag = next((a for a in args if a.startswith("--worker=")), "--worker=0")
  which = flag.split("=", 1)[1]
  return list(range(count)) if which == "all" else [int(which)]


def _ssh(args, count):
  command = args[args.index("--command") + 1]
  procs = []
  for i in _workers(args, count):
    home = _worker_home(i)
    env = {
        **os.environ, "HOME": home,
        "DOREMI_WORKER_ID": str(i),
        "DOREMI_TPU_DEVICES": os.path.join(home, "accel0"),
        "DOREMI_LIBTPU_LOCKFILE": os.path.join(home, "libtpu_lockfile"),
        "DOREMI_LOG_SYNC_SECS": "0.3"
    }
    open(env["DOREMI_TPU_DEVICES"], "a").close()
    procs.append(subprocess.Popen(["bash", "-c", command], cwd=home, env=env,
                                  stdout=subprocess.PIPE, stderr=sys.stderr))

  def pump(p):
    for line in p.stdout:
      sys.stdout.buffer.write(line)
      sys.stdout.buffer.flush()

  def stop(*_):
    for p in procs:
      p.kill()
    os._exit(143)

  signal.signal(signal.SIGTERM, stop)
  threads = [threading.Thread(target=pump, args=(p,)) for p in procs]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return max(p.wait() for p in procs)


def _scp(args, count):
  src = [a for a in args[4:] if not a.startswith("-")][0]
  for i in _workers(args, count):
    shutil.copy(src, os.path.join(_worker_home(i), "doremi_jax_src.tar.gz"))
  return 0


def main(args):
  with open(os.path.join(FAKE, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\n")
  if args[:2] == ["storage", "cp"]:  # a worker copying its log to the bucket
    dest = os.path.join(FAKE, "bucket", args[3].replace("gs://", ""))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copy(args[2], dest)
    return 0
  state = _locked(lambda s: s)
  words = [a for a in args if not a.startswith("-")]
  if words[:4] == ["compute", "tpus", "tpu-vm", "create"] and state.get("create_sleep"):
    open(os.path.join(FAKE, "creating"), "w").close()  # the test's signal: create under way
    time.sleep(state["create_sleep"])
  if args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    return _ssh(args, state["workers"])
  if args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    return _scp(args, state["workers"])
  rc, out, err = _locked(lambda s: _step(s, args))
  sys.stdout.write(out)
  sys.stderr.write(err)
  return rc


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
'''

_FAKE_UV = """#!/usr/bin/env bash
echo "uv $*" >> "$FAKE_DIR/uv_calls"
if [ "$1" = venv ]; then
  mkdir -p "$HOME/doremi_venv/bin"
  cp "$FAKE_DIR/fake_python" "$HOME/doremi_venv/bin/python"
fi
"""

# The workers' "python": says what it runs, then does what py.sh says (W is its worker).
_FAKE_PYTHON = """#!/usr/bin/env bash
W="$DOREMI_WORKER_ID"
echo "python on worker $W: $*"
. "$FAKE_DIR/py.sh"
"""

# How long a test waits for the launcher (a signalled exit, a command): generous, so that a
# loaded machine cannot fail a test whose outcome does not depend on speed.
WAIT = 90

SUCCESS = 'for i in 1 2 3; do echo "step $i/3 loss 3.2"; sleep 0.05; done\n'

# Runs until stopped; records the SIGTERM it got.
WAIT_FOR_TERM = ('trap \'echo "worker $W: SIGTERM" > "$FAKE_DIR/term_w$W"; exit 143\' TERM\n'
                 'echo "step 5/100 loss 3.0"\n'
                 'for i in $(seq 300); do sleep 0.1; done\n')


def _default_sigint():
  signal.signal(signal.SIGINT, signal.SIG_DFL)


class Fake:
  """The fake gcloud's directory: its state, its calls, its workers."""

  def __init__(self, tmp_path, *, accel="v4-32", workers=4, tpu="MISSING", qr="MISSING",
               py=SUCCESS, **state):
    self.dir = tmp_path / "fake"
    self.dir.mkdir()
    self.bin = tmp_path / "bin"
    self.bin.mkdir()
    gcloud = self.bin / "gcloud"
    gcloud.write_text(f"#!{sys.executable} -S\n" + _FAKE_GCLOUD)
    gcloud.chmod(0o755)
    for name, text in (("fake_uv", _FAKE_UV), ("fake_python", _FAKE_PYTHON), ("py.sh", py)):
      (self.dir / name).write_text(text)
      (self.dir / name).chmod(0o755)
    (self.dir / "state.json").write_text(
        json.dumps({
            "accel": accel,
            "workers": workers,
            "tpu": tpu,
            "qr": qr,
            "tpu_next": [],
            "qr_next": [],
            **state
        }))
    self.logs = tmp_path / "logs"
    self.env = {
        **os.environ, "PATH": f"{self.bin}:/usr/bin:/bin",
        "FAKE_DIR": str(self.dir),
        "TMPDIR": str(tmp_path)
    }

  def calls(self):
    path = self.dir / "calls.jsonl"
    if not path.exists():
      return []
    return [json.loads(l) for l in path.read_text().splitlines()]

  def verbs(self):
    """('tpu-vm'|'queued-resources', verb) of each call, ssh with its worker command."""
    out = []
    for c in self.calls():
      if c[:2] != ["compute", "tpus"]:
        continue
      if c[3] == "ssh":
        words = shlex.split(c[c.index("--command") + 1])
        out.append("ssh:" + (words[words.index("tpu_worker") + 1] if "tpu_worker" in words else
                             "install"))
      else:
        out.append(c[3] if c[2] == "tpu-vm" else "qr-" + c[3])
    return out

  def worker(self, i):
    return self.dir / "workers" / f"w{i}"

  def run(self, *args, check=False, timeout=60):
    return _run(*args, "--poll-interval", "0.2", "--kill-grace", "3", "--log-dir", str(self.logs),
                env=self.env, check=check, timeout=timeout)

  def start(self, *args, log):
    # The launcher gets SIGINT's default disposition: one ignored in this test process (as
    # something earlier in a full run leaves it) would be inherited through exec, and bash
    # cannot trap a signal ignored at its start, so Ctrl-C tests would see exit 0, not 130.
    return subprocess.Popen(
        ["bash", SCRIPT, *args, "--poll-interval", "0.2", "--kill-grace", "3", "--log-dir",
         str(self.logs)], cwd=helpers.ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        preexec_fn=_default_sigint)

  def wait_for(self, predicate, what, timeout=WAIT):
    deadline = time.time() + timeout
    while time.time() < deadline:
      if predicate():
        return
      time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}; calls: {self.verbs()}")

  def cleanup(self):
    """Kills whatever detached runs the test left on the fake workers."""
    for pid_file in (self.dir / "workers").glob("*/doremi_runs/train-*/pid"):
      try:
        os.killpg(int(pid_file.read_text()), signal.SIGKILL)
      except (ValueError, OSError):
        pass


@pytest.fixture
def fake(tmp_path):
  made = []

  def make(**kw):
    made.append(Fake(tmp_path, **kw))
    return made[-1]

  yield make
  for f in made:
    f.cleanup()


MULTI = ["--name", "f", "--zone", "us-central2-b", "--accelerator-type", "v4-32", *BASE,
         "--model-dir", "gs://bkt/run", "--no-ssh-agent-check"]
SINGLE = ["--name", "f", *V4, *BASE]


def test_run_on_four_workers_detached_with_logs(fake):
  f = fake(py=SUCCESS, tpu="READY")  # an existing slice
  # A stale process from an earlier run holds worker 1's TPU, and left the libtpu lock.
  w1 = f.worker(1)
  w1.mkdir(parents=True)
  (w1 / "accel0").write_text("")
  (w1 / "libtpu_lockfile").write_text("")
  stale = subprocess.Popen(["bash", "-c", f"exec 3<{w1 / 'accel0'}; exec sleep 300"])
  try:
    time.sleep(0.3)
    proc = f.run(*MULTI, "--gin", "TRAIN_STEPS=3")
    assert proc.returncode == 0, proc.stderr
    assert stale.wait(timeout=10) is not None  # stopped before the run
  finally:
    stale.kill()
  assert not (w1 / "libtpu_lockfile").exists()
  assert "stopping process" in proc.stderr
  # Reused (READY), stale processes stopped, copied, installed, started, followed (with a
  # look at the slice's state now and then).
  verbs = [v for v in f.verbs() if v != "describe"]
  assert f.verbs()[0] == "describe"
  assert verbs == ["ssh:preflight", "scp", "ssh:install", "ssh:start", "ssh:watch"]
  # Every worker ran the command once, detached, and its log came back per worker.
  (run_dir,) = (f.logs / "f").iterdir()
  for i in range(4):
    log = (run_dir / f"worker-{i}.log").read_text()
    assert log.count("python on worker") == 1 and "step 3/3 loss 3.2" in log
    assert "--gin.MODEL_DIR='gs://bkt/run'" in log
    bucket_log = f.dir / "bucket" / "bkt" / "run" / "tpu_logs" / run_dir.name / f"worker-{i}.log"
    assert bucket_log.exists()
    (wrun,) = (f.worker(i) / "doremi_runs").glob("train-*")
    assert (wrun / "exit_code").read_text().strip() == "0"
  assert "[w2] step 3/3 loss 3.2" in proc.stdout
  # The install pinned this machine's jax; the code went without local logs.
  import importlib.metadata
  uv = (f.dir / "uv_calls").read_text()
  assert f"jax[tpu]=={importlib.metadata.version('jax')}" in uv
  assert "bills until deleted" in proc.stderr  # the slice is kept, and said so


def test_tarball_leaves_out_local_logs(fake):
  f = fake(accel="v4-8", workers=1)
  made_dir = not os.path.exists(os.path.join(helpers.ROOT, "tpu_logs"))
  stray = os.path.join(helpers.ROOT, "tpu_logs", f"old-{os.getpid()}.log")
  os.makedirs(os.path.dirname(stray), exist_ok=True)
  open(stray, "w").close()
  try:
    assert f.run(*SINGLE).returncode == 0
  finally:
    os.remove(stray)
    if made_dir:
      os.rmdir(os.path.dirname(stray))
  with tarfile.open(f.worker(0) / "doremi_jax_src.tar.gz") as tar:
    names = tar.getnames()
  assert "launch/tpu_run.sh" in names and "launch/tpu_worker.sh" in names and "setup.py" in names
  assert not any(n.startswith((".git/", "tpu_logs/")) for n in names)


def test_worker_failure_stops_the_others(fake):
  f = fake(py='if [ "$W" = 2 ]; then echo "boom on 2"; exit 7; fi\n' + WAIT_FOR_TERM)
  t0 = time.time()
  proc = f.run(*MULTI, "--delete")
  assert proc.returncode == 7, proc.stderr
  assert time.time() - t0 < 30
  assert "worker 2 failed with exit status 7" in proc.stderr
  assert "boom on 2" in proc.stderr  # the failing worker's last lines
  for i in (0, 1, 3):  # stopped by SIGTERM (fail-fast), not left running
    assert (f.dir / f"term_w{i}").exists(), i
  verbs = f.verbs()
  assert "ssh:kill" in verbs and verbs[-1] == "delete"


@pytest.mark.parametrize("queued", [False, True])
def test_retries_reruns_after_a_preemption(fake, queued):
  # Worker 0 of the first run announces a preemption; the second run finishes.
  py = ('n=$(cat "$FAKE_DIR/n_w$W" 2>/dev/null || echo 0); echo $((n+1)) > "$FAKE_DIR/n_w$W"\n'
        'if [ "$n" = 0 ]; then\n'
        '  [ "$W" = 0 ] && touch "$FAKE_DIR/preempt"\n'
        '  echo "step 7/100"; for i in $(seq 300); do sleep 0.1; done\n'
        'fi\n' + SUCCESS)
  f = fake(py=py)
  proc = f.run(*MULTI, "--retries", "1", "--spot", *(["--queued"] if queued else []))
  assert proc.returncode == 0, proc.stderr
  assert "retry 1 of 1" in proc.stderr
  verbs = f.verbs()
  if queued:  # the SUSPENDED request is deleted and requested again
    assert verbs.count("qr-create") == 2 and "qr-delete" in verbs and "create" not in verbs
  else:
    assert verbs.count("create") == 2 and "delete" in verbs
  assert verbs.count("ssh:start") == 2 and verbs.count("ssh:install") == 2  # a fresh slice
  starts = [c for c in f.calls() if c[3:4] == ["ssh"] and "tpu_worker start" in c[-1]]
  second = shlex.split(shlex.split(starts[1][-1])[-1])
  assert "--gin.MODEL_DIR='gs://bkt/run'" in second  # the same command again
  for i in range(4):
    assert (f.dir / f"n_w{i}").read_text().strip() == "2"


def test_preemption_without_retries_fails(fake):
  py = ('[ "$W" = 0 ] && touch "$FAKE_DIR/preempt"\n'
        'for i in $(seq 300); do sleep 0.1; done\n')
  f = fake(py=py)
  proc = f.run(*MULTI)
  assert proc.returncode == 1
  assert "no retries are left" in proc.stderr


def test_trainer_preemption_exit_0_counts_as_preemption(fake):
  # The trainer saves a checkpoint on SIGTERM and exits 0: a retry, not a success.
  py = ('n=$(cat "$FAKE_DIR/n_w$W" 2>/dev/null || echo 0); echo $((n+1)) > "$FAKE_DIR/n_w$W"\n'
        'if [ "$n" = 0 ]; then\n'
        '  echo "W0 preempted: checkpoint saved at step 9; exiting."; exit 0\n'
        'fi\n'
        + SUCCESS)
  f = fake(accel="v4-8", workers=1, tpu="READY", py=py)
  proc = f.run(*SINGLE, "--retries", "1")
  assert proc.returncode == 0, proc.stderr
  assert f.verbs().count("ssh:start") == 2 and "create" not in f.verbs()  # same slice


def test_lost_connection_neither_kills_nor_duplicates(fake):
  # The first watch connection drops; the run goes on, is followed again, ends once.
  f = fake(py='for i in $(seq 1 20); do echo "step $i/20"; sleep 0.1; done\n')
  stamp = f.dir / "dropped"
  wrapper = f.bin / "gcloud"
  real = f.bin / "gcloud.real"
  wrapper.rename(real)
  wrapper.write_text("#!/usr/bin/env bash\n"
                     f"if [[ \"$*\" == *'tpu_worker watch'* && ! -e {stamp} ]]; then\n"
                     f"  touch {stamp}; timeout 0.5 {real} \"$@\"; exit 255\n"
                     "fi\n"
                     f"exec {real} \"$@\"\n")
  wrapper.chmod(0o755)
  proc = f.run(*MULTI)
  assert proc.returncode == 0, proc.stderr
  assert "lost the connection" in proc.stderr
  assert f.verbs().count("ssh:start") == 1 and f.verbs().count("ssh:watch") >= 2
  (run_dir,) = (f.logs / "f").iterdir()
  for i in range(4):
    lines = (run_dir / f"worker-{i}.log").read_text().splitlines()
    steps = [l for l in lines if l.startswith("step ")]
    assert steps == [f"step {k}/20" for k in range(1, 21)], (i, lines)  # none lost, none twice


def test_start_is_idempotent_on_a_worker(tmp_path):
  env = {**os.environ, "HOME": str(tmp_path), "DOREMI_WORKER_ID": "0",
         "DOREMI_TPU_DEVICES": str(tmp_path / "none")}
  cmd = ["bash", WORKER_SCRIPT, "start", "r1", "", "echo ran >> " + str(tmp_path / "ran")]
  first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=WAIT)
  again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=WAIT)
  assert "@@DOREMI_STARTED worker=0 run=r1" in first.stdout
  assert "already started" in again.stdout
  watch = subprocess.run(["bash", WORKER_SCRIPT, "watch", "r1", "none"], env=env,
                         capture_output=True, text=True, timeout=WAIT)
  assert "@@DOREMI_EXIT worker=0 rc=0" in watch.stdout
  assert (tmp_path / "ran").read_text() == "ran\n"


def test_preempted_during_ready_wait_stops_and_deletes(fake):
  f = fake(accel="v4-8", workers=1, create_sequence=["CREATING", "CREATING", "PREEMPTED"])
  t0 = time.time()
  proc = f.run(*SINGLE)
  assert proc.returncode == 1 and time.time() - t0 < 20
  assert "PREEMPTED while waiting for READY" in proc.stderr
  assert f.verbs() == ["describe", "create", "describe", "describe", "describe", "delete"]


def test_ready_wait_times_out_and_deletes(fake):
  f = fake(accel="v4-8", workers=1, create_sequence=["CREATING"])
  proc = f.run(*SINGLE, "--ready-timeout", "1")
  assert proc.returncode == 1 and "not READY after 1 s" in proc.stderr
  assert f.verbs()[-1] == "delete"


def test_queue_timeout_deletes_the_request(fake):
  f = fake(accel="v4-8", workers=1, qr_sequence=["WAITING_FOR_RESOURCES"])
  t0 = time.time()
  proc = f.run(*SINGLE, "--queued", "--queue-timeout", "1")
  assert proc.returncode == 1 and time.time() - t0 < 20
  assert "not ACTIVE after 1 s" in proc.stderr
  (create,) = [c for c in f.calls() if c[2:4] == ["queued-resources", "create"]]
  assert create[create.index("--valid-until-duration") + 1] == "1s"
  verbs = f.verbs()
  assert verbs[:2] == ["qr-describe", "qr-create"] and verbs[-1] == "qr-delete"
  assert "create" not in verbs and "ssh:preflight" not in verbs


def test_failed_queued_resource_is_deleted(fake):
  f = fake(accel="v4-8", workers=1, qr_sequence=["WAITING_FOR_RESOURCES", "FAILED"])
  proc = f.run(*SINGLE, "--queued")
  assert proc.returncode == 1 and "is FAILED" in proc.stderr
  assert f.verbs()[-1] == "qr-delete"


@pytest.mark.parametrize("sig,rc", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_during_queue_wait_deletes_the_request(fake, tmp_path, sig, rc):
  f = fake(accel="v4-8", workers=1, qr_sequence=["WAITING_FOR_RESOURCES"])
  with open(tmp_path / "out.log", "w") as log:
    proc = f.start(*SINGLE, "--queued", log=log)
    f.wait_for(lambda: "qr-create" in f.verbs() and f.verbs().count("qr-describe") >= 3,
               "the queue wait")
    proc.send_signal(sig)
    assert proc.wait(timeout=WAIT) == rc
  assert f.verbs()[-1] == "qr-delete", (tmp_path / "out.log").read_text()


def test_ctrl_c_during_create_deletes_the_slice(fake, tmp_path):
  f = fake(accel="v4-8", workers=1, create_sleep=180)
  with open(tmp_path / "out.log", "w") as log:
    proc = f.start(*SINGLE, log=log)
    # The fake's own marker, not the call log: the signal must land inside the create.
    f.wait_for((f.dir / "creating").exists, "the create call")
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=WAIT) == 130
    assert time.time() - t0 < 90  # at once, not after the 180 s create
  assert f.verbs()[-1] == "delete"
  assert not [v for v in f.verbs() if v.startswith("ssh")], "the slice was used, not deleted"


def test_reused_slice_is_kept_on_ctrl_c_without_delete(fake, tmp_path):
  f = fake(accel="v4-8", workers=1, tpu="READY", py=WAIT_FOR_TERM)
  with open(tmp_path / "out.log", "w") as log:
    proc = f.start(*SINGLE, log=log)
    f.wait_for(lambda: list(f.worker(0).glob("doremi_runs/train-*/pid")), "the run")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=WAIT) == 130
  assert "delete" not in f.verbs()
  # Ctrl-C only stopped following: the detached run goes on.
  (pid_file,) = f.worker(0).glob("doremi_runs/train-*/pid")
  os.kill(int(pid_file.read_text()), 0)
  assert not (f.dir / "term_w0").exists()


def test_describe_errors_are_shown_not_taken_for_no_slice(fake):
  f = fake(accel="v4-8", workers=1, auth_error=True)
  proc = f.run(*SINGLE)
  assert proc.returncode == 1
  assert "refreshing your current auth tokens" in proc.stderr
  assert "create" not in f.verbs() and "qr-create" not in f.verbs()


@pytest.mark.parametrize("args", [
    ["--name", "f", *V4, "--gin_file", "gin/runs/missing.gin"],
    ["--name", "f", *V4, "--gin_file", "/etc/doremi.gin"],
    ["--name", "f", "--zone", "us-west4-a", "--accelerator-type", "v4-8", *BASE],
    ["--name", "f", "--zone", "us-central2-b", "--accelerator-type", "v4-32", *BASE,
     "--no-ssh-agent-check"],
    ["--name", "f", "--zone", "us-central2-b", "--accelerator-type", "v4-31", *BASE],
])
def test_validation_fails_before_any_gcloud_call(fake, args):
  f = fake()
  proc = f.run(*args)
  assert proc.returncode == 2, proc.stderr
  assert f.calls() == []


def _ssh_agent(f, tmp_path, *, rc, loaded):
  key = tmp_path / "google_compute_engine"
  subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
  fp = subprocess.run(["ssh-keygen", "-l", "-f", str(key)], capture_output=True,
                      text=True).stdout.split()[1]
  listing = f"256 {fp} me@host (ED25519)" if loaded else "256 SHA256:other me@host (ED25519)"
  if rc == 2:
    listing = "Could not open a connection to your authentication agent."
  (f.bin / "ssh-add").write_text(f"#!/usr/bin/env bash\necho '{listing}'\nexit {rc}\n")
  (f.bin / "ssh-add").chmod(0o755)
  f.env["TPU_RUN_SSH_KEY"] = str(key)


@pytest.mark.parametrize("rc,loaded,message", [(2, False, "none is running"),
                                               (1, False, "it is not loaded"),
                                               (0, False, "it is not loaded")])
def test_ssh_agent_is_checked_for_multi_worker_slices(fake, tmp_path, rc, loaded, message):
  f = fake()
  _ssh_agent(f, tmp_path, rc=rc, loaded=loaded)
  args = [a for a in MULTI if a != "--no-ssh-agent-check"]
  proc = f.run(*args)
  assert proc.returncode == 2 and message in proc.stderr
  assert "ssh-add " + str(tmp_path / "google_compute_engine") in proc.stderr  # the fix
  assert f.calls() == []


def test_ssh_agent_with_the_key_passes(fake, tmp_path):
  f = fake()
  _ssh_agent(f, tmp_path, rc=0, loaded=True)
  proc = f.run(*[a for a in MULTI if a != "--no-ssh-agent-check"])
  assert proc.returncode == 0, proc.stderr


def test_existing_run_is_not_started_twice(fake, tmp_path):
  f = fake(accel="v4-8", workers=1, tpu="READY", py=WAIT_FOR_TERM)
  with open(tmp_path / "out.log", "w") as log:
    first = f.start(*SINGLE, log=log)
    f.wait_for(lambda: list(f.worker(0).glob("doremi_runs/train-*/pid")), "the run")
    proc = f.run(*SINGLE, "--skip-install")
    assert proc.returncode == 1 and "still running" in proc.stderr and "attach" in proc.stderr
    assert not (f.dir / "term_w0").exists()
    # --restart stops it (SIGTERM: the trainer checkpoints) and starts anew.
    (f.dir / "py.sh").write_text(SUCCESS)
    proc = f.run(*SINGLE, "--skip-install", "--restart")
    assert proc.returncode == 0, proc.stderr
    assert (f.dir / "term_w0").exists()
    first.wait(timeout=WAIT)


def test_status_logs_kill_attach_against_a_running_run(fake, tmp_path):
  f = fake(py=WAIT_FOR_TERM, tpu="MISSING")
  scope = ["--name", "f", "--zone", "us-central2-b", "--no-ssh-agent-check"]
  with open(tmp_path / "out.log", "w") as log:
    launcher = f.start(*MULTI, log=log)
    f.wait_for(lambda: len(list(f.dir.glob("workers/*/doremi_runs/train-*/pid"))) == 4, "the run")
    f.wait_for(
        lambda: all("step 5/100" in p.read_text()
                    for p in f.dir.glob("workers/*/doremi_runs/train-*/log")), "the step")
    launcher.send_signal(signal.SIGINT)  # stop following; the run goes on
    assert launcher.wait(timeout=WAIT) == 130

  proc = f.run("status", *scope)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("slice f (v4-32, 4 worker(s)): READY")
  assert [l.split(":")[0] for l in lines[1:]] == [f"worker {i}" for i in range(4)]
  assert all("running" in l and "last step 5/100" in l for l in lines[1:])

  proc = f.run("logs", *scope, "--worker", "1", "--no-follow")
  assert proc.returncode == 0
  assert "[w1] step 5/100" in proc.stdout and "[w0]" not in proc.stdout
  ssh = [c for c in f.calls() if c[:4] == ["compute", "tpus", "tpu-vm", "ssh"]]
  assert "--worker=1" in ssh[-1]

  proc = f.run("kill", *scope)
  assert proc.returncode == 0, proc.stderr
  for i in range(4):
    assert (f.dir / f"term_w{i}").exists()
  ssh = [c for c in f.calls() if c[:4] == ["compute", "tpus", "tpu-vm", "ssh"]]
  assert ssh[-1][-1].endswith("kill 3")

  proc = f.run("status", *scope)
  assert all("exited (status 143)" in l for l in proc.stdout.splitlines()[1:]), proc.stdout

  # attach follows the (now finished) run and exits with its status, naming the worker.
  proc = f.run("attach", *scope)
  assert proc.returncode == 143
  assert re.search(r"worker [0-3] failed with exit status 143", proc.stderr)
