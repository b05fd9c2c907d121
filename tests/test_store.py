"""The Beam-built ArrayRecord token store and its train-time reader.

Small corpora made here; real Beam (FnApiRunner, in-process and two worker
processes) and real ArrayRecord files.
"""
import hashlib
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import data_pipelines
from data_pipelines import build_store
from data_pipelines import custom
from data_pipelines import sources
from doremi_jax import data
from doremi_jax import store

L = 32
DOMAINS = ("web", "code", "books", "math")
KEYS = ("inputs", "targets", "segment_ids", "positions", "domain_ids", "loss_mask")


def _corpus(write, root, n_files=3, per_file=60, seed=0):
  """Files of JSONL lines with meta.src in DOMAINS; returns (paths, lines)."""
  rng = np.random.default_rng(seed)
  paths, lines = [], 0
  for f in range(n_files):
    rows = []
    for i in range(per_file):
      dom = DOMAINS[rng.integers(len(DOMAINS))]
      text = f"{dom} {f}.{i} " + "é x" * int(rng.integers(1, 40 + 20 * f))
      rows.append(json.dumps({"text": text, "meta": {"src": dom}}))
    rows.insert(5, "")  # a blank line: read (counted), not a document
    path = os.path.join(root, f"part-{f:02d}.jsonl")
    write(path, "\n".join(rows) + "\n")
    paths.append(path)
    lines += len(rows)
  return paths, lines


def _write_local(path, text):
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def _write_gfile(path, text):
  tf.io.gfile.makedirs(os.path.dirname(path))
  with tf.io.gfile.GFile(path, "w") as f:
    f.write(text)


def _register(name, paths, **kwargs):
  return custom.register_jsonl_domains(name=name, paths=paths, domain_field="meta.src",
                                       domains=list(DOMAINS), val_fraction=0.2, **kwargs)


def _digest(store_dir, split="train"):
  """Hashes of the published build's files (its shards and own manifest): equal for builds
  of the same inputs, whatever their build ids."""
  with tf.io.gfile.GFile(os.path.join(store_dir, split, store.MANIFEST), "rb") as f:
    root = os.path.join(store_dir, split, json.load(f)["build"])
  out = {}
  for d, _, files in tf.io.gfile.walk(root):
    for name in files:
      with tf.io.gfile.GFile(os.path.join(d, name), "rb") as fh:
        out[os.path.relpath(os.path.join(d, name), root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("store")
  os.makedirs(root / "raw")
  paths, lines = _corpus(_write_local, str(root / "raw"))
  _register("sto", paths)
  store_dir = str(root / "store1")
  manifest = build_store.build_store("sto", "train", L, store_dir, rows_per_shard=5)
  val = build_store.build_store("sto", "validation", L, store_dir)
  packed = data.PackedDomains.build("sto_uniform", "train", L, cache_dir=str(root / "packed"))
  return {
      "root": root,
      "paths": paths,
      "lines": lines,
      "dir": store_dir,
      "manifest": manifest,
      "val": val,
      "packed": packed
  }


def _assert_same_rows(a, b):
  assert a.names == b.names and a.num_sequences == b.num_sequences
  assert a.num_tokens == b.num_tokens
  for d in a.names:
    idx = np.arange(a.num_sequences[d])
    ra, rb = a.rows(d, idx), b.rows(d, idx)
    for k in store.FEATURES:
      np.testing.assert_array_equal(ra[k], rb[k], err_msg=f"{d} {k}")


def test_rows_equal_packed_domains(built, tmp_path):
  st = store.StoreDomains.open(built["dir"], domain_set="sto", vocabulary_key="byte:0",
                               sequence_length=L)
  _assert_same_rows(built["packed"], st)
  assert any(len(s["shards"]) > 1 for s in st.manifest["per_domain"].values())
  val = data.PackedDomains.build("sto_uniform", "validation", L, cache_dir=str(tmp_path))
  _assert_same_rows(val, store.StoreDomains.open(built["dir"], split="validation"))


def test_open_store_like_packed_domains(built):
  st = build_store.open_store("sto_natural", "train", L, store_dir=built["dir"])
  assert "counters" not in st.manifest  # reused, not rebuilt
  assert st.mixture_rates == data_pipelines.mixture_rates("sto_natural")
  want = np.array([built["packed"].num_tokens[d] for d in st.names], float)
  np.testing.assert_allclose(list(st.mixture_rates.values()), want / want.sum())


def test_every_raw_line_read_once(built):
  assert built["manifest"]["counters"]["raw_lines"] == built["lines"]
  assert built["manifest"]["raw_lines"] == built["lines"]
  assert built["manifest"]["raw_files"] == len(built["paths"])


def test_identical_bytes_with_two_workers(built):
  two = str(built["root"] / "store2")
  m = build_store.build_store("sto", "train", L, two, rows_per_shard=5, num_workers=2)
  assert m["counters"]["raw_lines"] == built["lines"]
  one = _digest(built["dir"])
  assert one == _digest(two) and len(one) > 8


def test_reuse_and_rerun(built, tmp_path):
  again = build_store.build_store("sto", "train", L, built["dir"], rows_per_shard=5)
  assert "counters" not in again  # reused: no work
  assert "counters" not in build_store.build_store("sto", "train", L, built["dir"],
                                                   rows_per_shard=9)  # same rows
  with pytest.raises(build_store.StoreBuildError, match="sequence_length"):
    build_store.build_store("sto", "train", 2 * L, built["dir"])
  d = str(tmp_path / "s")
  build_store.build_store("sto", "train", L, d, rows_per_shard=5)
  os.remove(os.path.join(d, "train", store.MANIFEST))  # "interrupted"
  with pytest.raises(store.IncompleteStoreError,
                     match="build_store --domain_set=sto --split=train"):
    store.StoreDomains.open(d, domain_set="sto", sequence_length=L)
  m = build_store.build_store("sto", "train", L, d, rows_per_shard=5)
  assert m["counters"]["raw_lines"] == built["lines"]
  assert _digest(d) == _digest(built["dir"])


def test_refuses_other_vocabulary_or_length(built):
  with pytest.raises(store.StoreMismatchError, match="sequence_length=32.*64"):
    store.StoreDomains.open(built["dir"], sequence_length=64)
  with pytest.raises(store.StoreMismatchError, match="byte:0.*spm:/x.model"):
    store.StoreDomains.open(built["dir"], vocabulary_key="spm:/x.model")


def _batches(packed, steps, *, change_at=(), **kwargs):
  it = data.BatchIterator(packed, **kwargs)
  out = []
  for step in range(steps):
    if step in change_at:  # a new weight vector (e.g. a new DoReMi round)
      p = np.random.default_rng(step).dirichlet(np.ones(len(packed.names)))
      it.probs = p
    out.append(next(it))
  return out


@pytest.mark.parametrize("sampling",
                         ["stratified", {
                             "web": 0.1,
                             "code": 0.5,
                             "books": 0.3,
                             "math": 0.1
                         }])
def test_batch_iterator_same_as_packed(built, sampling):
  st = store.StoreDomains.open(built["dir"])
  kw = dict(global_batch_size=12, seed=3, sampling=sampling)
  for a, b in zip(_batches(built["packed"], 40, **kw), _batches(st, 40, **kw)):
    for k in KEYS:
      np.testing.assert_array_equal(a[k], b[k])


def test_host_slices_concatenate_to_global_batch(built):
  st = store.StoreDomains.open(built["dir"])
  kw = dict(global_batch_size=8, seed=5, sampling={d: 1.0 for d in DOMAINS}, change_at=(300, 700))
  whole = _batches(st, 1000, **kw)
  for count in (2, 4):
    hosts = [_batches(st, 1000, process_index=i, process_count=count, **kw) for i in range(count)]
    for step, batch in enumerate(whole):
      for k in ("targets", "segment_ids", "domain_ids"):
        np.testing.assert_array_equal(batch[k], np.concatenate([h[step][k] for h in hosts]))


def test_stratified_batches_balanced(built):
  st = store.StoreDomains.open(built["dir"])
  b, k = 14, len(DOMAINS)
  for batch in _batches(st, 50, global_batch_size=b, seed=1, sampling="stratified"):
    counts = np.bincount(batch["domain_ids"][:, 0], minlength=k + 1)[1:]
    assert set(counts) <= {b // k, b // k + 1} and counts.sum() == b


def test_ram_filesystem(built):
  paths, lines = _corpus(_write_gfile, "ram://raw_store_test")
  _register("storam", paths)
  m = build_store.build_store("storam", "train", L, "ram://store_test", rows_per_shard=5)
  assert m["counters"]["raw_lines"] == lines == built["lines"]
  st = store.StoreDomains.open("ram://store_test", domain_set="storam")
  local = store.StoreDomains.open(built["dir"])
  assert st.num_sequences == local.num_sequences
  for d in DOMAINS:
    idx = np.arange(st.num_sequences[d])
    np.testing.assert_array_equal(st.rows(d, idx)["targets"], local.rows(d, idx)["targets"])


def test_task_fallback_for_sources_without_raw_files(tmp_path):
  docs = {
      "aa": [f"aa {i} " + "z" * i for i in range(30)],
      "bb": [f"bb {i} " * (i % 7 + 1) for i in range(20)]
  }
  srcs = {
      d: sources.generator_source(lambda split, t=t: iter(t), fingerprint=d)
      for d, t in docs.items()
  }
  data_pipelines.register_domain_set("stofb", srcs)
  m = build_store.build_store("stofb", "train", L, str(tmp_path / "s"))
  assert m["counters"]["documents"] == 50
  _assert_same_rows(
      data.PackedDomains.build("stofb_uniform", "train", L, cache_dir=str(tmp_path / "p")),
      store.StoreDomains.open(str(tmp_path / "s")))


# ---------------------------------------------------------------- bad input


def test_malformed_line_names_path_and_line(tmp_path):
  paths, _ = _corpus(_write_local, str(tmp_path), n_files=2, per_file=10)
  with open(paths[1], "a", encoding="utf-8") as f:
    f.write('{"text": "ok", "meta": {"src": "web"}}\n{"no_text": 1}\n')
  _register("stobad", paths)
  with pytest.raises(build_store.StoreBuildError, match=f"{paths[1]}:13: malformed JSONL line"):
    build_store.build_store("stobad", "train", L, str(tmp_path / "s"))
  assert not os.path.exists(tmp_path / "s" / "train" / store.MANIFEST)
  _register("stobad", paths, on_malformed="skip")
  m = build_store.build_store("stobad", "train", L, str(tmp_path / "s"))
  assert m["counters"]["malformed_lines_skipped"] == 1
  assert m["malformed_lines_skipped"] == 1


def test_domain_without_records_names_domains_found(tmp_path):
  paths, _ = _corpus(_write_local, str(tmp_path), n_files=1, per_file=20)
  custom.register_jsonl_domains(name="stoempty", paths=paths, domain_field="meta.src",
                                domains=list(DOMAINS) + ["legal"])
  with pytest.raises(build_store.StoreBuildError,
                     match=r"\['legal'\] have no records.*found.*'books'"):
    build_store.build_store("stoempty", "train", L, str(tmp_path / "s"))


def test_missing_raw_file_named(tmp_path):
  paths, _ = _corpus(_write_local, str(tmp_path), n_files=2, per_file=5)
  _register("stomissing", paths)
  os.remove(paths[0])
  with pytest.raises(FileNotFoundError, match=paths[0]):
    build_store.build_store("stomissing", "train", L, str(tmp_path / "s"))


def test_unreadable_raw_path_named(tmp_path):
  paths, _ = _corpus(_write_local, str(tmp_path), n_files=2, per_file=5)
  _register("stounread", paths)
  os.remove(paths[1])
  os.makedirs(paths[1])  # exists, but cannot be read as a file
  with pytest.raises(build_store.StoreBuildError, match=f"Cannot read raw file {paths[1]}"):
    build_store.build_store("stounread", "train", L, str(tmp_path / "s"))


def test_sentencepiece_rows_equal_packed_domains(built, tmp_path):
  import io  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  texts = [
      json.loads(line)["text"]
      for p in built["paths"]
      for line in open(p, encoding="utf-8")
      if line.strip()
  ]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=120, pad_id=0, eos_id=1,
      unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
  (tmp_path / "t.model").write_bytes(model.getvalue())
  voc = seqio.SentencePieceVocabulary(str(tmp_path / "t.model"))
  _register("stospm", built["paths"], vocabulary=voc)
  m = build_store.build_store("stospm", "train", L, str(tmp_path / "s"))
  assert m["vocabulary_key"].startswith("spm:")
  _assert_same_rows(
      data.PackedDomains.build("stospm_uniform", "train", L, cache_dir=str(tmp_path / "p")),
      store.StoreDomains.open(str(tmp_path / "s"), vocabulary_key=m["vocabulary_key"]))
