"""Your own corpus as a DoReMi domain set, from gin alone (no Python to write).

  import data_pipelines.corpus
  pipeline.domain_set = @register_corpus()        # gin calls it when the pipeline starts
  register_corpus.data_files = ['gs://bucket/data/*.jsonl.zst']
  register_corpus.domain_field = 'meta.source'
  register_corpus.output_dir = %PIPELINE_DIR

Layouts: `data_files` (glob patterns of JSONL(.zst|.gz) or Parquet files, local or gs://)
whose records carry `domain_field` (a dotted key or a Parquet column, nested columns dotted);
`data_files` with domain_field=None (one domain per file name); or `data_dir`, one file or
subdirectory per domain (data_pipelines.sources.directory_domains). Domain names come from
the data, sanitized for SeqIO (originals kept in DomainSet.original_names); `domain_map`
maps several values onto one domain, `domains` selects some, `min_tokens` drops the small
ones (logged). Validation: the files matching `validation_files`, or else a hash of each
document (`val_fraction`). Vocabulary: 'byte' (default), a SentencePiece model path (local or
gs://), or 'train': a SentencePiece model trained on a deterministic sample of the corpus
(per domain, the documents with the smallest hash), stored under output_dir and reused.

Work done once and cached under `output_dir` (reruns and the other hosts read it): the scan
(documents and bytes per domain value, when there is no `domains` list or a min_tokens)
in `corpus/`, the tokenizer in `tokenizer/`. Bad input fails here, before any training.
"""
import functools
import hashlib
import heapq
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import gin
import seqio
import tensorflow as tf

from data_pipelines import core
from data_pipelines import corpus_files
from data_pipelines import sources
from data_pipelines import train_spm
from data_pipelines import vocab as vocab_lib
from doremi_jax import store

_WAIT_S = 24 * 3600  # how long another host waits for process 0's scan or tokenizer
_SAMPLE_CHARS = 16384  # of a sampled document kept for the tokenizer


@gin.configurable
def register_corpus(*, name: str = "custom", data_files: corpus_files.Patterns = None,
                    data_dir: Optional[str] = None, domain_field: Optional[str] = "domain",
                    text_field: str = "text", validation_files: corpus_files.Patterns = None,
                    val_fraction: float = 0.05, domains: Optional[Sequence[str]] = None,
                    domain_map: Optional[Mapping[str, str]] = None, min_tokens: int = 0,
                    vocabulary: Optional[str] = "byte", vocab_size: int = 32000,
                    tokenizer_sample_docs: int = 2000, output_dir: Optional[str] = None,
                    on_malformed: str = "error") -> str:
  """Registers the corpus as domain set `name` (tasks `<name>_<domain>`, `<name>_natural`,
  `<name>_uniform`) and returns its name. Arguments: see the module docstring; domain_map
  {value: domain}; domains: names after mapping (ids follow SeqIO's sorted task names);
  min_tokens: train tokens of this vocabulary (bytes: exact; SentencePiece: estimated from the
  sample, exact for a domain the sample holds whole)."""
  layout = corpus_files.layout(data_files, data_dir, domain_field, validation_files, text_field)
  split = {"val_fraction": None if layout["val_files"] else val_fraction}
  key = store.build_key(
      files=sources.fingerprint(layout["all_files"]), layout=layout["key"], text_field=text_field,
      on_malformed=on_malformed, **split)
  cache = os.path.join(output_dir, "corpus") if output_dir else None
  scan = functools.cache(
      lambda: _scan(layout, text_field, on_malformed, split["val_fraction"], tokenizer_sample_docs))
  counts = None
  if domains is None or min_tokens:
    counts = _cached_json(
        cache and os.path.join(cache, f"scan_{key}.json"), lambda: scan()["counts"])
  groups = domain_groups(
      counts and sorted(counts["values"]), domain_map=domain_map, domains=domains)
  sample_key = store.build_key(key=key, groups=groups, docs=tokenizer_sample_docs)
  voc = _vocabulary(vocabulary, vocab_size=vocab_size, output_dir=output_dir, key=sample_key,
                    sample=lambda: _sample(scan()["sample"], groups, tokenizer_sample_docs))
  if min_tokens:
    tokens = _cached_json(
        cache and
        os.path.join(cache, f"tokens_{sample_key}_{_short(vocab_lib.vocab_key(voc))}.json"),
        lambda: _token_counts(counts, scan, voc))
    groups = apply_min_tokens(groups, _domain_tokens(groups, tokens), min_tokens, name)
  check_domains(name, groups, counts)
  check_splits(groups, counts, split["val_fraction"])
  srcs = {
      d: corpus_files.source(layout, vals, text_field, on_malformed, val_fraction)
      for d, vals in groups.items()
  }
  dset = core.register_domain_set(
      name, srcs, vocabulary=voc, metadata={
          "data_files": corpus_files.as_list(data_files),
          "data_dir": data_dir,
          "domain_field": layout["domain_field"],
          "domain_values": {
              core.sanitize(d): v for d, v in groups.items()
          },
          "vocabulary": vocabulary
      })
  return dset.name


def register_from_gin(gin_files: Sequence[str], bindings: Sequence[str] = ()) -> str:
  """register_corpus() under a study's gin files and --gin bindings (e.g. for the store build
  on Dataflow before the study); returns the domain set's name."""
  from doremi_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config_lib.parse_gin(list(gin_files), list(bindings))
  return register_corpus()


# ----------------------------------------------------------------- the scan


def _scan(layout: dict, text_field: str, on_malformed: str, val_fraction: Optional[float],
          sample_docs: int) -> dict:
  """One pass over the training records: documents and UTF-8 bytes per domain value, and per
  value the `sample_docs` documents with the smallest hash (a deterministic sample that does
  not depend on file order)."""
  counts = {"values": {}, "missing": 0, "files": 0}
  heaps: dict[str, list] = {}
  field = layout["domain_field"]
  for fixed, files in layout["units"].items():
    for path in files:
      counts["files"] += 1
      for text, key in _records(path, layout, text_field, on_malformed):
        key = fixed if fixed is not None else key
        if key is None:
          counts["missing"] += 1
          continue
        raw = text.encode("utf-8", "replace")
        digest = hashlib.sha256(raw).digest()
        c = counts["values"].setdefault(key, {"documents": 0, "bytes": 0, "validation": 0})
        if val_fraction is not None and int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction:
          c["validation"] += 1  # a validation document (sources.in_validation)
          continue
        c["documents"] += 1
        c["bytes"] += len(raw)
        heap = heaps.setdefault(key, [])
        item = (-int.from_bytes(digest[8:16], "big"), text[:_SAMPLE_CHARS])
        if len(heap) < sample_docs:
          heapq.heappush(heap, item)
        elif item > heap[0]:
          heapq.heapreplace(heap, item)
  if counts["missing"]:
    logging.warning("corpus: %d records without the domain field %r were skipped.",
                    counts["missing"], field)
  sample = {k: [t for _, t in sorted(h, reverse=True)] for k, h in heaps.items()}
  return {"counts": counts, "sample": sample}


def _records(path: str, layout: dict, text_field: str, on_malformed: str):
  """(text, domain value) of a file; a top-level .txt of data_dir: one per paragraph."""
  if path in layout["paragraphs"]:
    return ((t, None) for t in sources.iter_text_file(path, whole_file=False))
  return sources.iter_records(path, text_field=text_field, domain_field=layout["domain_field"],
                              on_malformed=on_malformed)


def _sample(sample: Mapping[str, list], groups: Mapping[str, list], docs: int) -> list[str]:
  """The tokenizer's training text: per domain, its values' samples (at most `docs`)."""
  out = []
  for d in sorted(groups):
    texts = [t for v in groups[d] for t in sample.get(v, [])]
    out += texts[:docs] if len(groups[d]) == 1 else sorted(texts, key=_hash)[:docs]
  return out


def _hash(text: str) -> bytes:
  return hashlib.sha256(text.encode("utf-8", "replace")).digest()[8:16]


def _short(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def _token_counts(counts: Mapping[str, Any], scan: Callable[[], dict],
                  voc: seqio.Vocabulary) -> dict[str, int]:
  """Train tokens (with EOS) per domain value: exact for bytes; else the sample's tokens per
  byte times the value's bytes (exact when the sample holds the whole value)."""
  out = {}
  for v, c in counts["values"].items():
    if isinstance(voc, seqio.ByteVocabulary):
      out[v] = c["bytes"] + c["documents"]
      continue
    texts = scan()["sample"].get(v, [])
    tok = sum(len(t) for t in voc.encode_tf(tf.constant(texts)).to_list()) if texts else 0
    size = sum(len(t.encode("utf-8", "replace")) for t in texts)
    scale = c["bytes"] / size if size else 0.0
    out[v] = int(round(tok * scale)) + c["documents"]
  return out


# --------------------------------------------------------------- the domains


def domain_groups(values: Optional[Sequence[str]], *, domain_map: Optional[Mapping[str, str]],
                  domains: Optional[Sequence[str]]) -> dict[str, list[str]]:
  """{domain: [domain values]}: values found (None: not scanned, then `domains` names them),
  mapped by domain_map {value: domain}, selected by `domains` (names after mapping)."""
  mapping = {str(k): str(v) for k, v in (domain_map or {}).items()}
  if values is None:
    groups = {d: sorted(v for v, t in mapping.items() if t == d) or [d] for d in domains}
  else:
    unknown = sorted(set(mapping) - set(values))
    if unknown:
      raise ValueError(f"domain_map maps values that are not in the data: {unknown}; values "
                       f"found: {list(values)}.")
    groups = {}
    for v in values:
      groups.setdefault(mapping.get(v, v), []).append(v)
  if domains is not None:
    if isinstance(domains, str):
      domains = [domains]
    missing = [d for d in domains if d not in groups]
    if missing:
      raise ValueError(f"domains {missing} are not in the data (after domain_map); domains "
                       f"found: {sorted(groups)}.")
    unused = sorted(set(groups) - set(domains))
    if unused:
      logging.info("corpus: leaving out domains %s (not in `domains`).", unused)
    groups = {d: groups[d] for d in domains}
  return groups


def _domain_tokens(groups: Mapping[str, list], tokens: Mapping[str, int]) -> dict[str, int]:
  return {d: sum(tokens.get(v, 0) for v in vals) for d, vals in groups.items()}


def apply_min_tokens(groups: Mapping[str, list], tokens: Mapping[str, int], min_tokens: int,
                     name: str) -> dict[str, list]:
  """The domains with at least min_tokens train tokens; each one dropped is logged."""
  kept = {}
  for d, vals in groups.items():
    if tokens[d] < min_tokens:
      logging.warning("corpus %s: dropping domain %r: %d train tokens < min_tokens=%d.", name, d,
                      tokens[d], min_tokens)
    else:
      kept[d] = vals
  return kept


def check_domains(name: str, groups: Mapping[str, list], counts: Optional[Mapping[str,
                                                                                  Any]]) -> None:
  """At least two domains, with names distinct after sanitizing."""
  seen = {}
  for d in groups:
    try:
      s = core.sanitize(d)
    except ValueError as e:
      raise ValueError(f"{e} Map it to a name with domain_map={{{d!r}: 'name'}}.") from None
    if s in seen:
      raise ValueError(f"Domain names {seen[s]!r} and {d!r} both sanitize to {s!r} (SeqIO task "
                       f"names allow [a-z0-9_]); merge them with domain_map={{{d!r}: "
                       f"{seen[s]!r}}} or select one with `domains`.")
    seen[s] = d
  if len(groups) < 2:
    found = f"; domain values in the data: {sorted(counts['values'])}" if counts else ""
    raise ValueError(f"Corpus {name!r} has {len(groups)} domain(s) {sorted(groups)}: DoReMi "
                     f"reweights at least two{found}. Check domain_field, domains, domain_map "
                     "and min_tokens.")
  logging.info("corpus %s: domains %s", name, {d: v for d, v in groups.items()})


def check_splits(groups: Mapping[str, list], counts: Optional[Mapping[str, Any]],
                 val_fraction: Optional[float]) -> None:
  """Every domain has training documents and, split by hash, validation documents (scanned
  corpora only; otherwise the store build names an empty domain)."""
  if not counts:
    return
  for d, values in groups.items():
    found = [counts["values"].get(v, {}) for v in values]
    train = sum(c.get("documents", 0) for c in found)
    if not train:
      raise ValueError(f"Domain {d!r} has no training documents (all are validation ones).")
    if val_fraction is not None and not sum(c.get("validation", 0) for c in found):
      raise ValueError(f"Domain {d!r} has no validation document: none of its {train} documents "
                       f"falls in the hash split's val_fraction={val_fraction}. Raise "
                       "val_fraction, give validation_files, merge the domain into another "
                       "with domain_map, or drop it with min_tokens.")


# --------------------------------------------------------- tokenizer, caches


def _vocabulary(vocabulary: Optional[str], *, vocab_size: int, output_dir: Optional[str], key: str,
                sample: Callable[[], list]) -> seqio.Vocabulary:
  """'byte', a SentencePiece path, or 'train' (trained once on the sample, then reused)."""
  if vocabulary in (None, "byte"):
    return seqio.ByteVocabulary()
  if vocabulary != "train":
    return vocab_lib.get_vocabulary(vocabulary)
  if not output_dir:
    raise ValueError("vocabulary='train' keeps the trained tokenizer next to the outputs: set "
                     "register_corpus.output_dir (the pipeline gin files bind PIPELINE_DIR).")
  path = os.path.join(output_dir, "tokenizer", f"spm_{vocab_size}_{key}.model")

  def train():
    texts = sample()
    logging.info("corpus: training a %d-piece SentencePiece model on %d sampled documents -> %s",
                 vocab_size, len(texts), path)
    train_spm.train_from_texts(texts, vocab_size, path)
    return path

  _once(path, train)
  return vocab_lib.get_vocabulary(path)


def _process_index() -> int:
  jax = sys.modules.get("jax")  # the trainer has initialized it; data tools may not import it
  return jax.process_index() if jax is not None else 0


def _once(path: str, make: Callable[[], Any]) -> None:
  """Makes `path` (process 0), or waits for process 0 to make it (the other hosts)."""
  if store.exists(path):
    return
  if _process_index() == 0:
    store.makedirs(os.path.dirname(path))
    make()
    return
  deadline = time.time() + _WAIT_S
  while not store.exists(path):
    if time.time() > deadline:
      raise TimeoutError(f"Waited {_WAIT_S}s for process 0 to write {path}.")
    time.sleep(5)


def _cached_json(path: Optional[str], compute: Callable[[], Any]) -> Any:
  """compute()'s JSON value, kept at `path` (None: not kept) and read back on reruns."""
  if path is None:
    return compute()
  _once(path, lambda: store.write_atomic(path, json.dumps(compute(), sort_keys=True).encode()))
  with store.open_file(path, "rb") as f:
    return json.loads(f.read())
