"""Tests for launch/tpu_run.sh: the commands it generates, and its errors."""
import os
import shlex
import stat
import tarfile

import pytest

from tests import helpers

SCRIPT = os.path.join(helpers.ROOT, "launch", "tpu_run.sh")


def _run(*args, env=None, check=True):
  return helpers.run(["bash", SCRIPT, *args], env={
      **os.environ,
      **(env or {})
  }, timeout=60, check=check)


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


def _python_args(cmds):
  runs = [
      c for c in _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")
      if "/bin/python" in c[c.index("--command") + 1]
  ]
  assert len(runs) == 1, cmds
  words = _remote(runs[0])
  start = next(i for i, w in enumerate(words) if w.endswith("/bin/python"))
  return runs[0], words[start + 1:]


BASE = ["--gin_file", "gin/runs/doremi.gin", "--gin_file", "gin/models/280m.gin"]


@pytest.mark.parametrize("accel,runtime", [
    ("v5litepod-8", "v2-alpha-tpuv5-lite"),
    ("v4-8", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v4-32", "tpu-ubuntu2204-base"),
])
def test_create_install_run(accel, runtime):
  cmds = _dry_run("--name", "dr", "--zone", "us-west4-a", "--accelerator-type", accel, "--project",
                  "proj", *BASE, "--gin", "TRAIN_STEPS=100", "--model-dir", "gs://bucket/run1")
  create = _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "create")
  assert create == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "dr", "--zone", "us-west4-a", "--project",
      "proj", "--accelerator-type", accel, "--version", runtime
  ]]
  assert not _find(cmds, "gcloud", "compute", "tpus", "queued-resources")
  # The local tree goes to every worker, then is installed on every worker.
  scp = _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "scp")
  assert len(scp) == 1 and "--worker=all" in scp[0] and scp[0][6].startswith("dr:")
  ssh = _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")
  assert len(ssh) == 2
  for c in ssh:
    assert c[5:9] == ["dr", "--zone", "us-west4-a", "--project"] and "--worker=all" in c
  install = ssh[0][ssh[0].index("--command") + 1]
  assert "tar -xzf" in install and "pip install" in install and "'.[tpu]'" in install
  _, args = _python_args(cmds)
  assert args == [
      "-m", "doremi_jax.train", "--multihost_tpu", "--gin_file=gin/runs/doremi.gin",
      "--gin_file=gin/models/280m.gin", "--gin.MODEL_DIR='gs://bucket/run1'",
      "--gin.TRAIN_STEPS=100"
  ]
  # Order: create, copy, install, run; no delete unless asked.
  order = [c[4] for c in cmds if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]]
  assert order == ["describe", "create", "scp", "ssh", "ssh"]


def test_single_and_multi_host_are_both_worker_all():
  for accel in ("v4-8", "v4-32"):
    cmds = _dry_run("--name", "n", "--zone", "z", "--accelerator-type", accel, *BASE)
    for c in _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh"):
      assert "--worker=all" in c


@pytest.mark.parametrize("accel", ["v5litepod-16", "v4-32"])
def test_queued_spot(accel):
  cmds = _dry_run("--name", "q", "--zone", "us-central2-b", "--accelerator-type", accel, "--queued",
                  "--spot", *BASE)
  create = _find(cmds, "gcloud", "compute", "tpus", "queued-resources", "create")
  assert len(create) == 1
  c = create[0]
  assert c[5] == "q" and c[c.index("--node-id") + 1] == "q"
  assert c[c.index("--accelerator-type") + 1] == accel and "--spot" in c
  assert "--runtime-version" in c
  waits = _find(cmds, "gcloud", "compute", "tpus", "queued-resources", "describe")
  assert any("--format=value(state.state)" in w for w in waits)
  # Check for an existing request, create it, then poll until ACTIVE.
  verbs = [c[4] for c in _find(cmds, "gcloud", "compute", "tpus", "queued-resources")]
  assert verbs == ["describe", "create", "describe"]
  assert not _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "create")


def test_preemptible_and_runtime_override():
  cmds = _dry_run("--name", "p", "--zone", "z", "--accelerator-type", "v4-8", "--preemptible",
                  "--runtime-version", "tpu-vm-v4-base", *BASE)
  (create,) = _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "create")
  assert create[-3:] == ["--version", "tpu-vm-v4-base", "--preemptible"]


def test_gin_quoting_survives_two_shells():
  cmds = _dry_run("--name", "g", "--zone", "z", "--accelerator-type", "v5litepod-8", *BASE, "--gin",
                  "MODEL_DIR='gs://b/x'", "--gin", "train.run_name=\"it's a b\"", "--gin",
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
  cmds = _dry_run("--name", "s", "--zone", "z", "--accelerator-type", "v4-8", "--stage", stage,
                  "--gin_file", "gin/pipelines/pile_280m.gin")
  _, args = _python_args(cmds)
  assert args == ["-m", module, "--multihost_tpu", "--gin_file=gin/pipelines/pile_280m.gin"]


def test_env_and_skip_install():
  cmds = _dry_run("--name", "e", "--zone", "z", "--accelerator-type", "v4-8", *BASE, "--env",
                  "XLA_FLAGS=--xla_a=1 --xla_b", "--skip-install")
  ssh = _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")
  assert len(ssh) == 1 and not _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "scp")
  words = _remote(ssh[0])
  assert "XLA_FLAGS=--xla_a=1 --xla_b" in words


def test_git_repo_install():
  cmds = _dry_run("--name", "r", "--zone", "z", "--accelerator-type", "v4-8", *BASE, "--repo",
                  "https://github.com/me/doremi_jax.git", "--ref", "v0.1")
  assert not _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "scp")
  install = _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")[0]
  text = install[install.index("--command") + 1]
  assert "git clone --quiet https://github.com/me/doremi_jax.git ~/doremi_jax" in text
  assert "checkout --quiet v0.1" in text


def test_delete_after_run_and_delete_only():
  cmds = _dry_run("--name", "d", "--zone", "z", "--accelerator-type", "v4-8", *BASE, "--delete")
  assert cmds[-1] == [
      "gcloud", "compute", "tpus", "tpu-vm", "delete", "d", "--zone", "z", "--quiet"
  ]
  cmds = _dry_run("--name", "d", "--zone", "z", "--delete-only")
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "d", "--zone", "z", "--quiet"]]
  cmds = _dry_run("--name", "d", "--zone", "z", "--delete-only", "--queued")
  assert cmds == [[
      "gcloud", "compute", "tpus", "queued-resources", "delete", "d", "--zone", "z", "--force",
      "--quiet"
  ]]


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
    (["--zone", "z", "--accelerator-type", "v4-8", *BASE], "--name"),
    (["--name", "n", "--accelerator-type", "v4-8", *BASE], "--zone"),
    (["--name", "n", "--zone", "z", *BASE], "--accelerator-type"),
    (["--name", "n", "--zone", "z", "--accelerator-type", "v4-8"], "--gin_file"),
    (["--delete-only", "--zone", "z"], "--name"),
    (["--name", "n", "--zone", "z", "--accelerator-type", "v4-8", *BASE, "--stage", "x"
     ], "--stage"),
    (["--name", "n", "--zone", "z", "--accelerator-type", "v4-8", *BASE, "--gin", "NOEQUALS"
     ], "NAME=VALUE"),
    (["--name", "n", "--zone", "z", "--accelerator-type", "tpu9", *BASE], "accelerator-type"),
    (["--name", "n", "--zone", "z", "--accelerator-type", "v4-8", *BASE, "--bogus"
     ], "unknown flag"),
    (["--name"], "needs a value"),
])
def test_errors(args, message):
  proc = _run("--dry-run", *args, check=False)
  assert proc.returncode == 2
  assert message in proc.stderr and "error" in proc.stderr
  assert not proc.stdout


def test_help():
  proc = _run("--help")
  assert "--accelerator-type" in proc.stdout and "--dry-run" in proc.stdout


def _fake_gcloud(tmp_path, record: str, cases: str):
  """A `gcloud` on PATH that records each call with `record`, then runs `cases`."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  fake = bin_dir / "gcloud"
  fake.write_text(f"#!/usr/bin/env bash\n{record}\ncase \"$*\" in\n{cases}esac\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  return bin_dir, tmp_path / "calls"


def test_real_run_with_fake_gcloud(tmp_path):
  """Without --dry-run: gcloud is called as printed, the tree is packed, logs are kept."""
  bin_dir, calls = _fake_gcloud(
      tmp_path,
      f"printf '%s\\x1f' \"$@\" >> {tmp_path / 'calls'}; echo >> {tmp_path / 'calls'}",
      "  *'tpu-vm describe'*) exit 1 ;;\n"  # not there yet
      "  *'tpu-vm scp'*) cp \"$5\" " + str(tmp_path / "copied.tar.gz") + " ;;\n"
      "  *'tpu-vm ssh'*python*) echo 'worker 0: step 1 loss 3.2' ;;\n")
  log_dir = tmp_path / "logs"
  proc = _run("--name", "f", "--zone", "z", "--accelerator-type", "v4-32", *BASE, "--model-dir",
              "gs://b/r", "--log-dir", str(log_dir), "--delete", env={
                  "PATH": f"{bin_dir}:/usr/bin:/bin",
                  "TMPDIR": str(tmp_path)
              })
  assert "worker 0: step 1 loss 3.2" in proc.stdout
  lines = [l.rstrip("\x1f").split("\x1f") for l in calls.read_text().splitlines()]
  assert [l[3] for l in lines] == ["describe", "create", "scp", "ssh", "ssh", "delete"]
  with tarfile.open(tmp_path / "copied.tar.gz") as tar:
    names = tar.getnames()
  assert "launch/tpu_run.sh" in names and "setup.py" in names
  assert not any(n.startswith(".git/") for n in names)
  (log,) = list(log_dir.iterdir())
  assert "step 1 loss 3.2" in log.read_text()
  run_words = shlex.split(lines[4][lines[4].index("--command") + 1])
  assert "--gin.MODEL_DIR='gs://b/r'" in run_words


def test_real_run_deletes_on_failure(tmp_path):
  bin_dir, calls = _fake_gcloud(
      tmp_path, f"echo \"$*\" >> {tmp_path / 'calls'}", "  *'tpu-vm describe'*) echo READY ;;\n"
      "  *'tpu-vm ssh'*python*) echo boom >&2; exit 7 ;;\n")
  proc = _run("--name", "f", "--zone", "z",
              "--accelerator-type", "v4-8", *BASE, "--skip-install", "--log-dir",
              str(tmp_path / "logs"), "--delete", env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
              check=False)
  assert proc.returncode == 7
  verbs = [l.split()[3] for l in calls.read_text().splitlines()]
  assert verbs == ["describe", "ssh", "delete"]  # reused, ran, deleted
