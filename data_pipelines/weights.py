"""Domain weights: the file format, natural / uniform / UniMax weights, and
registering a SeqIO mixture from a weights file.

File format (JSON): {"domains": {name: weight}, ...metadata}. Names may be
the sanitized domain names (e.g. "pile_cc") or the originals ("Pile-CC").
"""
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence, Union

import seqio
import tensorflow as tf

from data_pipelines import core

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")


def _where(source) -> str:
  return f" in {source}" if source else ""


def validate_weights(weights: Mapping[str, float], *, domains: Optional[Sequence[str]] = None,
                     source: Optional[str] = None) -> dict[str, float]:
  """Checks names and values; returns {name: float(weight)}.

  Raises:
    ValueError: unknown domain, negative or non-finite weight, or sum 0.
  """
  out = {}
  for name, w in weights.items():
    try:
      w = float(w)
    except (TypeError, ValueError):
      raise ValueError(f"Domain {name!r}{_where(source)}: weight {w!r} is not "
                       "a number.") from None
    if not math.isfinite(w) or w < 0:
      raise ValueError(f"Domain {name!r}{_where(source)}: weight {w} must be "
                       "finite and >= 0; fix the weights file.")
    out[name] = w
  if domains is not None:
    known = set(domains)
    for name in out:
      if name not in known and core.sanitize(name) not in known:
        raise ValueError(f"Unknown domain {name!r}{_where(source)}; known domains: "
                         f"{sorted(known)}. Rename it or use the weights of the matching "
                         "domain set.")
  if sum(out.values()) <= 0:
    raise ValueError(f"Weights{_where(source)} sum to 0; give at least one "
                     "domain a positive weight.")
  return out


def normalize(weights: Mapping[str, float]) -> dict[str, float]:
  total = sum(weights.values())
  return {k: v / total for k, v in weights.items()}


def shipped_weights_path(name: str) -> str:
  """The path of a weights file shipped with the package ("pile_baseline")."""
  shipped = os.path.join(WEIGHTS_DIR, f"{name}.json")
  if not os.path.exists(shipped):
    raise FileNotFoundError(f"Weights file not found: {name} (shipped: "
                            f"{sorted(f[:-5] for f in os.listdir(WEIGHTS_DIR))}).")
  return shipped


def read_weights(path: str, *, domains: Optional[Sequence[str]] = None) -> dict[str, float]:
  """Reads {"domains": {...}} from a JSON file (local or gs://), validated.

  A bare name ("pile_doremi_280m") resolves to a shipped weights file.
  """
  if not tf.io.gfile.exists(path):
    path = shipped_weights_path(path)
  with tf.io.gfile.GFile(path) as f:
    try:
      data = json.load(f)
    except ValueError as e:
      raise ValueError(f"{path}: not valid JSON ({e}).") from None
  if not isinstance(data, dict) or not isinstance(data.get("domains"), dict):
    raise ValueError(f"{path}: expected {{\"domains\": {{name: weight}}, ...}}.")
  return validate_weights(data["domains"], domains=domains, source=path)


def read_metadata(path: str) -> dict[str, Any]:
  with tf.io.gfile.GFile(path) as f:
    return {k: v for k, v in json.load(f).items() if k != "domains"}


def write_weights(path: str, weights: Mapping[str, float], **metadata) -> None:
  """Writes {"domains": weights, **metadata} as JSON (local or gs://)."""
  weights = validate_weights(weights, source=path)
  d = os.path.dirname(path)
  if d:
    tf.io.gfile.makedirs(d)
  with tf.io.gfile.GFile(path, "w") as f:
    json.dump({"domains": weights, **metadata}, f, indent=2)
    f.write("\n")


def uniform_weights(domains: Union[str, Sequence[str]]) -> dict[str, float]:
  """1/K per domain (domains, or a mixture/domain-set name)."""
  if isinstance(domains, str):
    domains = core.domain_names(domains)
  return {d: 1.0 / len(domains) for d in domains}


def natural_weights(domain_set_or_mixture: str, split: str = "train",
                    max_examples_per_domain: Optional[int] = None,
                    epochs: Optional[Mapping[str, float]] = None, *,
                    counts: Optional[Mapping[str, float]] = None) -> dict[str, float]:
  """Token proportions (optionally times per-domain epochs), normalized.

  counts: per-domain token (or L-token row) counts to use, e.g. from the
  packed training data; default: the train split's counts owned by
  data_pipelines.core (counted once), or a count of `split`.
  With max_examples_per_domain, counts the first examples of each domain
  (a sample: proportions then reflect tokens per document, not domain size).
  """
  if counts is None:
    if split == "train" and not max_examples_per_domain:
      counts = core.natural_token_counts(domain_set_or_mixture)
    else:
      counts = core.count_tokens(domain_set_or_mixture, split, max_examples_per_domain)
  epochs = {core.sanitize(k): float(v) for k, v in (epochs or {}).items()}
  validate_weights(epochs or {"_": 1.0}, domains=list(counts) + ["_"])
  return normalize({d: c * epochs.get(d, 1.0) for d, c in counts.items()})


def unimax_weights(token_counts: Mapping[str, float], total_tokens: float,
                   max_epochs: float) -> dict[str, float]:
  """UniMax (Chung et al., 2023): uniform budget with an epoch cap.

  Domains are visited from smallest to largest; each gets the remaining
  budget split evenly over the remaining domains, capped at
  max_epochs * its tokens. Returns budgets normalized to weights.
  """
  if total_tokens <= 0 or max_epochs <= 0:
    raise ValueError("total_tokens and max_epochs must be > 0.")
  validate_weights(token_counts, source="token_counts")
  order = sorted(token_counts, key=lambda d: (token_counts[d], d))
  budget = float(total_tokens)
  alloc = {}
  for i, d in enumerate(order):
    share = budget / (len(order) - i)
    alloc[d] = min(share, max_epochs * float(token_counts[d]))
    budget -= alloc[d]
  return normalize({d: alloc[d] for d in token_counts})


def register_mixture_from_weights(weights_file_or_dict: Union[str, Mapping[str, float]],
                                  name: Optional[str] = None, *, domain_set: str) -> seqio.Mixture:
  """Registers a SeqIO mixture over `domain_set` with the given weights.

  Args:
    weights_file_or_dict: a weights file path, shipped name, or dict.
    name: mixture name; default f"{domain_set}_doremi".
    domain_set: domain set (or any of its mixtures/tasks).

  Returns:
    The seqio.Mixture. Domains missing from the weights get rate 0, so every
    mixture of a set keeps all its tasks (and domain ids).
  """
  dset = core.get_domain_set(domain_set)
  known = list(dset.domains) + list(dset.original_names.values())
  if isinstance(weights_file_or_dict, str):
    w = read_weights(weights_file_or_dict, domains=known)
  else:
    w = validate_weights(weights_file_or_dict, domains=known)
  lookup = {o: s for s, o in dset.original_names.items()}
  rates = {d: 0.0 for d in dset.domains}
  for k, v in w.items():
    rates[lookup.get(k, k if k in rates else core.sanitize(k))] = v
  return core.register_mixture(name or f"{dset.name}_doremi", rates, domain_set=dset.name)
