r"""Step throughput and MFU on whatever JAX sees (CPU, GPU, TPU), side by side in one run.

  python bench/bench_device.py [--models=150m,280m] [--impls=einsum,cudnn] [--seq_len=1024]
                               [--max_batch=256] [--steps=10] [--tiny]

For each model (gin/models/<name>.gin, computing in bf16) and attention implementation, on a
(1, all devices, 1) FSDP mesh at the largest global batch that fits (searched downward from
--max_batch by halving: the proxy step, which also holds the reference, must compile within
the device memory and run):
  * train step and proxy step (DoReMi, reference of the same size) tokens/s and MFU: model
    FLOPs (TransformerConfig.flops_per_token; the proxy adds the reference's forward) over
    the devices' peak bf16 FLOP/s, from the table below (stated with each figure; on CPU a
    bf16 matmul measured in the same run);
  * proxy / (train step + reference forward): the DoReMi overhead (1.0 is the ideal);
  * memory: the compiled proxy step's own estimate per device (arguments + outputs - donated
    + temporaries), and the devices' peak bytes in use so far in this process
    (device.memory_stats(), where the backend keeps it: a running maximum over the rows);
  * greedy decode tokens/s with the KV cache;
and the host input rate from the token store (the demo mixture) against the train step's
demand. --tiny runs gin/models/tiny.gin briefly on CPU (a smoke run; tests/test_bench_device.py).
Figures are medians of --windows timed windows after one untimed (compiling) step.
"""
import argparse
import dataclasses
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import gin  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from bench_train import random_batch  # pylint: disable=g-import-not-at-top
from doremi_jax import compile_check  # pylint: disable=g-import-not-at-top
from doremi_jax import decoding  # pylint: disable=g-import-not-at-top
from doremi_jax import doremi as doremi_lib  # pylint: disable=g-import-not-at-top
from doremi_jax import run as run_lib  # pylint: disable=g-import-not-at-top
from doremi_jax import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
from doremi_jax.model import TransformerConfig  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DOMAINS = 22  # the Pile's
# Peak dense bf16 TFLOP/s per JAX device, by a substring of device.device_kind (first match).
# TPUs: doremi_jax.compile_check.CHIPS (one device per chip). GPUs: the vendors' dense
# (no sparsity) tensor-core figures, SXM parts.
PEAK_TFLOPS = (
    ("TPU v6 lite", compile_check.CHIPS["v6e"]["tflops"]),
    ("TPU v5 lite", compile_check.CHIPS["v5e"]["tflops"]),
    ("TPU v5e", compile_check.CHIPS["v5e"]["tflops"]),
    ("TPU v5p", compile_check.CHIPS["v5p"]["tflops"]),
    ("TPU v5", compile_check.CHIPS["v5p"]["tflops"]),
    ("TPU v4", compile_check.CHIPS["v4"]["tflops"]),
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
)
DEFAULT_IMPLS = {"tpu": "einsum,splash", "gpu": "einsum,xla,cudnn", "cpu": "einsum,xla"}
TINY = dict(models="tiny", seq_len=128, max_batch=16, steps=2, windows=1, decode_batch=4,
            prompt_len=16, decode_len=8, input_steps=20)
OOM_WORDS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM")


def model_config(name: str, **overrides) -> TransformerConfig:
  """TransformerConfig as gin/models/<name>.gin binds it, with overrides."""
  gin.clear_config()
  gin.parse_config_file(os.path.join(ROOT, "gin", "models", f"{name}.gin"))
  cfg = TransformerConfig()
  gin.clear_config()
  return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def peak_flops(device) -> tuple[float, str]:
  """(peak bf16 FLOP/s of one device, where the figure comes from)."""
  for kind, tflops in PEAK_TFLOPS:
    if kind in device.device_kind:
      return tflops * 1e12, f"{tflops:g} TFLOP/s bf16 peak of {device.device_kind} (table)"
  n = 1024
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(3):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  got = 2 * n**3 / statistics.median(times)
  return got, (f"{got / 1e12:.3f} TFLOP/s: a {n}x{n} bf16 matmul measured now on "
               f"{device.device_kind} (no table entry; peak unknown)")


def device_memory() -> tuple[int, int]:
  """(peak bytes in use, bytes limit) of the most loaded device; zeros if not kept."""
  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  return (max(s.get("peak_bytes_in_use", 0) for s in stats),
          min(s.get("bytes_limit", 0) for s in stats) if all(stats) else 0)


def _compiled_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  m = m[0] if isinstance(m, (list, tuple)) else m
  get = lambda f: int(getattr(m, f, 0) or 0)
  return (get("argument_size_in_bytes") + get("output_size_in_bytes") - get("alias_size_in_bytes") +
          get("temp_size_in_bytes"))


def _build(cfg, batch: int, seq_len: int, doremi: bool):
  run_cfg = run_lib.RunConfig(model_dir=None, mixture_or_task_name=None, seq_len=seq_len,
                              train_steps=1000, batch_size=batch, model=cfg, mesh_shape=(1, -1, 1),
                              doremi=doremi_lib.DoReMiConfig() if doremi else None)
  return run_lib.build_run(run_cfg, devices=jax.devices(), abstract=True,
                           num_domains=NUM_DOMAINS).trainer


class Steps:
  """The compiled train step, proxy step and reference forward (eval step) at one batch."""

  def __init__(self, cfg, batch: int, seq_len: int):
    self.batch, self.seq_len = batch, seq_len
    self.proxy_tr, self.train_tr = _build(cfg, batch, seq_len,
                                          True), _build(cfg, batch, seq_len, False)
    limit = device_memory()[1]
    self.proxy = self.proxy_tr.step_fn.lower(
        *trainer_lib.abstract_step_args(self.proxy_tr)).compile()
    self.est_bytes = _compiled_bytes(self.proxy)
    if limit and self.est_bytes > limit:
      raise MemoryError(f"RESOURCE_EXHAUSTED: {self.est_bytes} > {limit} bytes")
    self.train = self.train_tr.step_fn.lower(
        *trainer_lib.abstract_step_args(self.train_tr)).compile()
    self.forward = self.train_tr.eval_fn.lower(self.train_tr.abstract_state.params,
                                               self.train_tr.abstract_batch).compile()
    host = random_batch(np.random.default_rng(0), batch, seq_len, cfg.vocab_size, NUM_DOMAINS)
    self.data = self.train_tr.make_batch(host)
    self.states = {
        "train": self.train_tr.init_fn(jax.random.key(0)),
        "proxy": self.proxy_tr.init_fn(jax.random.key(0))
    }
    self.ref = self.train_tr.init_fn(jax.random.key(1)).params
    for which in ("proxy", "train", "forward"):
      self.time(which, 1)  # runs once: a step that does not fit fails here

  def time(self, which: str, n: int) -> float:
    """Seconds per call of one of the three, over n calls."""
    t = time.perf_counter()
    for _ in range(n):
      if which == "forward":
        out = self.forward(self.ref, self.data)
      elif which == "train":
        self.states["train"], out = self.train(self.states["train"], self.data)
      else:
        self.states["proxy"], out = self.proxy(self.states["proxy"], self.ref, self.data)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n


def largest_fitting(cfg, seq_len: int, max_batch: int) -> Steps:
  """Steps at the largest batch (halving from max_batch, a multiple of the device count)
  whose proxy step compiles within device memory and runs."""
  n_dev = len(jax.devices())
  batch = max(max_batch // n_dev, 1) * n_dev
  while True:
    try:
      return Steps(cfg, batch, seq_len)
    except Exception as e:  # pylint: disable=broad-except
      if not any(w in str(e) for w in OOM_WORDS) or batch <= n_dev:
        raise
      gc.collect()
      print(f"  batch {batch} does not fit ({str(e).splitlines()[0][:100]}); halving")
      batch = max(batch // 2 // n_dev, 1) * n_dev


def decode_tokens_per_second(cfg, mesh, params, *, batch: int, prompt_len: int,
                             decode_len: int) -> float:
  """Generated tokens/s of cached greedy decoding, full-length prompts, no stop ids."""
  dec = decoding.Decoder(cfg, mesh, batch_size=batch, max_prompt_len=prompt_len,
                         max_decode_len=decode_len)
  prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, prompt_len)).tolist()
  dec.decode(params, prompts)  # compile
  t = time.perf_counter()
  dec.decode(params, prompts)
  return batch * decode_len / (time.perf_counter() - t)


def bench_one(cfg, args, flops_per_s: float) -> dict:
  """The figures of one model and attention implementation."""
  steps = largest_fitting(cfg, args.seq_len, args.max_batch)
  b, l = steps.batch, steps.seq_len
  t = {w: [] for w in ("train", "proxy", "forward")}
  for _ in range(args.windows):  # interleaved, so that load drifts touch all three alike
    for w in t:
      t[w].append(steps.time(w, args.steps))
  t = {w: statistics.median(v) for w, v in t.items()}
  train_flops = cfg.flops_per_token(l) * b * l
  proxy_flops = train_flops * (1 + 1 / 3)  # + the same-size reference's forward
  peak, limit = device_memory()
  n_dev = len(jax.devices())
  dp = max((args.decode_batch or b) // n_dev, 1) * n_dev
  dec = decode_tokens_per_second(cfg, steps.train_tr.mesh, steps.ref, batch=dp,
                                 prompt_len=args.prompt_len, decode_len=args.decode_len)
  return dict(batch=b, seq_len=l, train_tps=b * l / t["train"], proxy_tps=b * l / t["proxy"],
              train_mfu=train_flops / t["train"] / flops_per_s,
              proxy_mfu=proxy_flops / t["proxy"] / flops_per_s,
              overhead=t["proxy"] / (t["train"] + t["forward"]), est_bytes=steps.est_bytes,
              peak_bytes=peak, limit=limit, decode_tps=dec)


def input_tokens_per_second(seq_len: int, batch: int, steps: int) -> float:
  """The host's BatchIterator rate over the demo mixture's token store."""
  import data_pipelines.demo  # pylint: disable=g-import-not-at-top,unused-import
  from bench_input import build_packed  # pylint: disable=g-import-not-at-top
  from bench_input import measure_input_tokens_per_second  # pylint: disable=g-import-not-at-top
  packed, _ = build_packed("demo_natural", seq_len)
  return measure_input_tokens_per_second(packed, batch, steps=steps, sampling="stratified")


HEADER = (f"{'model':<6} {'attention':<9} {'B x L':>10} {'train tok/s':>12} {'train MFU':>9} "
          f"{'proxy tok/s':>12} {'proxy MFU':>9} {'proxy/(train+ref fwd)':>22} "
          f"{'proxy est.':>10} {'device peak':>11} {'decode tok/s':>13}")


def _row(name: str, impl: str, r: dict) -> str:
  return (f"{name:<6} {impl:<9} {r['batch']:>5}x{r['seq_len']:<4} {r['train_tps']:>12,.0f} "
          f"{r['train_mfu']:>9.1%} {r['proxy_tps']:>12,.0f} {r['proxy_mfu']:>9.1%} "
          f"{r['overhead']:>22.3f} {_gib(r['est_bytes']):>10} {_gib(r['peak_bytes']):>11} "
          f"{r['decode_tps']:>13,.0f}")


def _gib(n: int) -> str:
  return f"{n / 2**30:.2f} GiB" if n else "n/a"


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="150m,280m", help="gin/models/<name>.gin, comma-separated")
  p.add_argument("--impls", default=None, help="attention implementations (default: per platform, "
                 f"{DEFAULT_IMPLS})")
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--max_batch", type=int, default=256, help="global batch the search starts at")
  p.add_argument("--steps", type=int, default=10, help="steps per timed window")
  p.add_argument("--windows", type=int, default=3)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--remat", default=None, help="default: the model file's")
  p.add_argument("--logits_chunk", type=int, default=None, help="default: the model file's")
  p.add_argument("--decode_batch", type=int, default=32, help="0: the train batch")
  p.add_argument("--prompt_len", type=int, default=128)
  p.add_argument("--decode_len", type=int, default=64)
  p.add_argument("--input_steps", type=int, default=100)
  p.add_argument("--tiny", action="store_true",
                 help=f"a CPU smoke run: {TINY} (explicit flags still apply)")
  args = p.parse_args(argv)
  if args.tiny:
    given = {a.split("=")[0].lstrip("-") for a in (argv or sys.argv[1:])}
    for k, v in TINY.items():
      if k not in given:
        setattr(args, k, v)
  platform = jax.devices()[0].platform
  args.impls = args.impls or DEFAULT_IMPLS.get(platform, "einsum")
  return args


def main(argv=None):
  args = _parse(argv)
  dev = jax.devices()[0]
  flops_one, peak_note = peak_flops(dev)
  n_dev = len(jax.devices())
  print(f"jax {jax.__version__} on {n_dev} x {dev.device_kind} ({dev.platform}), "
        f"{jax.process_count()} process(es), {os.cpu_count()} CPU cores")
  print(f"MFU against {n_dev} x {peak_note}")
  results = []
  for name in args.models.split(","):
    for impl in args.impls.split(","):
      cfg = model_config(name, dtype=args.dtype, remat=args.remat, logits_chunk=args.logits_chunk,
                         attention_impl=impl)
      print(f"{name}: {cfg.num_params() / 1e6:.1f}M params, compute {cfg.dtype}, remat "
            f"{cfg.remat}, logits_chunk {cfg.logits_chunk}, attention {impl}")
      results.append((name, impl, bench_one(cfg, args, flops_one * n_dev)))
  print(f"\n{HEADER}")
  for name, impl, r in results:
    print(_row(name, impl, r))
  first = {}
  for name, _, r in results:
    first.setdefault(name, r)
  for name, r in first.items():
    rate = input_tokens_per_second(r["seq_len"], r["batch"], args.input_steps)
    demand = max(rr["train_tps"] for nn, _, rr in results if nn == name) / jax.process_count()
    print(f"input ({name}, demo_natural store, B={r['batch']} L={r['seq_len']}): "
          f"{rate:,.0f} tokens/s per host = {rate / demand:,.1f}x the fastest train step's "
          f"per-host demand ({demand:,.0f} tokens/s)")


if __name__ == "__main__":
  main()
