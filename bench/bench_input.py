r"""Input-pipeline throughput: BatchIterator tokens/s on the demo mixture, over the store.

  python bench/bench_input.py [--mixture=demo_uniform] [--seq_len=128,256]
      [--batch_size=16,32] [--steps=200] [--sampling=stratified]

Prints the token store's build time (first build, then opening the complete store) and
tokens/s of next() over it. Import measure_input_tokens_per_second to put the figure next
to a train step's. bench/bench_store.py measures the store at Pile scale.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from doremi_jax import data  # pylint: disable=g-import-not-at-top


def build_packed(mixture: str, seq_len: int, cache_dir=None):
  """Returns (the training split's token store, seconds to build or open it)."""
  from data_pipelines import build_store  # pylint: disable=g-import-not-at-top
  t = time.perf_counter()
  packed = build_store.open_store(mixture, "train", seq_len, cache_dir=cache_dir)
  return packed, time.perf_counter() - t


def measure_input_tokens_per_second(packed, batch_size: int, *, steps: int = 200,
                                    sampling="stratified", seed: int = 0, warmup: int = 5) -> float:
  """Tokens (B x L, padding included) per second of BatchIterator.next()."""
  it = data.BatchIterator(packed, global_batch_size=batch_size, seed=seed, sampling=sampling)
  for _ in range(warmup):
    next(it)
  t = time.perf_counter()
  for _ in range(steps):
    b = next(it)
  dt = time.perf_counter() - t
  return steps * b["targets"].size / dt


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--mixture", default="demo_uniform")
  p.add_argument("--module", default="data_pipelines.demo")
  p.add_argument("--seq_len", default="128,256")
  p.add_argument("--batch_size", default="16,32")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--sampling", default="stratified")
  p.add_argument("--cache_dir", default=None,
                 help="default: a fresh temporary dir (measures a cold build)")
  args = p.parse_args(argv)
  __import__(args.module)
  cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="bench_input_")
  for seq_len in (int(x) for x in args.seq_len.split(",")):
    packed, cold = build_packed(args.mixture, seq_len, cache_dir)
    _, warm = build_packed(args.mixture, seq_len, cache_dir)
    tokens = sum(packed.num_tokens.values())
    print(f"store L={seq_len}: build {cold:.2f}s, open {warm:.2f}s, "
          f"{tokens} tokens in {sum(packed.num_sequences.values())} sequences")
    for bs in (int(x) for x in args.batch_size.split(",")):
      tps = measure_input_tokens_per_second(packed, bs, steps=args.steps, sampling=args.sampling)
      print(f"input L={seq_len} B={bs} sampling={args.sampling}: "
            f"{tps:,.0f} tokens/s")


if __name__ == "__main__":
  main()
