"""Deterministic, per-host, resumable training input over SeqIO domains.

Where rows come from (`open_domains`): the token store (doremi_jax/store.py), built once
per (domain set, vocabulary, sources, L) by an Apache Beam job
(data_pipelines/build_store.py) and read by random access, so host memory is bounded by
the store's index; or, with pack_across_domains, the in-memory PackedDomains cache (rows
mix domains; natural mixtures of small corpora only). Packing concatenates a domain's
documents and cuts the stream into rows of L tokens; documents are segments (segment_ids
1.., positions restart at 0), and a document cut by a row end continues as a new segment
of the next row. No token is dropped; only the last row is padded.

BatchIterator is a counter-based sampler: the global batch at step s is a
pure function of (seed, s, per-domain draw counters). Every host computes the
same global domain assignment and materializes only its rows, so a batch's
domain composition never depends on the number of hosts. The n-th draw
from domain d is perm(seed, d, n // N_d)(n % N_d), a counter-based
permutation (permute.py: no per-row state), so no sequence
repeats within a pass over a domain.
"""
import hashlib
import io
import logging
import os
import uuid
from typing import Iterator, Mapping, Optional, Union

import numpy as np

from doremi_jax import permute
from doremi_jax import store

FEATURES = store.FEATURES
MIXED_POOL = "__mixed__"


def domain_names(mixture_or_task_name: str) -> list[str]:
  """Domains in domain-id order (id = index + 1); see data_pipelines.core."""
  from data_pipelines import core  # pylint: disable=g-import-not-at-top
  return core.domain_names(mixture_or_task_name)


def default_cache_dir() -> str:
  root = os.environ.get("DOREMI_JAX_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "doremi_jax")
  return os.path.join(root, "packed")


def pack_documents(docs_tokens: list[np.ndarray], docs_domains: list[int],
                   length: int) -> dict[str, np.ndarray]:
  """Packs token lists into rows [N, length] (see the module docstring)."""
  if not docs_tokens:
    return {k: np.zeros((0, length), np.int32) for k in FEATURES}
  lens = np.array([len(t) for t in docs_tokens], np.int64)
  stream = np.concatenate(docs_tokens).astype(np.int32)
  doc = np.repeat(np.arange(len(lens)), lens)
  dom = np.repeat(np.asarray(docs_domains, np.int32), lens)
  total = len(stream)
  n = -(-total // length)
  pad = n * length - total
  targets = np.pad(stream, (0, pad)).reshape(n, length)
  doc = np.pad(doc, (0, pad), constant_values=-1).reshape(n, length)
  domain_ids = np.pad(dom, (0, pad)).reshape(n, length)
  segment_ids = _segment_ids(doc)
  return store.row_features(targets, segment_ids, np.where(segment_ids > 0, domain_ids, 0))


def _segment_ids(doc_NxL: np.ndarray) -> np.ndarray:
  """1.. per document within each row (a row's first token starts a segment), 0 on padding."""
  valid = doc_NxL >= 0
  change = np.ones_like(valid)
  change[:, 1:] = doc_NxL[:, 1:] != doc_NxL[:, :-1]
  return np.where(valid, np.cumsum(change, axis=1), 0).astype(np.int32)


def _source_fingerprint(task) -> str:
  fp = getattr(task.source, "fingerprint", None)
  if callable(fp):
    fp = fp()
  return str(fp) if fp is not None else repr(task.source)


def _read_npz(path: str) -> dict[str, np.ndarray]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with tf.io.gfile.GFile(path, "rb") as f:
    data = np.load(io.BytesIO(f.read()))
    return {k: data[k] for k in data.files}


def _write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  tf.io.gfile.makedirs(os.path.dirname(path))
  tmp = f"{path}.tmp{uuid.uuid4().hex}"  # hosts sharing a gs:// cache may have equal pids
  with tf.io.gfile.GFile(tmp, "wb") as f:
    f.write(buf.getvalue())
  tf.io.gfile.rename(tmp, path, overwrite=True)


def _tokenized_documents(tasks, split: str) -> dict[str, tuple[list, int]]:
  """{domain: (token arrays of its non-empty documents, domain id)} through the tasks."""
  docs = {}
  for i, (dom, task) in enumerate(tasks):
    if split not in task.source.splits:
      raise ValueError(f"Domain {dom!r} has no {split!r} split (splits: "
                       f"{list(task.source.splits)}); add one to its source.")
    ds = task.get_dataset(None, split=split, shuffle=False)
    toks = [ex["targets"] for ex in ds.as_numpy_iterator() if len(ex["targets"])]
    if not toks:
      hint = (" Add documents or raise the validation fraction."
              if split != "train" else " Check its files / source.")
      raise ValueError(f"Domain {dom!r} has no documents in split "
                       f"{split!r}.{hint}")
    docs[dom] = (toks, i + 1)
  return docs


class PackedDomains:
  """Per-domain packed sequences; every feature has shape [N_d, L].

  Attributes:
    names: domains in domain-id order.
    arrays: pool -> feature -> array. Pools are the domains, or the single
      pool "__mixed__" with pack_across_domains=True.
    num_sequences / num_tokens: per pool (non-padding tokens).
    mixture_rates: {domain: rate} of the mixture, if built from one.
  """

  def __init__(self, names, arrays, *, mixture_rates=None, split="train", sequence_length=None):
    self.names = list(names)
    self.arrays = arrays
    self.mixture_rates = mixture_rates
    self.split = split
    self.sequence_length = int(sequence_length or next(iter(arrays.values()))["targets"].shape[1])
    self.num_sequences = {k: int(v["targets"].shape[0]) for k, v in arrays.items()}
    self.num_tokens = {k: int((v["segment_ids"] > 0).sum()) for k, v in arrays.items()}

  @property
  def mixed(self) -> bool:
    return MIXED_POOL in self.arrays

  @property
  def pools(self) -> list[str]:
    return list(self.arrays)

  def close(self) -> None:
    """Nothing to close (arrays in memory); as StoreDomains.close."""

  def rows(self, pool: str, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Rows `idx` of a pool: every feature of FEATURES as [len(idx), L] int32."""
    return {k: self.arrays[pool][k][idx] for k in FEATURES}

  @classmethod
  def build(cls, mixture_or_task_name: str, split: str, sequence_length: int, *,
            cache_dir: Optional[str] = None, pack_across_domains: bool = False,
            seed: int = 0) -> "PackedDomains":
    """Tokenizes and packs every domain of the mixture's set (cached).

    Args:
      mixture_or_task_name: a data_pipelines mixture, task or domain set.
      split: e.g. "train" or "validation".
      sequence_length: L.
      cache_dir: local or gs:// directory; default
        $DOREMI_JAX_DATA_DIR/packed or ~/.cache/doremi_jax/packed.
      pack_across_domains: pack documents of all domains (interleaved in a
        seeded order) into shared rows; per-token domain_ids stay exact.
      seed: order of documents when packing across domains.
    """
    from data_pipelines import core  # pylint: disable=g-import-not-at-top
    from data_pipelines.vocab import vocab_key  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    dset = core.get_domain_set(mixture_or_task_name)
    tasks = dset.tasks()
    key = hashlib.sha256(
        repr((
            dset.name,
            split,
            int(sequence_length),
            vocab_key(dset.vocabulary),
            [(d, _source_fingerprint(t)) for d, t in tasks],
            pack_across_domains,
            seed if pack_across_domains else 0,
        )).encode()).hexdigest()[:16]
    base = os.path.join(cache_dir or default_cache_dir(),
                        f"{dset.name}_{split}_L{sequence_length}_{key}")
    pools = [MIXED_POOL] if pack_across_domains else dset.domains
    paths = {p: os.path.join(base, f"{p}.npz") for p in pools}
    if all(tf.io.gfile.exists(p) for p in paths.values()):
      arrays = {p: _read_npz(path) for p, path in paths.items()}
      return cls._with_rates(dset, mixture_or_task_name, arrays, split, sequence_length)
    docs = _tokenized_documents(tasks, split)
    if pack_across_domains:
      order = [(d, j) for d in dset.domains for j in range(len(docs[d][0]))]
      perm = np.random.default_rng(seed).permutation(len(order))
      order = [order[k] for k in perm]
      arrays = {
          MIXED_POOL:
              pack_documents([docs[d][0][j] for d, j in order], [docs[d][1] for d, _ in order],
                             sequence_length)
      }
    else:
      arrays = {d: pack_documents(t, [i] * len(t), sequence_length) for d, (t, i) in docs.items()}
    for pool, path in paths.items():
      _write_npz(path, arrays[pool])
    logging.info("Packed %s/%s at L=%d into %s", dset.name, split, sequence_length, base)
    return cls._with_rates(dset, mixture_or_task_name, arrays, split, sequence_length)

  @classmethod
  def _with_rates(cls, dset, mixture_or_task_name, arrays, split,
                  sequence_length) -> "PackedDomains":
    from data_pipelines import core  # pylint: disable=g-import-not-at-top
    packed = cls(dset.domains, arrays, split=split, sequence_length=sequence_length)
    # Lazily counted natural rates resolve to this split's packed token counts.
    counts = packed.num_tokens if split == "train" and not packed.mixed else None
    packed.mixture_rates = core.mixture_rates(mixture_or_task_name, natural_counts=counts)
    return packed


class FirstRows:
  """The first n rows of every pool of packed domains (a fixed evaluation subset)."""

  def __init__(self, packed, n: int):
    self._packed = packed
    self.names, self.pools, self.mixed = packed.names, packed.pools, packed.mixed
    self.split, self.sequence_length = packed.split, packed.sequence_length
    self.mixture_rates = packed.mixture_rates
    self.num_sequences = {p: min(int(n), packed.num_sequences[p]) for p in self.pools}

  def close(self) -> None:
    getattr(self._packed, "close", lambda: None)()

  def rows(self, pool: str, idx: np.ndarray) -> dict[str, np.ndarray]:
    if len(idx) and int(np.max(idx)) >= self.num_sequences[pool]:
      raise IndexError(f"row {int(np.max(idx))} of {pool!r} is past the first "
                       f"{self.num_sequences[pool]}.")
    return self._packed.rows(pool, idx)


def _finish(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  batch["loss_mask"] = (batch["segment_ids"] > 0).astype(np.float32)
  return batch


def _fixed_probs(sampling, mixture_rates, pools) -> np.ndarray:
  """Normalized probabilities in pool order of sampling="mixture" or {domain: weight}."""
  if sampling == "mixture":
    w = mixture_rates
    if w is None:
      raise ValueError("sampling='mixture' needs mixture_rates.")
  elif isinstance(sampling, Mapping):
    w = sampling
  else:
    raise ValueError(f"Unknown sampling {sampling!r}: use 'mixture', "
                     "'uniform', 'stratified' or a {domain: weight} dict.")
  unknown = sorted(set(w) - set(pools))
  if unknown:
    raise ValueError(f"Unknown domains {unknown} in sampling weights; "
                     f"known: {pools}.")
  p = np.array([float(w.get(d, 0.0)) for d in pools])
  if (p < 0).any() or p.sum() <= 0:
    raise ValueError(f"Sampling weights must be >= 0 with a positive "
                     f"sum, got {dict(w)}.")
  return p / p.sum()


class BatchIterator:
  """Global batches of packed sequences; this host's rows only.

  sampling: "mixture" (mixture_rates, default packed.mixture_rates), "uniform"
  (iid uniform over domains), "stratified" (each domain B//K rows, the
  remainder B%K rotating with the step), an explicit {domain: weight}, or weights that
  change with the step: any object with probs(step) -> [K] probabilities in pool order
  (a resolved schedule.MixtureSchedule, or OnlineWeights fed by the train loop). Rows are
  drawn iid from the weights in force at the step in every case but stratified.
  """

  def __init__(self, packed: PackedDomains, *, global_batch_size: int, seed: int,
               sampling: Union[str, Mapping[str, float]] = "mixture",
               mixture_rates: Optional[Mapping[str, float]] = None, process_index: int = 0,
               process_count: int = 1):
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                       f"process_count={process_count}; choose a multiple of it.")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} not in "
                       f"[0, {process_count}).")
    self.packed = packed
    self.domain_names = list(packed.names)
    self.global_batch_size = global_batch_size
    self.seed = int(seed)
    self.process_index = process_index
    self.process_count = process_count
    self.pools = packed.pools
    for pool in self.pools:
      if packed.num_sequences[pool] == 0:
        raise ValueError(f"Domain {pool!r} has no sequences; add documents "
                         "or remove the domain from the set.")
    k = len(self.pools)
    self.sampling = sampling if isinstance(sampling, str) else "weights"
    self.schedule = None
    if hasattr(sampling, "probs"):
      self.sampling, self.schedule, self.probs = "scheduled", sampling, None
      if packed.mixed:
        raise ValueError("Weights that change during a run need sequences packed within a "
                         "domain: set pack_across_domains=False.")
    elif packed.mixed:
      # Rows mix domains in their natural proportions: no per-domain sampling is possible.
      if sampling != "mixture" or mixture_rates is not None:
        raise ValueError(
            f"sampling={sampling!r} needs sequences packed within a domain: with "
            "pack_across_domains=True, batches follow natural token proportions only. Set "
            "pack_across_domains=False for DoReMi (proxy) runs and weighted mixtures.")
      self.sampling, self.probs = "mixed", np.ones(1)
    elif sampling == "stratified":
      self.probs = None
    elif sampling == "uniform":
      self.probs = np.full(k, 1.0 / k)
    else:
      self.probs = _fixed_probs(sampling, mixture_rates or packed.mixture_rates, self.pools)
    self._length = packed.sequence_length
    self._step = 0
    self._draws = np.zeros(k, np.int64)

  # ----------------------------------------------------------------- state

  def get_state(self) -> dict[str, np.ndarray]:
    return {"step": np.array(self._step, np.int64), "draws": self._draws.copy()}

  def set_state(self, state: Mapping[str, np.ndarray]) -> None:
    draws = np.asarray(state["draws"], np.int64)
    if draws.shape != self._draws.shape:
      raise ValueError(f"Input state has {draws.shape[0]} domains, this "
                       f"iterator {self._draws.shape[0]}.")
    self._step = int(np.asarray(state["step"]))
    self._draws = draws.copy()

  # -------------------------------------------------------------- sampling

  def _assignment(self, step: int) -> np.ndarray:
    """Pool index of each global row at `step` (same on every host)."""
    b, k = self.global_batch_size, len(self.pools)
    rng = np.random.default_rng([self.seed, step, 0x5EED])
    if self.sampling == "stratified":
      counts = np.full(k, b // k)
      r = b % k
      counts[(step * r + np.arange(r)) % k] += 1
      assign = np.repeat(np.arange(k), counts)
      return assign[rng.permutation(b)]
    return rng.choice(k, size=b, p=self.weights_at(step))

  def follow(self, source) -> None:
    """From now on, draw every step from source.probs(step) (OnlineWeights)."""
    if self.packed.mixed or self.sampling == "stratified":
      raise ValueError(f"sampling={self.sampling!r} cannot follow online weights: start an "
                       f"online run from 'mixture', 'uniform' or a {{domain: weight}} dict.")
    self.sampling, self.schedule = "scheduled", source

  def weights_at(self, step: int) -> np.ndarray:
    """The sampling probabilities in force at `step`, in pool order (stratified: the
    expected fractions)."""
    if self.schedule is not None:
      return self.schedule.probs(step)
    if self.probs is None:  # stratified
      return np.full(len(self.pools), 1.0 / len(self.pools))
    return self.probs

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    assign = self._assignment(self._step)
    b_host = self.global_batch_size // self.process_count
    lo, hi = self.process_index * b_host, (self.process_index + 1) * b_host
    # Draw number of every global row: per-domain running counters.
    draw = np.empty_like(assign, dtype=np.int64)
    for d in np.unique(assign):
      rows = np.nonzero(assign == d)[0]
      draw[rows] = self._draws[d] + np.arange(len(rows))
      n = self.packed.num_sequences[self.pools[d]]
      first, last = self._draws[d] // n, (self._draws[d] + len(rows)) // n
      for epoch in range(first + 1, last + 1):
        if epoch * n < self._draws[d] + len(rows):
          logging.info("domain %s: starting pass %d", self.pools[d], epoch + 1)
      self._draws[d] += len(rows)
    out = {k: np.empty((b_host, self._length), np.int32) for k in FEATURES}
    host_assign, host_draw = assign[lo:hi], draw[lo:hi]
    for d in np.unique(host_assign):
      rows = np.nonzero(host_assign == d)[0]
      n = self.packed.num_sequences[self.pools[d]]
      draws = host_draw[rows]
      idx = np.empty(len(rows), np.int64)
      for epoch in np.unique(draws // n):
        sel = draws // n == epoch
        key = permute.permutation_key(self.seed, d, int(epoch), 0xD0E)
        idx[sel] = permute.permute(draws[sel] % n, n, key)
      got = self.packed.rows(self.pools[d], idx)
      for k in FEATURES:
        out[k][rows] = got[k]
    self._step += 1
    return _finish(out)


class OnlineWeights:
  """Sampling weights that the train loop learns as it goes (mixing.py): step -> [K].

  The loop sets each step's weights before its batch is drawn (one step late, from the
  metrics it reads); drawing a step whose weights were not set is an error, never a guess.
  """

  def __init__(self, num_domains: int):
    self.num_domains = num_domains
    self._by_step = {}

  def set(self, step: int, weights_K) -> None:
    w = np.asarray(weights_K, np.float64)
    if (w.shape != (self.num_domains,) or not np.all(np.isfinite(w)) or w.min() < 0 or
        w.sum() <= 0):
      raise ValueError(f"online weights for step {step} are not {self.num_domains} finite "
                       f"non-negative numbers: {w}")
    self._by_step[int(step)] = w / w.sum()
    for old in [s for s in self._by_step if s < step - 2]:
      del self._by_step[old]

  def probs(self, step: int) -> np.ndarray:
    if step not in self._by_step:
      raise RuntimeError(f"online sampling weights for step {step} are not known yet (known: "
                         f"{sorted(self._by_step)}); the loop sets them from the state.")
    return self._by_step[step]


def eval_batches(packed_validation: PackedDomains, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Fixed batches covering every sequence of every domain exactly once.

  Rows are in domain-id order; the last global batch is padded with all-zero
  rows (loss_mask 0, domain_ids 0). Yields this host's slice of each batch.
  """
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} is not divisible by "
                     f"process_count={process_count}.")
  pools = packed_validation.pools
  total = sum(packed_validation.num_sequences[p] for p in pools)
  if total == 0:
    raise ValueError("No validation sequences in any domain.")
  b_host = batch_size // process_count
  locs = [(p, i) for p in pools for i in range(packed_validation.num_sequences[p])]
  length = packed_validation.sequence_length
  for start in range(0, total, batch_size):
    rows = locs[start + process_index * b_host:min(start + (process_index + 1) * b_host, start +
                                                   batch_size)]
    out = {k: np.zeros((b_host, length), np.int32) for k in FEATURES}
    for pool in dict.fromkeys(p for p, _ in rows):
      js = [j for j, (p, _) in enumerate(rows) if p == pool]
      got = packed_validation.rows(pool, np.array([rows[j][1] for j in js], np.int64))
      for k in FEATURES:
        out[k][js] = got[k]
    yield _finish(out)
