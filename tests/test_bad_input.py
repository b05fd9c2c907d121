"""Bad input: a clear error naming the problem, before anything compiles, with nothing in
MODEL_DIR written or overwritten."""
import hashlib
import json
import os
import shutil
import sys

import gin
import jax
import pytest

from doremi_jax import config as config_lib
from doremi_jax import train as train_lib
from tests import helpers

BASE = ["--gin_file=gin/runs/reference.gin", *helpers.TINY_DEMO_FLAGS, "--gin.TRAIN_STEPS=2"]
DOREMI = ["--gin_file=gin/runs/doremi.gin"]


def _tree_hash(path) -> str:
  """Names, sizes, contents and mtimes of everything under `path` ('' if it does not exist)."""
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(files) + [d + "/" for d in dirs]:
      full = os.path.join(root, name.rstrip("/"))
      h.update(os.path.relpath(full, path).encode())
      if not name.endswith("/"):
        st = os.stat(full)
        h.update(f"{st.st_size} {st.st_mtime_ns}".encode())
        with open(full, "rb") as f:
          h.update(f.read())
  return h.hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished tiny run: the reference for DoReMi cases, a checkpoint for restart cases."""
  path = str(tmp_path_factory.mktemp("bad") / "trained")
  gin.clear_config()
  config_lib.parse_gin([a.split("=", 1)[1] for a in BASE if a.startswith("--gin_file")],
                       [a[len("--gin."):] for a in BASE if a.startswith("--gin.")] +
                       [f"MODEL_DIR='{path}'"])
  try:
    train_lib.train()
  finally:
    gin.clear_config()
  return path


@pytest.fixture
def no_compile():
  """Fails the test if XLA compiles anything while it runs."""
  compiled = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  yield compiled
  jax.monitoring.unregister_event_duration_listener(listener)
  assert not compiled, "something was compiled before the error"


def _fails(model_dir, args, *, match, no_compile):
  """Runs the CLI entry point in-process; returns the error message."""
  del no_compile  # the fixture checks
  before = _tree_hash(model_dir)
  args = list(args)
  if args[:1] and args[0].startswith("--gin_file=gin/runs/"):  # the run file first (it
    # includes base.gin's macros)
    argv = args[:1] + BASE[1:] + args[1:]
  else:
    argv = BASE + args
  argv.append(f"--gin.MODEL_DIR='{model_dir}'")
  message = helpers.train_cli_error(argv)
  for m in ([match] if isinstance(match, str) else match):
    assert m in message, message
  assert _tree_hash(model_dir) == before, f"{model_dir} changed"
  return message


def test_unknown_gin_binding(tmp_path, no_compile):
  _fails(tmp_path / "run", ["--gin.train.no_such_setting=3"], match="no_such_setting",
         no_compile=no_compile)
  _fails(tmp_path / "run", ["--gin.NoSuchThing.x=3"], match="NoSuchThing", no_compile=no_compile)


def test_unknown_macro_and_parameter_name_the_nearest(tmp_path, no_compile):
  """gin accepts a bound macro that nothing uses: a misspelled one would silently leave the
  default in force. Catches that, and suggestions missing or a hint that does not apply."""
  msg = _fails(tmp_path / "run", ["--gin.TRAIN_STEP=3"],
               match=["--gin.TRAIN_STEP=3", "macro TRAIN_STEP",
                      "nearest macros: TRAIN_STEPS"], no_compile=no_compile)
  assert "quotes" not in msg and len(msg.splitlines()) == 1
  msg = _fails(tmp_path / "run", ["--gin.train.batch_sizes=3"],
               match="nearest parameters: batch_size", no_compile=no_compile)
  assert "quotes" not in msg
  _fails(tmp_path / "run", ["--gin.TransformerConfg.emb_dim=3"],
         match="nearest configurables: TransformerConfig", no_compile=no_compile)
  _fails(tmp_path / "run", ["--gin.MIXTURE_OR_TASK_NAME=demo_natural"],
         match="a string needs inner quotes: --gin.MIXTURE_OR_TASK_NAME=\"'demo_natural'\"",
         no_compile=no_compile)


def test_unknown_mixture(tmp_path, no_compile):
  _fails(tmp_path / "run", ["--gin.MIXTURE_OR_TASK_NAME='no_such_mixture'"],
         match="no_such_mixture", no_compile=no_compile)


@pytest.mark.parametrize("steps", [0, -5])
def test_train_steps_not_positive(tmp_path, no_compile, steps):
  _fails(tmp_path / "run", [f"--gin.TRAIN_STEPS={steps}"], match=f"TRAIN_STEPS={steps}",
         no_compile=no_compile)


def test_train_steps_not_given(tmp_path, no_compile):
  argv = [a for a in BASE if not a.startswith("--gin.TRAIN_STEPS")]
  before = _tree_hash(tmp_path)
  gin.clear_config()
  try:
    with pytest.raises(SystemExit) as e:
      config_lib.run_main(train_lib.train, argv + [f"--gin.MODEL_DIR='{tmp_path / 'run'}'"])
  finally:
    gin.clear_config()
  assert "TRAIN_STEPS" in str(e.value.code)
  assert _tree_hash(tmp_path) == before
  del no_compile


def test_batch_not_divisible_by_data_parallel_size(tmp_path, no_compile):
  _fails(tmp_path / "run", ["--gin.BATCH_SIZE=12"], match=["BATCH_SIZE=12", "data-parallel size 8"],
         no_compile=no_compile)


def test_sequence_over_max_len(tmp_path, no_compile):
  _fails(tmp_path / "run", ["--gin.TransformerConfig.max_len=16"],
         match=["sequence length 32", "max_len=16"], no_compile=no_compile)


@pytest.mark.parametrize("shape", ["(3, 1, 1)", "(2, 2, 1)", "(1, -1, 3)"])
def test_mesh_does_not_match_devices(tmp_path, no_compile, shape):
  _fails(tmp_path / "run", [f"--gin.MESH_SHAPE={shape}"], match=f"MESH_SHAPE={shape}",
         no_compile=no_compile)


def test_model_dir_holds_a_different_model(trained, no_compile):
  msg = _fails(trained, ["--gin.TransformerConfig.emb_dim=128"],
               match=["holds a checkpoint of a different model"], no_compile=no_compile)
  assert "'emb_dim': 64" in msg and "'emb_dim': 128" in msg


def test_doremi_missing_reference(tmp_path, no_compile):
  _fails(tmp_path / "run", DOREMI + [f"--gin.REFERENCE_DIR='{tmp_path / 'nothing'}'"],
         match=["No reference run", str(tmp_path / "nothing")], no_compile=no_compile)


def test_doremi_reference_dir_not_given(tmp_path, no_compile):
  _fails(tmp_path / "run", DOREMI, match="REFERENCE_DIR", no_compile=no_compile)


def test_doremi_reference_without_checkpoint(trained, tmp_path, no_compile):
  """A reference whose run started but never saved: the error comes before any compile."""
  ref = tmp_path / "ref"
  ref.mkdir()
  shutil.copy(os.path.join(trained, "run_info.json"), ref)
  _fails(tmp_path / "run", DOREMI + [f"--gin.REFERENCE_DIR='{ref}'"],
         match=["No checkpoint", str(ref)], no_compile=no_compile)
  assert not os.path.exists(tmp_path / "run")


def _edited_reference(trained, tmp_path, edit):
  ref = str(tmp_path / "ref")
  shutil.copytree(trained, ref)
  path = os.path.join(ref, "run_info.json")
  with open(path) as f:
    info = json.load(f)
  edit(info)
  with open(path, "w") as f:
    json.dump(info, f)
  return ref


def test_doremi_reference_with_another_vocabulary(trained, tmp_path, no_compile):

  def edit(info):
    info["vocabulary"] = {
        "type": "SentencePieceVocabulary",
        "vocab_size": 32000,
        "model": "/x/spm.model"
    }

  ref = _edited_reference(trained, tmp_path, edit)
  _fails(tmp_path / "run", DOREMI + [f"--gin.REFERENCE_DIR='{ref}'"],
         match=["another vocabulary", "SentencePieceVocabulary"], no_compile=no_compile)


@pytest.mark.parametrize("change", ["order", "set"])
def test_doremi_reference_with_other_domains(trained, tmp_path, no_compile, change):

  def edit(info):
    info["domains"] = (info["domains"][::-1] if change == "order" else info["domains"][:-1])

  ref = _edited_reference(trained, tmp_path, edit)
  _fails(tmp_path / "run", DOREMI + [f"--gin.REFERENCE_DIR='{ref}'"],
         match="another set or order of domains", no_compile=no_compile)


@pytest.mark.parametrize("binding,match", [
    ("DoReMiConfig.eta=0.0", "eta"),
    ("DoReMiConfig.eta=-1.0", "eta"),
    ("DoReMiConfig.smoothing=1.0", "smoothing"),
    ("DoReMiConfig.smoothing=-0.1", "smoothing"),
    ("DoReMiConfig.smoothing=2.0", "smoothing"),
])
def test_doremi_bad_hyperparameters(trained, tmp_path, no_compile, binding, match):
  msg = _fails(tmp_path / "run", DOREMI + [f"--gin.REFERENCE_DIR='{trained}'", f"--gin.{binding}"],
               match=match, no_compile=no_compile)
  assert binding.split("=")[1] in msg


def test_cli_exit_code_and_stderr(tmp_path):
  """The command line: non-zero exit, the message on stderr, no traceback."""
  for extra, match in ((["--gin.train.no_such_setting=3"], "no_such_setting"),
                       (["--gin.MESH_SHAPE=(3, 1, 1)"], "MESH_SHAPE=(3, 1, 1)")):
    proc = helpers.run([
        sys.executable, "-m", "doremi_jax.train", *BASE, *extra,
        f"--gin.MODEL_DIR='{tmp_path / 'run'}'"
    ], timeout=120, check=False)
    assert proc.returncode != 0
    assert match in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("binding", ["train.log_every=0", "train.checkpoint_every=0"])
def test_interval_not_positive(tmp_path, no_compile, binding):
  _fails(tmp_path / "run", [f"--gin.{binding}"], match=binding, no_compile=no_compile)


def test_eval_batch_not_divisible(tmp_path, no_compile):
  _fails(tmp_path / "run", ["--gin.train.eval_every=1", "--gin.train.eval_batch_size=12"],
         match=["eval_batch_size=12", "data-parallel size 8"], no_compile=no_compile)


def test_resume_with_another_batch_size_is_refused(trained, no_compile):
  _fails(trained, ["--gin.BATCH_SIZE=32"], match=["different batch_size", "16", "32"],
         no_compile=no_compile)


def test_doremi_model_dir_is_the_reference(trained, no_compile):
  _fails(trained, DOREMI + [f"--gin.REFERENCE_DIR='{trained}'"],
         match=["MODEL_DIR and REFERENCE_DIR"], no_compile=no_compile)


def test_pack_across_domains_needs_the_natural_mixture(tmp_path, no_compile):
  _fails(tmp_path / "run",
         ["--gin.train.pack_across_domains=True", "--gin.MIXTURE_OR_TASK_NAME='demo_uniform'"],
         match=["pack_across_domains", "demo_natural"], no_compile=no_compile)


def test_byte_vocabulary_cache_key_is_stable_across_processes():
  code = ("import seqio; from data_pipelines.vocab import vocab_key; "
          "print(vocab_key(seqio.ByteVocabulary()))")
  keys = {helpers.run([sys.executable, "-c", code]).stdout.strip() for _ in range(2)}
  assert keys == {"byte:0"}


ONLINE = ["--gin_file=gin/runs/online_doremi.gin", "--gin.train.eval_every=0"]
ODM = ["--gin_file=gin/runs/odm.gin", "--gin.train.eval_every=0"]
SCHEDULE = ["--gin_file=gin/runs/schedule.gin", "--gin.train.eval_every=0"]


def test_online_doremi_needs_a_reference(tmp_path, no_compile):
  _fails(tmp_path / "run", ONLINE + ["--gin.REFERENCE_DIR=None"],
         match=["REFERENCE_DIR is not set", "online DoReMi"], no_compile=no_compile)
  _fails(tmp_path / "run", ONLINE + [f"--gin.REFERENCE_DIR='{tmp_path / 'none'}'"],
         match="No reference run in", no_compile=no_compile)


def test_online_doremi_reference_with_other_domains(trained, tmp_path, no_compile):
  ref = _edited_reference(trained, tmp_path, lambda info: info.update(domains=["a", "b"]))
  _fails(tmp_path / "run", ONLINE + [f"--gin.REFERENCE_DIR='{ref}'"],
         match="another set or order of domains", no_compile=no_compile)


@pytest.mark.parametrize("binding,match", [
    ("OnlineMixing.exploration=0.5", "exploration=0.5: the floor must be in (0, 1/K) = (0, "
     "0.1429)"),
    ("OnlineMixing.exploration=0.0", "exploration=0.0"),
    ("OnlineMixing.learning_rate=-1.0", "learning_rate=-1.0"),
    ("OnlineMixing.reward_smoothing=1.5", "reward_smoothing=1.5"),
    ("OnlineMixing.method='bandit'", "method='bandit'"),
    ("train.sampling='stratified'", "draws iid rows from the weights it learns"),
])
def test_odm_bad_settings(tmp_path, no_compile, binding, match):
  _fails(tmp_path / "run", ODM + [f"--gin.{binding}"], match=match, no_compile=no_compile)


@pytest.mark.parametrize("stages,match", [
    ("[(0, {'code': 1}), (5, {'prose': 1}), (3, {'noise': 1})]", "steps must increase: 3 "
     "follows 5"),
    ("[(0, {'code': 1}), (2, {'prose': 1})]", "stage at step 2 never runs: the run has "
     "TRAIN_STEPS=2"),
    ("[(0, {'kode': 1})]", "Unknown domain 'kode'"),
    ("[(0, {'code': -1, 'prose': 2})]", "must be finite and >= 0"),
    ("[(0, {'code': 0})]", "sum to 0"),
])
def test_bad_schedule(tmp_path, no_compile, stages, match):
  _fails(tmp_path / "run", SCHEDULE + [f"--gin.SCHEDULE_STAGES={stages}"], match=match,
         no_compile=no_compile)
