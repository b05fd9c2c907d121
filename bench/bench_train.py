r"""Train-step, proxy-step and input throughput, measured side by side in one run.

  python bench/bench_train.py [--steps=20] [--models=tiny,20m] [--quick]

Prints, for each model (one device, float32):
  * train_step tokens/s and achieved model FLOP/s as a fraction of the FLOP/s of a large
    float32 matmul measured in the same run (a CPU "MFU");
  * proxy_step (DoReMi, reference of the same size) time over train_step time
    (the limit is about 4/3: one extra forward pass; the target is <= 1.4);
and the input pipeline's tokens/s next to the tiny model's consumption (target >= 5x).
Figures are medians over repeated timed windows; the machine may be shared and noisy.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from doremi_jax import doremi as doremi_lib  # pylint: disable=g-import-not-at-top
from doremi_jax import run as run_lib  # pylint: disable=g-import-not-at-top
from doremi_jax import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
from doremi_jax.model import TransformerConfig  # pylint: disable=g-import-not-at-top

MODELS = {
    # name: (config, batch, seq_len)
    "tiny": (TransformerConfig(vocab_size=259, emb_dim=64, num_heads=2, head_dim=32, num_layers=2,
                               mlp_dim=256, max_len=2048), 16, 128),
    "20m": (TransformerConfig(vocab_size=32000, emb_dim=384, num_heads=6, head_dim=64, num_layers=8,
                              mlp_dim=1536, max_len=2048), 8, 256),
}


def matmul_flops_per_second(n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a jitted n x n float32 matmul (the machine's practical peak)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / statistics.median(times)


def random_batch(rng, batch: int, seq_len: int, vocab: int, num_domains: int):
  """Fully packed rows (one example each): every token counts."""
  targets = rng.integers(3, vocab, size=(batch, seq_len), dtype=np.int32)
  inputs = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
  domain = (np.arange(batch) % num_domains + 1).astype(np.int32)
  return {
      "inputs": inputs,
      "targets": targets,
      "loss_mask": np.ones((batch, seq_len), np.float32),
      "segment_ids": np.ones((batch, seq_len), np.int32),
      "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)),
      "domain_ids": np.broadcast_to(domain[:, None], (batch, seq_len)).astype(np.int32)
  }


def _runner(cfg, batch: int, seq_len: int, *, doremi: bool):
  """A compiled, warmed-up step closure: run(n) does n steps and waits for them."""
  k = 7
  run_cfg = run_lib.RunConfig(model_dir=None, mixture_or_task_name=None, seq_len=seq_len,
                              train_steps=1000, batch_size=batch, model=cfg, mesh_shape=(1, 1, 1),
                              doremi=doremi_lib.DoReMiConfig() if doremi else None)
  tr = run_lib.build_run(run_cfg, devices=jax.devices()[:1], abstract=True, num_domains=k).trainer
  box = {"state": tr.init_fn(jax.random.key(0))}
  ref = tr.init_fn(jax.random.key(1)).params if doremi else None
  b = tr.make_batch(random_batch(np.random.default_rng(0), batch, seq_len, cfg.vocab_size, k))

  def run(n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
      box["state"], m = tr.step_fn(*trainer_lib.step_args(tr, box["state"], b, ref))
    jax.block_until_ready(m)
    return (time.perf_counter() - t) / n

  run(2)  # compile + warm
  return run


def time_train_and_proxy(cfg, batch: int, seq_len: int, n_steps: int, windows: int = 3):
  """Median seconds per train step, and the median proxy/train ratio over alternating
  windows (so that machine load drifts affect both alike)."""
  train, proxy = _runner(cfg, batch, seq_len, doremi=False), _runner(cfg, batch, seq_len,
                                                                     doremi=True)
  t_train, ratios = [], []
  for _ in range(windows):
    t = train(n_steps)
    t_train.append(t)
    ratios.append(proxy(n_steps) / t)
  return statistics.median(t_train), statistics.median(ratios)


def input_tokens_per_second(seq_len: int, batch: int) -> float:
  import data_pipelines.demo  # pylint: disable=g-import-not-at-top,unused-import
  from bench_input import measure_input_tokens_per_second  # pylint: disable=g-import-not-at-top
  from bench_input import build_packed  # pylint: disable=g-import-not-at-top
  packed, _ = build_packed("demo_natural", seq_len)
  return measure_input_tokens_per_second(packed, batch, steps=200, sampling="mixture")


def parse_args(description: str, argv=None):
  """(args, steps per timed window) of the step benchmarks' shared flags."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--steps", type=int, default=20, help="steps per timed window")
  p.add_argument("--models", default="tiny,20m")
  p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
  args = p.parse_args(argv)
  return args, 3 if args.quick else args.steps


def main(argv=None):
  args, n = parse_args(__doc__.splitlines()[0], argv)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} device(s) "
        f"visible, 1 used), {os.cpu_count()} CPU cores")
  peak = matmul_flops_per_second()
  print(f"float32 2048x2048 matmul: {peak / 1e9:,.1f} GFLOP/s (reference peak)\n")
  print(f"{'model':<6} {'params':>11} {'B x L':>9} {'train tok/s':>12} {'model GFLOP/s':>14} "
        f"{'MFU':>6} {'proxy/train':>12}")
  tiny_tps = None
  for name in args.models.split(","):
    cfg, batch, seq_len = MODELS[name]
    t_train, ratio = time_train_and_proxy(cfg, batch, seq_len, n)
    tps = batch * seq_len / t_train
    flops = cfg.flops_per_token(seq_len) * tps
    if name == "tiny":
      tiny_tps = tps
    print(f"{name:<6} {cfg.num_params():>11,} {batch:>4}x{seq_len:<4} {tps:>12,.0f} "
          f"{flops / 1e9:>14,.2f} {flops / peak:>6.1%} {ratio:>12.3f}")
  if tiny_tps is not None:
    cfg, batch, seq_len = MODELS["tiny"]
    in_tps = input_tokens_per_second(seq_len, batch)
    print(f"\ninput pipeline (demo_natural, B={batch}, L={seq_len}): {in_tps:,.0f} tokens/s = "
          f"{in_tps / tiny_tps:,.1f}x the tiny model's train-step consumption "
          f"({tiny_tps:,.0f} tokens/s; target >= 5x)")


if __name__ == "__main__":
  main()
