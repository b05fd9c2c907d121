"""Compile checks for TPU topologies on this CPU host, and the gin/hardware files."""
import glob
import os

import gin
import pytest

from doremi_jax import compile_check as cc
from tests import helpers

# TPU topologies come from libtpu (`pip install -e '.[test]'` installs it; CI has it).
pytest.importorskip("libtpu", reason="libtpu not installed: pip install 'jax[tpu]'")

TINY = [
    "--gin_file=gin/runs/doremi.gin", "--gin_file=gin/models/tiny.gin",
    "--gin.TASK_FEATURE_LENGTHS={'targets': 128}", "--gin.TRAIN_STEPS=10", "--gin.BATCH_SIZE=16",
    "--num_domains=7"
]


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _main(args, capsys):
  cwd = os.getcwd()
  os.chdir(helpers.ROOT)
  try:
    rc = cc.main(args)
  finally:
    os.chdir(cwd)
  out = capsys.readouterr()
  return rc, out.out, out.err


@pytest.mark.parametrize("name,canonical", [
    ("v5e:4x4", "v5e:4x4"),
    ("v5litepod-16", "v5e:4x4"),
    ("v5litepod-8", "v5e:2x4"),
    ("v4-32", "v4:2x2x4"),
    ("v4-8", "v4:2x2x1"),
    ("v4:4x4x4", "v4:4x4x4"),
    ("v5p-8", "v5p:2x2x1"),
    ("v6e-8", "v6e:2x4"),
    ("v3-8", "v3:2x2"),
])
def test_parse_topology(name, canonical):
  assert cc.parse_topology(name)[0] == canonical


@pytest.mark.parametrize("name", ["v9:2x2", "v5e", "v5e:4x4x4", "v4:2x2", "tpu-16", "v4-7"])
def test_unknown_topology(name):
  with pytest.raises(cc.TopologyError, match="e.g. v5e:2x2"):
    cc.parse_topology(name)


@pytest.mark.parametrize("name,devices,hosts", [
    ("v5e:2x2", 4, 1),
    ("v5e:2x4", 8, 1),
    ("v5e:4x4", 16, 4),
    ("v4:2x2x1", 4, 1),
    ("v4:2x2x4", 16, 4),
    ("v5p:2x2x1", 4, 1),
])
def test_topology_devices(name, devices, hosts):
  devs, _ = cc.topology_devices(name)
  assert len(devs) == devices  # v4/v5p: one device per chip (megacore), as on the VMs
  assert len({d.process_index for d in devs}) == hosts
  assert devs[0].platform == "tpu"


def test_hardware_gin_files_parse_and_match_their_topology():
  from doremi_jax import sharding
  files = sorted(glob.glob(os.path.join(helpers.ROOT, "gin", "hardware", "*.gin")))
  names = {os.path.basename(f) for f in files}
  assert {
      "cpu.gin", "cpu8.gin", "v5e_8.gin", "v5e_16.gin", "v5e_256.gin", "v4_8.gin", "v4_32.gin",
      "v4_128.gin"
  } <= names
  for path in files:
    gin.clear_config()
    gin.parse_config_file(path)
    shape = gin.query_parameter("MESH_SHAPE/macro.value")
    assert isinstance(shape, tuple) and len(shape) == 3, path
    try:
      topology = gin.query_parameter("TOPOLOGY/macro.value")
    except ValueError:
      assert os.path.basename(path).startswith(("cpu", "gpu")), f"{path} sets no TOPOLOGY"
      continue
    devices, _ = cc.topology_devices(topology)
    mesh = sharding.make_mesh(shape, devices=devices)
    assert mesh.devices.size == len(devices), path


def test_tiny_doremi_fits_on_v5e_2x2(capsys):
  rc, out, err = _main(TINY + ["--topology=v5e:2x2"], capsys)
  assert rc == 0, err
  assert "proxy step (DoReMi, with reference) on v5e:2x2" in out
  for field in ("arguments", "outputs", "temporaries", "total", "of 16.00 GiB HBM"):
    assert field in out
  assert "step FLOPs:" in out and out.rstrip().endswith("FITS")


def test_topology_from_hardware_gin(capsys):
  rc, out, err = _main(TINY + ["--gin_file=gin/hardware/v4_8.gin", "--step=eval"], capsys)
  assert rc == 0, err
  assert "eval step on v4:2x2x1 (4 x TPU v4" in out and "of 32.00 GiB HBM" in out


def test_report_numbers():
  from doremi_jax import optim, run
  from doremi_jax.model import TransformerConfig
  # Large enough that the step needs temporaries (at 8 x 64 XLA needs none).
  # AdamW: for the tiny model XLA reports no temporaries for the Adafactor step.
  cfg = run.RunConfig(model_dir=None, mixture_or_task_name=None, seq_len=256, train_steps=1000,
                      batch_size=64, model=TransformerConfig(),
                      optimizer=optim.OptimizerConfig(name="adamw"))
  r = cc.check_config(cfg, topology="v5e:2x2", num_domains=3)
  assert r.fits and r.num_devices == 4 and r.mesh_shape == {"data": 1, "fsdp": 4, "model": 1}
  assert r.argument_bytes > 0 and r.temp_bytes > 0 and r.flops_per_device > 0
  assert r.total_bytes == (
      r.argument_bytes + r.output_bytes - r.alias_bytes + r.temp_bytes + r.code_bytes)
  assert r.hbm_bytes == 16 * cc.GiB


def test_oversized_does_not_fit(capsys):
  # 4096-wide, 32k vocabulary, 512 x 1024 tokens on 4 v5e chips: the logits alone are
  # ~16 GiB per chip.
  rc, out, err = _main([
      "--gin_file=gin/runs/main.gin", "--gin_file=gin/models/tiny.gin",
      "--gin.TransformerConfig.emb_dim=4096", "--gin.TransformerConfig.num_heads=32",
      "--gin.TransformerConfig.head_dim=128", "--gin.TransformerConfig.mlp_dim=14336",
      "--gin.TransformerConfig.vocab_size=32000", "--gin.TransformerConfig.dtype='bfloat16'",
      "--gin.TASK_FEATURE_LENGTHS={'targets': 1024}", "--gin.BATCH_SIZE=512",
      "--gin.TRAIN_STEPS=1000", "--num_domains=7", "--topology=v5e:2x2"
  ], capsys)
  assert rc == 1, err
  assert "train step on v5e:2x2" in out and "DOES NOT FIT: needs" in out
  assert "temporaries" in out and "GiB over the 16 GiB of HBM" in out


def test_unknown_topology_exit_code(capsys):
  rc, out, err = _main(TINY + ["--topology=v5e:3x3x3"], capsys)
  assert rc == 2 and not out
  assert "unknown TPU topology" in err and "v4:2x2x4" in err


def test_no_topology(capsys):
  rc, _, err = _main(TINY, capsys)
  assert rc == 2 and "--topology" in err


def test_mesh_that_does_not_match_the_topology(capsys):
  rc, _, err = _main(TINY + ["--topology=v5e:2x2", "--gin.MESH_SHAPE=(1, 8, 1)"], capsys)
  assert rc == 2 and "MESH_SHAPE" in err


def test_batch_not_divisible_by_hosts(capsys):
  # v5e:4x4 is 4 hosts x 4 chips: 6 sequences split neither over 16 chips nor 4 hosts.
  rc, _, err = _main(TINY + ["--topology=v5e:4x4", "--gin.BATCH_SIZE=6"], capsys)
  assert rc == 2 and "BATCH_SIZE=6" in err


@pytest.mark.slow
def test_280m_proxy_with_reference_on_v5e(capsys):
  rc, out, err = _main([
      "--gin_file=gin/runs/doremi.gin", "--gin_file=gin/models/280m.gin",
      "--gin_file=gin/hardware/v5e_16.gin", "--gin.TASK_FEATURE_LENGTHS={'targets': 1024}",
      "--gin.BATCH_SIZE=32", "--gin.TRAIN_STEPS=200000", "--num_domains=22"
  ], capsys)
  assert rc in (0, 1), err
  assert "proxy step (DoReMi, with reference) on v5e:4x4 (16 x TPU v5e" in out
  assert "model 309.9M params, reference 309.9M params" in out
  assert "temporaries" in out and ("FITS" in out or "DOES NOT FIT" in out)
  print(out)


@pytest.mark.slow
def test_8b_on_v5e_2x2_does_not_fit(capsys):
  rc, out, err = _main([
      "--gin_file=gin/runs/main.gin", "--gin_file=gin/models/8b.gin",
      "--gin.TASK_FEATURE_LENGTHS={'targets': 1024}", "--gin.BATCH_SIZE=512",
      "--gin.TRAIN_STEPS=1000", "--num_domains=22", "--topology=v5e:2x2"
  ], capsys)
  assert rc == 1, err
  assert "DOES NOT FIT" in out
  print(out)


DECODE = [
    "--gin_file=gin/runs/main.gin", "--gin_file=gin/models/tiny.gin",
    "--gin.TASK_FEATURE_LENGTHS={'targets': 128}", "--gin.TRAIN_STEPS=10", "--gin.BATCH_SIZE=16",
    "--num_domains=7", "--topology=v5e:2x2", "--step=decode"
]


def test_downstream_decoding_compiles_for_a_topology(capsys):
  rc, out, err = _main(
      DECODE + [
          "--gin.train.downstream=@DownstreamConfig()", "--gin.DownstreamConfig.batch_size=8",
          "--gin.DownstreamConfig.inputs_length=96", "--gin.DownstreamConfig.targets_length=16"
      ], capsys)
  assert rc == 0, err
  assert "greedy decoding with a KV cache (8 prompts of 96 + 16 tokens) on v5e:2x2" in out
  assert out.rstrip().endswith("FITS")


def test_decode_step_needs_a_downstream_binding(capsys):
  rc, _, err = _main(DECODE, capsys)
  assert rc == 2 and "bind train.downstream = @DownstreamConfig()" in err


def test_splash_attention_compiles_for_a_v5e_topology(capsys):
  """attention_impl='splash' compiles for TPU chips on this CPU host, as the Mosaic kernel:
  catches the kernel choosing its CPU (interpret) form or the einsum fallback because it
  looked at this host's backend instead of the mesh it is traced for."""
  import jax
  from doremi_jax import run as run_lib
  from doremi_jax import trainer as trainer_lib
  from doremi_jax.model import TransformerConfig
  splash = ["--gin.TransformerConfig.attention_impl='splash'"]
  rc, out, err = _main(TINY + ["--topology=v5e:2x2"] + splash, capsys)
  assert rc == 0, err
  assert "attention splash" in out and out.rstrip().endswith("FITS")
  cfg = run_lib.RunConfig(model_dir=None, mixture_or_task_name=None, seq_len=128, train_steps=10,
                          batch_size=16, model=TransformerConfig(attention_impl="splash"))
  devices, _ = cc.topology_devices("v5e:2x2")
  tr = run_lib.build_run(cfg, devices=devices, abstract=True, num_domains=7).trainer
  assert "tpu_custom_call" in tr.step_fn.lower(*trainer_lib.abstract_step_args(tr)).as_text()
  cpu = run_lib.build_run(cfg, devices=jax.devices()[:1], abstract=True, num_domains=7).trainer
  assert "tpu_custom_call" not in cpu.step_fn.lower(*trainer_lib.abstract_step_args(cpu)).as_text()
