"""Packed domain cache, deterministic per-host batches, resume, eval batches."""
import logging
import os

import numpy as np
import pytest

import data_pipelines
from data_pipelines import sources
from doremi_jax import data

L = 64
KEYS = {"inputs", "targets", "loss_mask", "segment_ids", "positions", "domain_ids"}


def _docs(prefix, n, size):
  rng = np.random.default_rng(len(prefix))
  return [f"{prefix} {i} " + "x" * int(rng.integers(1, size)) for i in range(n)]


DOMAINS = {"aa": _docs("aa", 40, 120), "bb": _docs("bb", 12, 60), "cc": _docs("cc", 25, 300)}


def _set(name, docs, val_docs=None):

  def make(d):
    val = val_docs[d] if val_docs is not None else d[:3]
    return sources.generator_source(lambda split: iter(d if split == "train" else val),
                                    fingerprint=str(hash((tuple(d), tuple(val)))))

  return data_pipelines.register_domain_set(name, {k: make(v) for k, v in docs.items()})


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
  _set("itr", DOMAINS)
  cache = str(tmp_path_factory.mktemp("packed"))
  p = data.PackedDomains.build("itr_natural", "train", L, cache_dir=cache)
  p.cache = cache
  return p


def test_pack_documents():
  out = data.pack_documents([np.array(
      [5, 6, 1]), np.array([7, 1]), np.array([8, 9, 10, 1])], [1, 2, 1], 4)
  np.testing.assert_array_equal(out["targets"], [[5, 6, 1, 7], [1, 8, 9, 10], [1, 0, 0, 0]])
  np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 2], [1, 2, 2, 2], [1, 0, 0, 0]])
  np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 0], [0, 0, 1, 2], [0, 0, 0, 0]])
  np.testing.assert_array_equal(out["inputs"], [[0, 5, 6, 0], [0, 0, 8, 9], [0, 0, 0, 0]])
  np.testing.assert_array_equal(out["domain_ids"], [[1, 1, 1, 2], [2, 1, 1, 1], [1, 0, 0, 0]])


def test_build_and_cache(packed):
  assert packed.names == ["aa", "bb", "cc"]
  for i, d in enumerate(packed.names):
    a = packed.arrays[d]
    assert a["targets"].shape == (packed.num_sequences[d], L)
    ids = a["domain_ids"][a["segment_ids"] > 0]
    assert (ids == i + 1).all()  # within-domain packing: one domain per row
    assert packed.num_tokens[d] == sum(len(t) + 1 for t in DOMAINS[d])
  assert packed.mixture_rates["cc"] > packed.mixture_rates["bb"]
  again = data.PackedDomains.build("itr_natural", "train", L, cache_dir=packed.cache)
  for d in packed.names:
    np.testing.assert_array_equal(again.arrays[d]["targets"], packed.arrays[d]["targets"])
  assert len(os.listdir(packed.cache)) == 1


def test_pack_across_domains(packed):
  mixed = data.PackedDomains.build("itr_uniform", "train", L, cache_dir=packed.cache,
                                   pack_across_domains=True)
  a = mixed.arrays[data.MIXED_POOL]
  seg, ids, tgt = a["segment_ids"], a["domain_ids"], a["targets"]
  assert ((seg > 0) == (ids > 0)).all()
  assert any(len(np.unique(r[r > 0])) > 1 for r in ids)
  # Each token's id matches its document's text prefix ("aa"/"bb"/"cc").
  for r in range(len(tgt)):
    for s in np.unique(seg[r][(seg[r] > 0) & (a["positions"][r] == 0)]):
      sel = seg[r] == s
      text = bytes((tgt[r][sel] - 3).clip(0, 255).astype(np.uint8))
      if text[:2] in (b"aa", b"bb", b"cc"):
        assert (ids[r][sel] == mixed.names.index(text[:2].decode()) + 1).all()
  batch = next(data.BatchIterator(mixed, global_batch_size=4, seed=0))
  assert set(batch) == KEYS


def test_batch_keys_and_semantics(packed):
  b = next(data.BatchIterator(packed, global_batch_size=6, seed=0))
  assert set(b) == KEYS
  assert all(v.shape == (6, L) for v in b.values())
  assert b["loss_mask"].dtype == np.float32 and b["targets"].dtype == np.int32
  np.testing.assert_array_equal(b["loss_mask"], b["segment_ids"] > 0)
  np.testing.assert_array_equal(b["domain_ids"] > 0, b["segment_ids"] > 0)
  nxt = b["positions"] > 0
  np.testing.assert_array_equal(b["inputs"][:, 1:][nxt[:, 1:]], b["targets"][:, :-1][nxt[:, 1:]])
  assert (b["inputs"][b["positions"] == 0] == 0).all()


def test_stratified(packed):
  it = data.BatchIterator(packed, global_batch_size=8, seed=1, sampling="stratified")
  extra = []
  for _ in range(6):
    b = next(it)
    first = b["domain_ids"][:, 0]
    counts = np.bincount(first, minlength=4)[1:]
    assert (counts >= 8 // 3).all() and counts.sum() == 8
    extra.append(tuple(np.nonzero(counts > 2)[0]))
  assert len(set(extra)) == 3  # the remainder rotates over domains


def test_mixture_and_explicit_weights(packed):
  it = data.BatchIterator(packed, global_batch_size=64, seed=0, sampling={"bb": 1.0})
  assert (next(it)["domain_ids"][:, 0] == 2).all()
  it = data.BatchIterator(packed, global_batch_size=64, seed=0)
  ids = np.concatenate([next(it)["domain_ids"][:, 0] for _ in range(10)])
  frac = np.bincount(ids, minlength=4)[1:] / len(ids)
  rates = np.array([packed.mixture_rates[d] for d in packed.names])
  assert np.abs(frac - rates).max() < 0.06
  with pytest.raises(ValueError, match="Unknown domains"):
    data.BatchIterator(packed, global_batch_size=4, seed=0, sampling={"zz": 1.0})


def _run(it, n):
  return [next(it) for _ in range(n)]


def test_determinism_and_resume(packed):
  kw = dict(global_batch_size=8, seed=3, sampling="uniform")
  full = _run(data.BatchIterator(packed, **kw), 12)
  again = _run(data.BatchIterator(packed, **kw), 12)
  it = data.BatchIterator(packed, **kw)
  _run(it, 5)
  state = {k: v.copy() for k, v in it.get_state().items()}
  assert set(state) == {"step", "draws"} and int(state["step"]) == 5
  resumed = data.BatchIterator(packed, **kw)
  resumed.set_state(state)
  tail = _run(resumed, 7)
  for x, y, z in zip(full, again, full[:5] + tail):
    for k in KEYS:
      np.testing.assert_array_equal(x[k], y[k])
      np.testing.assert_array_equal(x[k], z[k])
  other = next(data.BatchIterator(packed, global_batch_size=8, seed=4))
  assert not np.array_equal(other["targets"], full[0]["targets"])


def test_host_slices_concatenate_to_global(packed):
  kw = dict(global_batch_size=12, seed=5, sampling="stratified")
  glob = _run(data.BatchIterator(packed, **kw), 4)
  hosts = [
      _run(data.BatchIterator(packed, process_index=p, process_count=3, **kw), 4) for p in range(3)
  ]
  for s in range(4):
    for k in KEYS:
      np.testing.assert_array_equal(np.concatenate([h[s][k] for h in hosts]), glob[s][k])
  with pytest.raises(ValueError, match="not divisible by process_count=5"):
    data.BatchIterator(packed, global_batch_size=12, seed=0, process_count=5)


def test_no_repeats_within_a_pass(packed, caplog):
  n_bb = packed.num_sequences["bb"]
  it = data.BatchIterator(packed, global_batch_size=4, seed=0, sampling={"bb": 1.0})
  with caplog.at_level(logging.INFO):
    rows = np.concatenate([next(it)["targets"] for _ in range(n_bb // 4 + 1)])
  assert "domain bb: starting pass 2" in caplog.text
  first = {r.tobytes() for r in rows[:n_bb]}
  assert len(first) == n_bb
  ref = {r.tobytes() for r in packed.arrays["bb"]["targets"]}
  assert first == ref
  with caplog.at_level(logging.INFO):
    for _ in range(n_bb // 4 + 2):
      next(it)
  assert "domain bb: starting pass 3" in caplog.text


def test_eval_batches(packed):
  val = data.PackedDomains.build("itr_natural", "validation", L, cache_dir=packed.cache)
  total = sum(val.num_sequences.values())
  batches = list(data.eval_batches(val, 4))
  assert len(batches) == -(-total // 4)
  rows = np.concatenate([b["targets"] for b in batches])
  ids = np.concatenate([b["domain_ids"] for b in batches])
  assert (rows[total:] == 0).all() and (ids[total:] == 0).all()
  expect = np.concatenate([val.arrays[d]["targets"] for d in val.names])
  np.testing.assert_array_equal(rows[:total], expect)
  hosts = [list(data.eval_batches(val, 4, p, 2)) for p in range(2)]
  for s, b in enumerate(batches):
    np.testing.assert_array_equal(
        np.concatenate([hosts[0][s]["targets"], hosts[1][s]["targets"]]), b["targets"])


def test_errors(tmp_path):
  _set("itr_empty", {"full": ["some text"], "void": []})
  with pytest.raises(ValueError, match="'void' has no documents"):
    data.PackedDomains.build("itr_empty_uniform", "train", L, cache_dir=str(tmp_path))
  data_pipelines.register_domain_set(
      "itr_noval3", {
          "a": sources.generator_source(lambda s: iter(["x"] if s == "train" else [])),
          "b": sources.generator_source(lambda s: iter(["y"]))
      })
  with pytest.raises(ValueError, match="'a' has no documents in split "
                     "'validation'"):
    data.PackedDomains.build("itr_noval3_uniform", "validation", L, cache_dir=str(tmp_path))
