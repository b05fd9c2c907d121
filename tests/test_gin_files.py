"""Every gin file in gin/ parses with its includes and builds a trainer (abstractly: nothing
is initialized or compiled) through doremi_jax.train.train, as a run would."""
import glob
import os

import gin
import jax
import pytest

from doremi_jax import compile_check
from doremi_jax import config as config_lib
from doremi_jax import data as data_lib
from doremi_jax import outputs
from doremi_jax import run as run_lib
from doremi_jax import sharding as sharding_lib
from doremi_jax import train as train_lib
from doremi_jax.model import TransformerConfig
from tests import helpers

GIN = os.path.join(helpers.ROOT, "gin")
SEQ = "{'targets': 32}"


def _files(kind):
  return sorted(os.path.relpath(p, GIN) for p in glob.glob(os.path.join(GIN, kind, "*.gin")))


def test_every_gin_file_is_covered():
  covered = set(
      _files("runs") + _files("models") + _files("mixtures") + _files("hardware") +
      _files("pipelines"))
  everything = {
      os.path.relpath(p, GIN) for p in glob.glob(os.path.join(GIN, "**", "*.gin"), recursive=True)
  }
  assert everything == covered and len(covered) > 20


@pytest.fixture
def capture():
  """What _build built: the run's config and trainer."""
  built = {}
  yield built
  gin.clear_config()


def _parse(files, bindings=()):
  gin.clear_config()
  config_lib.parse_gin(list(files), list(bindings))


def _reference_dir(tmp_path, model_cfg=None, mixture="demo_natural"):
  """A directory that looks like a finished reference run to DoReMi's checks."""
  ref = str(tmp_path / "ref")
  cfg = run_lib.RunConfig(model_dir=ref, mixture_or_task_name=mixture, seq_len=32, train_steps=1,
                          batch_size=8, model=model_cfg or TransformerConfig())
  info = run_lib.run_info(cfg, data_lib.domain_names(mixture))
  outputs.write_json(os.path.join(ref, outputs.RUN_INFO), info)
  return ref


def _build(capture, **kwargs):
  """train() without running: the gin bindings as a RunConfig, built (all checks, the real
  trainer) but without input, as train builds it before writing anything."""
  run = run_lib.build_run(train_lib.run_config(**kwargs), with_input=False)
  capture.update(cfg=run.cfg, trainer=run.trainer)


@pytest.mark.parametrize("run", _files("runs"))
def test_run_files_build(run, capture, tmp_path):
  if run == "runs/eval.gin":
    _parse([run], [f"MODEL_DIR='{tmp_path}'"])
    assert gin.query_parameter("evaluate.model_dir") is not None
    assert gin.query_parameter("evaluate.batch_size") == 16
    return
  if run == "runs/downstream.gin":  # run end to end in test_downstream_eval.py
    _parse([run], [f"MODEL_DIR='{tmp_path}'"])
    assert gin.query_parameter("evaluate.perplexity") is False
    assert gin.query_parameter("DownstreamConfig.suite") == "paper"
    assert gin.query_parameter("DownstreamConfig.inputs_length") + gin.query_parameter(
        "DownstreamConfig.targets_length") == 1024  # the paper's context
    return
  bindings = [f"MODEL_DIR='{tmp_path / 'run'}'", "TRAIN_STEPS=3", f"TASK_FEATURE_LENGTHS={SEQ}"]
  if run in ("runs/doremi.gin", "runs/online_doremi.gin"):
    gin.clear_config()  # the reference's run_info is built from the tiny config
    config_lib.parse_gin(["models/tiny.gin"], [])
    bindings.append(f"REFERENCE_DIR='{_reference_dir(tmp_path)}'")
  if run == "runs/schedule.gin":
    weights = str(tmp_path / "prose.json")
    outputs.write_json(weights, {"domains": {"prose": 2.0, "code": 1.0}})
    bindings.append(f"SCHEDULE_STAGES=[(0, {{'code': 1.0}}), (2, '{weights}')]")
  if run == "runs/base.gin":
    bindings.append("MIXTURE_OR_TASK_NAME='demo_natural'")
  _parse([run, "models/tiny.gin", "mixtures/demo.gin"], bindings)
  _build(capture)
  assert capture["cfg"].batch_size == 16 and capture["cfg"].train_steps == 3
  trainer = capture["trainer"]
  assert trainer.is_doremi == (run in ("runs/doremi.gin", "runs/online_doremi.gin"))
  online = {"runs/online_doremi.gin": "doremi", "runs/odm.gin": "odm"}.get(run)
  assert (capture["cfg"].online and capture["cfg"].online.method) == online
  assert not os.path.exists(tmp_path / "run")  # nothing written before the build


def test_one_reference_step_from_gin(tmp_path):
  """The run files really train (one step) on the tiny model."""
  _parse(["runs/reference.gin", "models/tiny.gin", "mixtures/demo.gin"], [
      f"MODEL_DIR='{tmp_path}'", "TRAIN_STEPS=1", f"TASK_FEATURE_LENGTHS={SEQ}", "BATCH_SIZE=8",
      "train.log_every=1"
  ])
  try:
    out = train_lib.train()
  finally:
    gin.clear_config()
  assert out["step"] == 1 and out["loss"] > 0
  assert os.path.exists(tmp_path / "config.gin")


# Abstract build of the paper sizes at their real dimensions (eval_shape only); the largest
# get tiny dimensions, as their abstract trace alone takes seconds.
_TINY_DIMS = [
    "TransformerConfig.emb_dim=64", "TransformerConfig.num_layers=2",
    "TransformerConfig.num_heads=2", "TransformerConfig.head_dim=32",
    "TransformerConfig.mlp_dim=128", "TransformerConfig.vocab_size=512"
]


@pytest.mark.parametrize("model", _files("models"))
def test_model_files_build(model, capture, tmp_path):
  name = os.path.basename(model)[:-4]
  _parse(["runs/reference.gin", model, "mixtures/demo.gin"],
         [f"MODEL_DIR='{tmp_path / 'run'}'", "TRAIN_STEPS=3", f"TASK_FEATURE_LENGTHS={SEQ}"])
  full = TransformerConfig()
  assert full.num_params() > 0
  if name in ("tiny", "small", "20m"):
    expect = full
  else:
    _parse(["runs/reference.gin", model, "mixtures/demo.gin"], [
        f"MODEL_DIR='{tmp_path / 'run'}'", "TRAIN_STEPS=3", f"TASK_FEATURE_LENGTHS={SEQ}",
        *_TINY_DIMS
    ])
    expect = TransformerConfig()
    # Everything but the dimensions comes from the model file.
    for key in ("dtype", "remat", "max_len"):
      if hasattr(full, key):
        assert getattr(expect, key) == getattr(full, key)
  _build(capture)
  assert capture["cfg"].model == expect
  n = sum(x.size for x in jax.tree.leaves(capture["trainer"].abstract_state.params))
  assert n == expect.num_params()


# Table 9 of the paper: d_model, layers, heads, head dim, plain-MLP ff.
_TABLE_9 = {
    "70m": (256, 3, 4, 64, 1024),
    "150m": (512, 6, 8, 64, 2048),
    "280m": (768, 12, 12, 64, 3072),
    "510m": (1024, 12, 16, 64, 8192),
    "760m": (1280, 12, 20, 64, 8192),
    "1b": (2048, 16, 32, 64, 8192),
    "8b": (4096, 32, 32, 128, 24576)
}


def _table_9_params(d, layers, heads, head_dim, ff, vocab=256000):
  """The paper's model (plain two-matrix MLP, tied embeddings), counted by hand."""
  return layers * (4 * d * heads * head_dim + 2 * d * ff + 2 * d) + vocab * d + d


def test_paper_sizes_in_model_files():
  """Table 9's dimensions, with the gated MLP at 2/3 of Table 9's ff, and the paper's
  parameter count within 5% (the labels 70M ... 510M within 5% too)."""
  labels = {"70m": 70e6, "150m": 150e6, "280m": 280e6, "510m": 510e6}
  for name, (d, layers, heads, head_dim, ff) in _TABLE_9.items():
    _parse([f"models/{name}.gin"])
    cfg = TransformerConfig()
    assert (cfg.emb_dim, cfg.num_layers, cfg.num_heads, cfg.head_dim) == (d, layers, heads,
                                                                          head_dim), name
    assert abs(cfg.mlp_dim - 2 * ff / 3) <= 64 and cfg.mlp_dim % 128 == 0, name
    paper = _table_9_params(d, layers, heads, head_dim, ff)
    assert abs(cfg.num_params() / paper - 1) < 0.05, (name, cfg.num_params(), paper)
    if name in labels:
      assert abs(cfg.num_params() / labels[name] - 1) < 0.05, name
  assert _table_9_params(*_TABLE_9["280m"]) == 281_561_856  # 280M (the gated ff3072: 310M)
  gin.clear_config()


@pytest.mark.parametrize("mixture", _files("mixtures"))
def test_mixture_files_parse(mixture, tmp_path):
  _parse(["runs/reference.gin", mixture, "models/tiny.gin"],
         [f"MODEL_DIR='{tmp_path}'", "TRAIN_STEPS=3"])
  name = gin.query_parameter("MIXTURE_OR_TASK_NAME/macro.value")
  length = run_lib.sequence_length(gin.query_parameter("TASK_FEATURE_LENGTHS/macro.value"))
  assert isinstance(name, str) and length > 1
  if name.startswith("demo"):
    assert len(data_lib.domain_names(name)) == 7
  gin.clear_config()


@pytest.mark.parametrize("hardware", _files("hardware"))
def test_hardware_files(hardware, capture, tmp_path):
  _parse(["runs/reference.gin", "models/tiny.gin", "mixtures/demo.gin", hardware],
         [f"MODEL_DIR='{tmp_path / 'run'}'", "TRAIN_STEPS=3", f"TASK_FEATURE_LENGTHS={SEQ}"])
  mesh_shape = tuple(gin.query_parameter("MESH_SHAPE/macro.value"))
  assert len(mesh_shape) == 3
  try:
    topology = gin.query_parameter("TOPOLOGY/macro.value")
  except ValueError:
    topology = None
  if topology is None:  # CPU: the mesh must fit the 8 test devices or one device
    devices = jax.devices() if hardware == "hardware/cpu8.gin" else jax.devices()[:1]
    mesh = sharding_lib.make_mesh(mesh_shape, devices=devices)
    if len(devices) == 8:
      _build(capture)
      assert dict(capture["trainer"].mesh.shape) == dict(mesh.shape)
  else:  # a TPU slice: the mesh fills the topology's chips (libtpu, no TPU needed)
    pytest.importorskip("libtpu", reason="libtpu not installed: pip install 'jax[tpu]'")
    devices, _ = compile_check.topology_devices(topology)
    mesh = sharding_lib.make_mesh(mesh_shape, devices=devices)
    assert mesh.size == len(devices)


def test_pipeline_scopes_resolve(capture, tmp_path, monkeypatch):
  # The demo pipeline runs on one CPU device (MESH_SHAPE = (1, 1, 1)).
  real_make_mesh = sharding_lib.make_mesh
  monkeypatch.setattr(sharding_lib, "make_mesh",
                      lambda shape, devices=None: real_make_mesh(shape,
                                                                 jax.devices()[:1]))
  _parse(["pipelines/demo_cpu.gin"],
         [f"PIPELINE_DIR='{tmp_path}'", "SEQ_LEN=32", f"TASK_FEATURE_LENGTHS={SEQ}"])
  assert gin.query_parameter("pipeline.pipeline_dir") is not None
  seen = {}
  for scope in ("reference", "proxy", "main"):
    capture.clear()
    with gin.config_scope(scope):
      kwargs = {}
      if scope == "proxy":
        kwargs.update(doremi=train_lib.DoReMiConfig(), reference_dir=_reference_dir(tmp_path))
      if scope == "main":  # the pipeline passes the main run's length and batch itself
        kwargs.update(
            train_steps=gin.query_parameter("pipeline.main_steps"),
            batch_size=gin.query_parameter("pipeline.main_batch_size"))
      _build(capture, model_dir=str(tmp_path / scope), mixture_or_task_name="demo_natural",
             **kwargs)
    cfg = capture["cfg"]
    seen[scope] = (cfg.model, cfg.batch_size, cfg.train_steps, cfg.downstream)
  for scope in ("reference", "proxy"):
    assert seen[scope][1:] == (gin.query_parameter(f"{scope}/train.batch_size"),
                               gin.query_parameter(f"{scope}/train.train_steps"), None)
  assert seen["proxy"][1] == 14
  assert seen["main"][3].suite == "demo" and seen["main"][3].every == 100  # main runs only
  assert seen["main"][0].emb_dim == gin.query_parameter("main/TransformerConfig.emb_dim")
  assert seen["main"][0].emb_dim != seen["reference"][0].emb_dim
  assert seen["reference"][0].emb_dim == 64  # tiny outside the main scope
  with gin.config_scope("proxy"):
    assert train_lib.DoReMiConfig().eta == 0.1  # the demo's proxy scope (demo_cpu.gin)
  assert train_lib.DoReMiConfig().eta == 1.0  # the paper's, outside it
