r"""The cost of online mixing per main step, measured side by side in one run.

  python bench/bench_online.py [--steps=20] [--models=tiny,20m] [--quick]

For each model (one device, float32), times in alternating windows (machine-load drifts
affect all alike; medians over windows):
  * the plain main step (train_step);
  * the reference's forward alone (eval_step on a reference of the same size);
  * an online DoReMi step (train_step + reference forward + the weight update) and an ODM
    step (train_step + the bandit update), each as a ratio to the plain step.
The goal for online DoReMi is at most 1 + (reference forward / plain step): the update and
the weights' trip to the host (one step late, no extra wait) cost nothing beyond the forward.
The host side, feeding the weights to the sampler, is timed on its own.
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from bench_train import MODELS, parse_args, random_batch  # pylint: disable=g-import-not-at-top
from doremi_jax import data as data_lib  # pylint: disable=g-import-not-at-top
from doremi_jax import mixing  # pylint: disable=g-import-not-at-top
from doremi_jax import mixing_log  # pylint: disable=g-import-not-at-top
from doremi_jax import run as run_lib  # pylint: disable=g-import-not-at-top
from doremi_jax import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

K = 7


def _trainer(cfg, batch, seq_len, online):
  run_cfg = run_lib.RunConfig(model_dir=None, mixture_or_task_name=None, seq_len=seq_len,
                              train_steps=1000, batch_size=batch, model=cfg, mesh_shape=(1, 1, 1),
                              online=online)
  return run_lib.build_run(run_cfg, devices=jax.devices()[:1], abstract=True, num_domains=K).trainer


def _runner(cfg, batch, seq_len, kind):
  """A compiled, warmed-up closure: run(n) does n steps (or reference forwards) and waits."""
  online = None if kind in ("train", "ref_forward") else mixing.OnlineConfig(method=kind)
  tr = _trainer(cfg, batch, seq_len, online)
  state = tr.init_fn(jax.random.key(0))
  if online is not None:
    state = state.replace(
        mixing=mixing_log.initial_state(online, np.full(K, 1 / K), tr.state_shardings.mixing))
  box = {"state": state}
  ref = tr.init_fn(jax.random.key(1)).params if kind in ("doremi", "ref_forward") else None
  b = tr.make_batch(random_batch(np.random.default_rng(0), batch, seq_len, cfg.vocab_size, K))

  def run(n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
      if kind == "ref_forward":
        m = tr.eval_fn(ref, b)
      else:
        box["state"], m = tr.step_fn(*trainer_lib.step_args(tr, box["state"], b, ref))
        if online is not None:  # what the train loop reads back each step
          jax.device_get(m["next_sampling_weights"])
    jax.block_until_ready(m)
    return (time.perf_counter() - t) / n

  run(2)
  return run


def time_kinds(cfg, batch, seq_len, n_steps, windows=3):
  kinds = ("train", "ref_forward", "doremi", "odm")
  runners = {k: _runner(cfg, batch, seq_len, k) for k in kinds}
  times = {k: [] for k in kinds}
  for _ in range(windows):
    for k in kinds:
      times[k].append(runners[k](n_steps))
  ratio = lambda k: statistics.median(a / b for a, b in zip(times[k], times["train"]))
  return statistics.median(times["train"]), {k: ratio(k) for k in kinds[1:]}


def host_feed_seconds(steps=2000) -> float:
  """Seconds per step of the host side: set the weights, draw a batch assignment."""
  feed = data_lib.OnlineWeights(K)
  rng = np.random.default_rng(0)
  t = time.perf_counter()
  for s in range(steps):
    feed.set(s, rng.dirichlet(np.ones(K)))
    np.random.default_rng([0, s, 0x5EED]).choice(K, size=512, p=feed.probs(s))
  return (time.perf_counter() - t) / steps


def main(argv=None):
  args, n = parse_args(__doc__.splitlines()[0], argv)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, 1 device, {os.cpu_count()} CPU "
        f"cores; medians of alternating windows of {n} steps\n")
  print(f"{'model':<6} {'B x L':>9} {'main step':>10} {'ref fwd/main':>13} "
        f"{'online DoReMi/main':>19} {'goal (1+ref fwd)':>17} {'ODM/main':>9}")
  for name in args.models.split(","):
    cfg, batch, seq_len = MODELS[name]
    t, r = time_kinds(cfg, batch, seq_len, n)
    print(f"{name:<6} {batch:>4}x{seq_len:<4} {t * 1e3:>8.1f}ms {r['ref_forward']:>13.3f} "
          f"{r['doremi']:>19.3f} {1 + r['ref_forward']:>17.3f} {r['odm']:>9.3f}")
  print(f"\nhost side per step (set the weights, draw a 512-row assignment): "
        f"{host_feed_seconds() * 1e6:,.0f} us")


if __name__ == "__main__":
  main()
