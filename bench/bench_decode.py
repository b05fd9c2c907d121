r"""Greedy decoding throughput with and without the KV cache, side by side in one run.

  python bench/bench_decode.py [--models=tiny,20m] [--batch=8] [--prompt_len=64]
                               [--decode_len=64] [--repeats=1]

Prints, for each model (one device, float32, random parameters, full-length random prompts,
no stop ids so every row decodes all --decode_len tokens): generated tokens/s of
doremi_jax.decoding.Decoder with the cache (prefill, then one token a step) and without it
(the training forward over prompt + generated at every step), and their ratio. The first
call of each mode (compilation) is not timed; figures are medians over --repeats calls.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from doremi_jax import decoding  # pylint: disable=g-import-not-at-top
from doremi_jax import sharding  # pylint: disable=g-import-not-at-top
from doremi_jax.model import Transformer, TransformerConfig  # pylint: disable=g-import-not-at-top

MODELS = {  # gin/models/tiny.gin and gin/models/20m.gin
    "tiny":
        TransformerConfig(vocab_size=259, emb_dim=64, num_heads=2, head_dim=32, num_layers=2,
                          mlp_dim=256, max_len=2048),
    "20m":
        TransformerConfig(vocab_size=32000, emb_dim=384, num_heads=6, head_dim=64, num_layers=8,
                          mlp_dim=1536, max_len=2048),
}


def time_decode(decoder: decoding.Decoder, params, prompts, use_cache: bool, repeats: int) -> float:
  """Median seconds of one decode() of `prompts`, after an untimed compiling call."""
  decoder.decode(params, prompts, use_cache=use_cache)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    decoder.decode(params, prompts, use_cache=use_cache)
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def bench_model(cfg: TransformerConfig, batch: int, prompt_len: int, decode_len: int, repeats: int):
  """(cached, uncached) generated tokens/s for one model."""
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  decoder = decoding.Decoder(cfg, mesh, batch_size=batch, max_prompt_len=prompt_len,
                             max_decode_len=decode_len)
  dummy = jnp.zeros((1, 8), jnp.int32)
  init = jax.jit(Transformer(cfg).init)
  params = nn.meta.unbox(init(jax.random.key(0), dummy, dummy, dummy))["params"]
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, cfg.vocab_size, size=(batch, prompt_len)).tolist()
  tokens = batch * decode_len
  cached = tokens / time_decode(decoder, params, prompts, True, repeats)
  uncached = tokens / time_decode(decoder, params, prompts, False, repeats)
  return cached, uncached


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="tiny,20m")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt_len", type=int, default=64)
  p.add_argument("--decode_len", type=int, default=64)
  p.add_argument("--repeats", type=int, default=1, help="timed calls per mode (median)")
  args = p.parse_args(argv)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} device(s) "
        f"visible, 1 used), {os.cpu_count()} CPU cores")
  print(f"batch {args.batch}, prompt {args.prompt_len}, decode {args.decode_len} tokens "
        f"(no stop ids), float32, median of {args.repeats} call(s) after compiling\n")
  print(f"{'model':<6} {'params':>11} {'cached tok/s':>13} {'uncached tok/s':>15} "
        f"{'cached/uncached':>16}")
  for name in args.models.split(","):
    cfg = MODELS[name]
    cached, uncached = bench_model(cfg, args.batch, args.prompt_len, args.decode_len, args.repeats)
    print(f"{name:<6} {cfg.num_params():>11,} {cached:>13,.0f} {uncached:>15,.0f} "
          f"{cached / uncached:>15.1f}x")


if __name__ == "__main__":
  main()
