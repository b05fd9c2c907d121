"""The built wheel works outside the checkout: package data, gin files, entry points.

A wheel is built from the repository, installed with --no-deps into a temporary target,
and used from another directory with only that target on PYTHONPATH (the installed
dependencies come from this environment). Nothing here can pass from the checkout alone:
the child process asserts that both packages are imported from the target.
"""
import glob
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHECKS = textwrap.dedent(r"""
    import glob, json, os, sys
    site = sys.argv[1]
    import doremi_jax, data_pipelines
    for module in (doremi_jax, data_pipelines):
      assert module.__file__.startswith(site), (module.__file__, site)
    assert doremi_jax.__version__ and doremi_jax.__version__ != "0.0.0"

    # Every shipped weights file, by name, through the package.
    from data_pipelines import weights
    names = sorted(os.path.basename(p)[:-5]
                   for p in glob.glob(os.path.join(weights.WEIGHTS_DIR, "*.json")))
    assert names == ["pile_baseline", "pile_doremi_1b", "pile_doremi_280m"], names
    for name in names:
      assert abs(sum(weights.read_weights(name).values()) - 1) < 0.01, name

    # A domain set, a mixture from weights, and a batch through stock SeqIO.
    import seqio
    import data_pipelines.pile
    from data_pipelines import custom, register_mixture_from_weights
    custom.register_jsonl_domains("inst", paths=[sys.argv[2]], val_fraction=0.0)
    mixture = register_mixture_from_weights({"alpha": 0.7, "beta": 0.3}, domain_set="inst")
    ds = mixture.get_dataset({"targets": 32}, split="train", shuffle=False)
    converter = seqio.DecoderFeatureConverter(pack=True)
    batch = next(converter(ds, {"targets": 32}).batch(2).as_numpy_iterator())
    assert batch["decoder_target_tokens"].shape == (2, 32), batch.keys()
    assert "domain_ids" not in batch  # the stock converter drops the extra feature

    # Every shipped gin file parses through the default search paths (short names too).
    import gin
    from doremi_jax import config, train  # registers the configurables
    gin_dir = config.gin_dir()
    assert gin_dir.startswith(site), gin_dir
    files = sorted(glob.glob(os.path.join(gin_dir, "*", "*.gin")))
    assert len(files) >= 30, files
    for path in files:
      gin.clear_config()
      config.parse_gin([os.path.relpath(path, gin_dir)], [])
    gin.clear_config()
    config.parse_gin(["gin/runs/doremi.gin"], [])
    print("INSTALLED_OK", len(files))
    """)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(target directory, environment) of the wheel installed with --no-deps."""
  tmp = tmp_path_factory.mktemp("installed")
  wheels, site = tmp / "wheels", tmp / "site"
  proc = subprocess.run([
      sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
      str(wheels), ROOT
  ], capture_output=True, text=True, timeout=300, cwd=str(tmp))
  assert proc.returncode == 0, proc.stderr[-3000:]
  wheel = glob.glob(str(wheels / "doremi_jax-*.whl"))
  assert len(wheel) == 1, wheel
  proc = subprocess.run(
      [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
       str(site), wheel[0]], capture_output=True, text=True, timeout=300, cwd=str(tmp))
  assert proc.returncode == 0, proc.stderr[-3000:]
  env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
  return str(site), env


def test_wheel_contents(installed):
  site, _ = installed
  gin_files = glob.glob(os.path.join(site, "doremi_jax", "gin", "*", "*.gin"))
  repo_files = glob.glob(os.path.join(ROOT, "gin", "*", "*.gin"))
  assert sorted(os.path.relpath(p, os.path.join(site, "doremi_jax", "gin")) for p in gin_files) \
      == sorted(os.path.relpath(p, os.path.join(ROOT, "gin")) for p in repo_files)
  assert len(glob.glob(os.path.join(site, "data_pipelines", "weights", "*.json"))) == 3


def test_installed_package_from_another_directory(installed, tmp_path):
  site, env = installed
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text("".join(
      f'{{"text": "document {i} of {d}", "domain": "{d}"}}\n' for d in ("alpha", "beta")
      for i in range(20)))
  script = tmp_path / "checks.py"
  script.write_text(_CHECKS)
  proc = subprocess.run(
      [sys.executable, str(script), site, str(corpus)], cwd=str(tmp_path), env=env,
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert "INSTALLED_OK" in proc.stdout


@pytest.mark.parametrize("script", [
    "doremi-train", "doremi-evaluate", "doremi-pipeline", "doremi-compile-check",
    "doremi-build-store", "doremi-train-spm"
])
def test_console_scripts(installed, tmp_path, script):
  site, env = installed
  proc = subprocess.run([os.path.join(site, "bin", script), "--help"], cwd=str(tmp_path), env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "usage:" in proc.stdout and "--help" in proc.stdout
  assert "oneDNN" not in proc.stderr and "cuda" not in proc.stderr.lower()  # a quiet start


def test_python_m_entry_point_still_works(installed, tmp_path):
  site, env = installed
  proc = subprocess.run([sys.executable, "-m", "doremi_jax.train", "--help"], cwd=str(tmp_path),
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "--gin_file" in proc.stdout, proc.stderr[-3000:]
