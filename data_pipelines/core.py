"""Domain sets: one SeqIO Task per domain, mixtures over them, per-token ids.

A *domain set* is an ordered collection of named SeqIO data sources. Each
domain becomes the Task `f"{set_name}_{domain}"` with the output features
"targets" and "domain_ids". SeqIO sorts a mixture's tasks by name, so the
domain order of a set is the sorted order of its task names, and a token's
domain id is `1 + index` in that order (0 is padding).
"""
import dataclasses
import functools
import logging
import re
from typing import Any, Mapping, Optional, Sequence, Union

import seqio
import tensorflow as tf

DOMAIN_IDS = "domain_ids"
_SANITIZE_RE = re.compile(r"[^a-z0-9_]+")


def sanitize(name: str) -> str:
  """Returns a SeqIO-safe lowercase name ('Pile-CC' -> 'pile_cc')."""
  out = _SANITIZE_RE.sub("_", name.strip().lower()).strip("_")
  if not out:
    raise ValueError(f"Domain name {name!r} has no usable characters.")
  return out


@dataclasses.dataclass
class DomainSet:
  """A registered domain set.

  Attributes:
    name: sanitized set name (task-name prefix).
    domains: sanitized domain names in domain-id order (id = index + 1).
    original_names: sanitized name -> name as given (e.g. 'Pile-CC').
    sources: sanitized name -> seqio.DataSource.
    vocabulary: the vocabulary of the "targets" feature.
    metadata: free-form (e.g. data_dir, fingerprint).
  """
  name: str
  domains: list[str]
  original_names: dict[str, str]
  sources: dict[str, seqio.DataSource]
  vocabulary: seqio.Vocabulary
  metadata: dict[str, Any]

  def task_name(self, domain: str) -> str:
    return f"{self.name}_{domain}"

  def domain_id(self, domain: str) -> int:
    return self.domains.index(domain) + 1

  def tasks(self) -> list[tuple[str, seqio.Task]]:
    return [(d, seqio.get_mixture_or_task(self.task_name(d))) for d in self.domains]


_DOMAIN_SETS: dict[str, DomainSet] = {}
_TASK_TO_SET: dict[str, tuple[str, str]] = {}

# ------------------------------------------------------------- preprocessors


def add_domain_ids(ds: tf.data.Dataset, domain_id: int) -> tf.data.Dataset:
  """Adds int32 "domain_ids" with the shape of "targets" (run after EOS)."""

  def _fn(ex):
    ex = dict(ex)
    ex[DOMAIN_IDS] = tf.fill(tf.shape(ex["targets"]), tf.constant(domain_id, tf.int32))
    return ex

  return ds.map(_fn, num_parallel_calls=tf.data.AUTOTUNE)


def split_to_targets_length(ds: tf.data.Dataset,
                            sequence_length: Optional[Mapping[str, int]] = None) -> tf.data.Dataset:
  """Splits long documents into chunks of sequence_length['targets'].

  SeqIO's packing truncates; this keeps every token of a long document. It is
  a no-op when no targets length is given (e.g. when caching whole documents).
  """
  if not sequence_length or not sequence_length.get("targets"):
    return ds
  length = int(sequence_length["targets"])

  def _split(ex):
    n = tf.size(ex["targets"])
    full = n // length
    rest = n - full * length
    row_lengths = tf.concat(
        [tf.fill([full], length),
         tf.reshape(rest, [1])[:tf.cast(rest > 0, tf.int32)]], 0)
    pieces = {
        k: tf.RaggedTensor.from_row_lengths(ex[k], row_lengths) for k in ("targets", DOMAIN_IDS)
    }
    return tf.data.Dataset.from_tensor_slices(pieces)

  return ds.flat_map(_split)


# -------------------------------------------------------------- registration


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  return {
      "targets":
          seqio.Feature(vocabulary=vocabulary, add_eos=True, dtype=tf.int32),
      DOMAIN_IDS:
          seqio.Feature(
              vocabulary=seqio.PassThroughVocabulary(1), add_eos=False, required=False,
              dtype=tf.int32),
  }


def register_domain_set(name: str, sources: Union[Mapping[str, seqio.DataSource],
                                                  Sequence[tuple[str, seqio.DataSource]]], *,
                        vocabulary: Optional[seqio.Vocabulary] = None, text_key: str = "text",
                        chunk_long_documents: bool = True, register_default_mixtures: bool = True,
                        natural_rates: Optional[Mapping[str, float]] = None,
                        metadata: Optional[Mapping[str, Any]] = None,
                        overwrite: bool = True) -> DomainSet:
  """Registers one Task per domain and the `{name}_uniform/_natural` mixtures.

  Args:
    name: set name, used as the task-name prefix.
    sources: domain name -> seqio.DataSource yielding {text_key: str}.
    vocabulary: vocabulary of "targets"; default seqio.ByteVocabulary().
    text_key: the source's text field, rekeyed to "targets".
    chunk_long_documents: split documents longer than the targets length
      (when SeqIO is given one) instead of truncating them.
    register_default_mixtures: also register `{name}_uniform` and
      `{name}_natural`.
    natural_rates: domain -> rate for `{name}_natural` (e.g. published token
      counts). Default: callable rates that count tokens lazily (the first
      use of the mixture reads the data).
    metadata: stored on the DomainSet (e.g. original set names, data dir).
    overwrite: replace previously registered tasks/mixtures of the same name.

  Returns:
    The DomainSet.
  """
  set_name = sanitize(name)
  srcs, original = _sanitized_sources(name, sources)
  # Domain order = SeqIO's sorted task-name order.
  domains = sorted(srcs, key=lambda d: f"{set_name}_{d}")
  vocabulary = vocabulary or seqio.ByteVocabulary()
  dset = DomainSet(set_name, domains, original, srcs, vocabulary, dict(metadata or {}))
  for i, dom in enumerate(domains):
    _register_task(dset, dom, i + 1, text_key=text_key, chunk_long_documents=chunk_long_documents,
                   overwrite=overwrite)
  _DOMAIN_SETS[set_name] = dset
  _NATURAL_COUNTS.pop(set_name, None)
  if register_default_mixtures:
    register_mixture(f"{set_name}_uniform", {d: 1.0 for d in domains}, domain_set=set_name,
                     overwrite=overwrite)
    if natural_rates is not None:
      rates = {sanitize(k): float(v) for k, v in natural_rates.items()}
    else:
      rates = {d: functools.partial(_lazy_natural_rate, set_name, d) for d in domains}
    register_mixture(f"{set_name}_natural", rates, domain_set=set_name, overwrite=overwrite)
  logging.info("Registered domain set %s: %s", set_name, domains)
  return dset


def _sanitized_sources(name: str, sources) -> tuple[dict, dict]:
  """({sanitized domain: source}, {sanitized domain: name as given})."""
  items = list(sources.items()) if isinstance(sources, Mapping) else list(sources)
  if not items:
    raise ValueError(f"Domain set {name!r} has no domains.")
  original, srcs = {}, {}
  for dom, src in items:
    s = sanitize(dom)
    if s in original:
      raise ValueError(f"Domain set {name!r}: domains {original[s]!r} and "
                       f"{dom!r} both sanitize to {s!r}; rename one.")
    original[s] = dom
    srcs[s] = src
  return srcs, original


def _register_task(dset: DomainSet, dom: str, domain_id: int, *, text_key: str,
                   chunk_long_documents: bool, overwrite: bool) -> None:
  """The domain's SeqIO Task: rekey, tokenize, EOS, domain ids (and chunking)."""
  task_name = dset.task_name(dom)
  if overwrite:
    seqio.TaskRegistry.remove(task_name)
  preprocessors = [
      functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key}),
      seqio.preprocessors.tokenize,
      seqio.preprocessors.append_eos,
      functools.partial(add_domain_ids, domain_id=domain_id),
  ]
  if chunk_long_documents:
    preprocessors.append(split_to_targets_length)
  seqio.TaskRegistry.add(task_name, source=dset.sources[dom], preprocessors=preprocessors,
                         output_features=output_features(dset.vocabulary))
  _TASK_TO_SET[task_name] = (dset.name, dom)


# ------------------------------------------------------ natural token counts
# This module owns the train-split token counts behind every `{set}_natural` mixture
# registered with lazy rates. The cache holds counts only (never normalized weights).
_NATURAL_COUNTS: dict[str, dict[str, float]] = {}


def count_tokens(domain_set_or_mixture: str, split: str = "train",
                 max_examples_per_domain: Optional[int] = None) -> dict[str, int]:
  """Tokens after tokenization + EOS per domain (over the first examples)."""
  out = {}
  for dom, task in domain_tasks(domain_set_or_mixture):
    ds = task.get_dataset(None, split=split, shuffle=False)
    if max_examples_per_domain:
      ds = ds.take(max_examples_per_domain)
    ds = ds.map(lambda ex: tf.size(ex["targets"], out_type=tf.int64))
    out[dom] = int(ds.reduce(tf.constant(0, tf.int64), lambda a, b: a + b))
    if out[dom] == 0:
      raise ValueError(f"Domain {dom!r} has no tokens in split {split!r}; "
                       "check its source.")
  return out


def set_natural_token_counts(set_name: str, counts: Mapping[str, float]) -> None:
  """Supplies the train-split token counts behind `{set}_natural`, so that its
  lazy rates need no pass over the data (e.g. counts from a packed store)."""
  _NATURAL_COUNTS[get_domain_set(set_name).name] = {d: float(c) for d, c in counts.items()}


def natural_token_counts(set_name: str) -> dict[str, float]:
  """The set's train-split token counts: supplied, or counted once and kept."""
  name = get_domain_set(set_name).name
  if name not in _NATURAL_COUNTS:
    _NATURAL_COUNTS[name] = {d: float(c) for d, c in count_tokens(name).items()}
  return dict(_NATURAL_COUNTS[name])


def _is_lazy_natural(rate) -> bool:
  return getattr(rate, "func", None) is _lazy_natural_rate


def _lazy_natural_rate(set_name: str, domain: str, unused_task=None) -> float:
  counts = natural_token_counts(set_name)
  return counts[domain] / sum(counts.values())


def register_mixture(name: str, rates: Mapping[str, Any], *, domain_set: str,
                     overwrite: bool = True) -> seqio.Mixture:
  """Registers a mixture over (a subset of) a domain set's tasks.

  Args:
    name: mixture name.
    rates: domain name (sanitized or original) -> rate (float or callable).
    domain_set: the registered domain set the domains belong to.
    overwrite: replace an existing mixture of that name.
  """
  dset = get_domain_set(domain_set)
  lookup = {d: d for d in dset.domains}
  lookup.update({o: s for s, o in dset.original_names.items()})
  tasks = []
  for dom, rate in rates.items():
    if dom not in lookup and sanitize(dom) not in lookup:
      raise ValueError(f"Mixture {name!r}: unknown domain {dom!r} for domain set "
                       f"{dset.name!r}; known domains: {dset.domains}.")
    d = lookup.get(dom, sanitize(dom))
    tasks.append((dset.task_name(d), rate))
  if overwrite:
    seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, tasks)


# -------------------------------------------------------------------- lookup


def get_domain_set(name_or_mixture: str) -> DomainSet:
  """Returns the DomainSet of a set, task or mixture name."""
  if name_or_mixture in _DOMAIN_SETS:
    return _DOMAIN_SETS[name_or_mixture]
  if name_or_mixture in _TASK_TO_SET:
    return _DOMAIN_SETS[_TASK_TO_SET[name_or_mixture][0]]
  try:
    provider = seqio.get_mixture_or_task(name_or_mixture)
  except ValueError as e:
    raise ValueError(f"{name_or_mixture!r} is not a registered domain set, task or "
                     "mixture; import its module first (e.g. `import data_pipelines.demo`).") from e
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  sets = {_TASK_TO_SET[t.name][0] for t in tasks if t.name in _TASK_TO_SET}
  unknown = [t.name for t in tasks if t.name not in _TASK_TO_SET]
  if unknown or len(sets) != 1:
    raise ValueError(f"{name_or_mixture!r} must consist of tasks of exactly one domain set "
                     f"registered with data_pipelines (unknown tasks: {unknown}, "
                     f"sets: {sorted(sets)}).")
  return _DOMAIN_SETS[sets.pop()]


def domain_names(mixture_or_task_name: str) -> list[str]:
  """Domains in domain-id order (id = index + 1) of the mixture's domain set.

  A mixture over a subset of a set still reports the full set, so that ids
  mean the same thing in every mixture of the set.
  """
  return list(get_domain_set(mixture_or_task_name).domains)


def domain_tasks(mixture_or_task_name: str) -> list[tuple[str, seqio.Task]]:
  """[(domain, seqio.Task)] in domain-id order."""
  return get_domain_set(mixture_or_task_name).tasks()


def task_for_domain(mixture_or_task_name: str, domain: str) -> seqio.Task:
  dset = get_domain_set(mixture_or_task_name)
  d = domain if domain in dset.domains else sanitize(domain)
  if d not in dset.domains:
    raise ValueError(f"Unknown domain {domain!r}; known: {dset.domains}.")
  return seqio.get_mixture_or_task(dset.task_name(d))


def mixture_rates(mixture_or_task_name: str, *,
                  natural_counts: Optional[Mapping[str, float]] = None) -> dict[str, float]:
  """Normalized sampling rates {domain: rate} over the set's domains.

  Domains not in the mixture get 0. A single task gives weight 1 to itself.
  natural_counts: train token counts that resolve lazily counted natural
  rates (`{set}_natural` without published rates) without reading the data.
  """
  dset = get_domain_set(mixture_or_task_name)
  if mixture_or_task_name in _DOMAIN_SETS:
    return {d: 1.0 / len(dset.domains) for d in dset.domains}
  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  rates = {d: 0.0 for d in dset.domains}
  if isinstance(provider, seqio.Mixture):
    for task in provider.tasks:
      dom = _TASK_TO_SET[task.name][1]
      rate = provider.rate_per_task_name.get(task.name)
      if natural_counts is not None and _is_lazy_natural(rate):
        rates[dom] = float(natural_counts[dom])
      else:
        rates[dom] = float(provider.get_rate(task))
  else:
    rates[_TASK_TO_SET[mixture_or_task_name][1]] = 1.0
  total = sum(rates.values())
  if total <= 0:
    raise ValueError(f"Mixture {mixture_or_task_name!r} has total rate 0.")
  return {d: r / total for d, r in rates.items()}
