"""Per-domain held-out log-perplexity (nats per token) of a model's parameters.

The Evaluator reads every validation sequence of every domain (or a fixed first N) in
fixed batches; training appends its results to MODEL_DIR/eval_history.jsonl, and
`python -m doremi_jax.evaluate` writes MODEL_DIR/eval.json.
"""
import os
from typing import Optional

import jax
import numpy as np

from doremi_jax import data as data_lib
from doremi_jax import outputs


def summarize(domains, loss_sums_K, counts_K) -> dict:
  """Per-domain mean token loss; average (uniform over domains) and worst case."""
  per_domain = {d: float(s / c) for d, s, c in zip(domains, loss_sums_K, counts_K) if c > 0}
  missing = [d for d, c in zip(domains, counts_K) if c == 0]
  if missing:
    raise ValueError(f"no validation tokens for domains {missing}: every domain needs "
                     f"validation documents to be evaluated.")
  values = list(per_domain.values())
  return {
      "per_domain": per_domain,
      "average": float(np.mean(values)),
      "worst": float(np.max(values)),
      "worst_domain": max(per_domain, key=per_domain.get),
      "tokens": {
          d: int(c) for d, c in zip(domains, counts_K)
      }
  }


class Evaluator:
  """Evaluates parameters on every validation sequence of every domain."""

  def __init__(self, trainer, validation, *, batch_size: int,
               max_sequences_per_domain: Optional[int] = None):
    """validation: the packed validation rows (a token store, or PackedDomains).
    max_sequences_per_domain: evaluate on the first N validation sequences of each domain
    (a fixed subset, the same at every evaluation); None for all of them."""
    self.trainer = trainer
    self.domains = list(validation.names)
    self.packed = validation
    if max_sequences_per_domain:
      self.packed = data_lib.FirstRows(validation, max_sequences_per_domain)
    self.batch_size = batch_size

  def evaluate(self, params) -> dict:
    k = len(self.domains)
    sums, counts = np.zeros(k), np.zeros(k)
    for host_batch in data_lib.eval_batches(self.packed, self.batch_size, jax.process_index(),
                                            jax.process_count()):
      out = jax.device_get(self.trainer.eval_fn(params, self.trainer.make_batch(host_batch)))
      sums += np.asarray(out["domain_loss_sums"], np.float64)
      counts += np.asarray(out["domain_token_counts"], np.float64)
    return summarize(self.domains, sums, counts)

  def run(self, params, step: int, model_dir: str) -> dict:
    """Evaluates and appends {"step", ...} to MODEL_DIR/eval_history.jsonl (process 0)."""
    result = {"step": int(step), **self.evaluate(params)}
    outputs.append_jsonl(os.path.join(model_dir, outputs.EVAL_HISTORY), [result])
    return result


def read_history(model_dir: str) -> list[dict]:
  return outputs.read_jsonl(os.path.join(model_dir, outputs.EVAL_HISTORY))
