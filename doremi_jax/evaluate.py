r"""Per-domain held-out log-perplexity (nats per token).

  python -m doremi_jax.evaluate --gin_file=gin/runs/eval.gin --gin.MODEL_DIR="'/tmp/run'"

writes MODEL_DIR/eval.json from the run's latest checkpoint: per-domain log-perplexity,
their uniform average, the worst case, and the checkpoint step. During training,
`train.eval_every` appends the same record to MODEL_DIR/eval_history.jsonl.
"""

if __name__ == "__main__":
  # Under `python -m`, this file runs as __main__; run the importable module instead so
  # that gin registers its configurables once, under doremi_jax.evaluate.
  from doremi_jax import evaluate as _module  # pylint: disable=g-import-not-at-top
  _module.main()
  raise SystemExit(0)

import json
import os
from typing import Mapping, Optional

import gin
import jax
import numpy as np

from doremi_jax import checkpoint as ckpt_lib
from doremi_jax import config as config_lib
from doremi_jax import data as data_lib


def summarize(domains, loss_sums_K, counts_K) -> dict:
  """Per-domain mean token loss; average (uniform over domains) and worst case."""
  per_domain = {d: float(s / c) for d, s, c in zip(domains, loss_sums_K, counts_K) if c > 0}
  missing = [d for d, c in zip(domains, counts_K) if c == 0]
  if missing:
    raise ValueError(f"no validation tokens for domains {missing}: every domain needs "
                     f"validation documents to be evaluated.")
  values = list(per_domain.values())
  return {"per_domain": per_domain, "average": float(np.mean(values)),
          "worst": float(np.max(values)), "worst_domain": max(per_domain, key=per_domain.get),
          "tokens": {d: int(c) for d, c in zip(domains, counts_K)}}


class Evaluator:
  """Evaluates parameters on every validation sequence of every domain."""

  def __init__(self, trainer, mixture_or_task_name: str, seq_len: int, *, batch_size: int,
               cache_dir: Optional[str] = None, max_sequences_per_domain: Optional[int] = None):
    """max_sequences_per_domain: evaluate on the first N validation sequences of each
    domain (a fixed subset, the same at every evaluation); None for all of them."""
    self.trainer = trainer
    self.domains = data_lib.domain_names(mixture_or_task_name)
    self.packed = data_lib.PackedDomains.build(mixture_or_task_name, "validation", seq_len,
                                               cache_dir=cache_dir)
    if max_sequences_per_domain:
      self.packed = data_lib.PackedDomains(
          self.packed.names,
          {pool: {k: v[:max_sequences_per_domain] for k, v in arrays.items()}
           for pool, arrays in self.packed.arrays.items()},
          split="validation", sequence_length=seq_len)
    self.batch_size = batch_size

  def evaluate(self, params) -> dict:
    k = len(self.domains)
    sums, counts = np.zeros(k), np.zeros(k)
    for host_batch in data_lib.eval_batches(self.packed, self.batch_size,
                                            jax.process_index(), jax.process_count()):
      out = jax.device_get(self.trainer.eval_fn(params, self.trainer.make_batch(host_batch)))
      sums += np.asarray(out["domain_loss_sums"], np.float64)
      counts += np.asarray(out["domain_token_counts"], np.float64)
    return summarize(self.domains, sums, counts)

  def run(self, params, step: int, model_dir: str) -> dict:
    """Evaluates and appends {"step", ...} to MODEL_DIR/eval_history.jsonl (process 0)."""
    result = {"step": int(step), **self.evaluate(params)}
    if jax.process_index() == 0:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      with tf.io.gfile.GFile(history_path(model_dir), "a") as f:
        f.write(json.dumps(result) + "\n")
    return result


def history_path(model_dir: str) -> str:
  return os.path.join(model_dir, "eval_history.jsonl")


def read_history(model_dir: str) -> list[dict]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.exists(history_path(model_dir)):
    return []
  with tf.io.gfile.GFile(history_path(model_dir)) as f:
    return [json.loads(l) for l in f if l.strip()]


@gin.configurable
def evaluate(model_dir: str = gin.REQUIRED, *, batch_size: int = 16, mesh_shape=(1, -1, 1),
             mixture_or_task_name: Optional[str] = None,
             task_feature_lengths: Optional[Mapping[str, int]] = None,
             cache_dir: Optional[str] = None, step: Optional[int] = None) -> dict:
  """Evaluates MODEL_DIR's latest (or given) checkpoint; writes MODEL_DIR/eval.json.

  The model, mixture and length default to those the run was trained with.
  """
  from doremi_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from doremi_jax import steps as steps_lib  # pylint: disable=g-import-not-at-top
  from doremi_jax.model import TransformerConfig  # pylint: disable=g-import-not-at-top
  from doremi_jax.trainer import build_trainer  # pylint: disable=g-import-not-at-top
  info = ckpt_lib.read_run_info(model_dir)
  if info is None:
    raise FileNotFoundError(f"no run in {model_dir} ({ckpt_lib.RUN_INFO} missing); train first.")
  mixture = mixture_or_task_name or info["mixture"]
  seq_len = (config_lib.sequence_length(task_feature_lengths) if task_feature_lengths
             else info["sequence_length"])
  domains = data_lib.domain_names(mixture)
  if domains != info["domains"]:
    raise ValueError(f"mixture {mixture!r} has domains {domains}, the run {info['domains']}.")
  model_cfg = TransformerConfig(**info["model"])
  trainer = build_trainer(model_cfg=model_cfg, mesh=sharding_lib.make_mesh(mesh_shape),
                          global_batch_size=batch_size, seq_len=seq_len, total_steps=1,
                          step_cfg=steps_lib.StepConfig(num_domains=len(domains)),
                          num_processes=jax.process_count())
  params, ckpt_step = ckpt_lib.restore_params(model_dir, trainer.abstract_state.params, step)
  result = Evaluator(trainer, mixture, seq_len, batch_size=batch_size,
                     cache_dir=cache_dir).evaluate(params)
  result = {"step": ckpt_step, "mixture": mixture, **result}
  ckpt_lib.write_json(os.path.join(model_dir, "eval.json"), result)
  return result


def main(argv=None):
  config_lib.run_main(evaluate, argv)
