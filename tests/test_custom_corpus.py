"""A user's own corpus from gin alone (data_pipelines.corpus): JSONL, JSONL.zst and Parquet
files written here, local and on TF's ram:// filesystem (a stand-in for gs://), through the
one-pass store build and the one-command pipeline."""
import gzip
import io
import json
import logging
import os
import sys

import gin
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import seqio
import tensorflow as tf
import zstandard

from data_pipelines import build_store
from data_pipelines import core
from data_pipelines import corpus
from data_pipelines import sources
from data_pipelines import train_spm
from doremi_jax import config as config_lib
from doremi_jax import store
from doremi_jax import store_raw
from tests import helpers

L = 32
TEXTS = {
    "Web-Text": "the web page says hello ",
    "code": "def f(x):\n  return x + 1\n",
    "Books": "Once upon a time, ",
    "Novels": "It was a dark night. ",
    "tiny": "t"
}


def _rows(n=120, domains=("Web-Text", "code", "Books"), seed=0):
  rng = np.random.default_rng(seed)
  return [{
      "text":
          f"{i} " + TEXTS.get(domains[i % len(domains)], "words ") * int(rng.integers(1, 9)) + "é",
      "meta": {
          "source": domains[i % len(domains)]
      },
      "id":
          i
  } for i in range(n)]


def _write(path, rows):
  """rows as .jsonl / .jsonl.zst / .jsonl.gz / .parquet (small row groups), any gfile path."""
  path = str(path)
  if path.endswith(".parquet"):
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=16)
    data = buf.getvalue()
  else:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if path.endswith(".zst"):
      data = zstandard.ZstdCompressor().compress(data)
    elif path.endswith(".gz"):
      data = gzip.compress(data)
  tf.io.gfile.makedirs(os.path.dirname(path))
  with tf.io.gfile.GFile(path, "wb") as f:
    f.write(data)
  return path


def _texts(set_name, domain, split="train"):
  src = core.get_domain_set(set_name).sources[domain]
  return [ex["text"].decode() for ex in src.get_dataset(split=split).as_numpy_iterator()]


def _rows_equal(a, b):
  assert a.names == b.names and a.num_tokens == b.num_tokens
  for d in a.names:
    idx = np.arange(a.num_sequences[d])
    ra, rb = a.rows(d, idx), b.rows(d, idx)
    for k in store.FEATURES:
      np.testing.assert_array_equal(ra[k], rb[k], err_msg=f"{d} {k}")


# ------------------------------------------------------------- formats agree


@pytest.mark.parametrize("fmt", ["jsonl.zst", "jsonl.gz", "parquet"])
def test_formats_give_same_domains_and_tokens(fmt, tmp_path):
  rows = _rows()
  opened = {}
  for f in ("jsonl", fmt):
    for k in range(2):
      _write(tmp_path / f / f"part-{k}.{f}", rows[k::2])
    name = corpus.register_corpus(name=f"fmt_{f.replace('.', '_')}",
                                  data_files=[str(tmp_path / f / f"*.{f}")],
                                  domain_field="meta.source", val_fraction=0.2)
    dset = core.get_domain_set(name)
    assert dset.domains == ["books", "code", "web_text"]
    assert dset.original_names["web_text"] == "Web-Text"
    m = build_store.build_store(name, "train", L, str(tmp_path / f"s_{f}"))
    build_store.build_store(name, "validation", L, str(tmp_path / f"s_{f}"))
    assert m["raw_lines"] == len(rows)
    opened[f] = [
        store.StoreDomains.open(
            str(tmp_path / f"s_{f}"), split=s, vocabulary_key=m["vocabulary_key"])
        for s in ("train", "validation")
    ]
    # The SeqIO sources read the same documents as the store.
    assert sorted(_texts(name, "code") + _texts(name, "code", "validation")) == sorted(
        r["text"] for r in rows if r["meta"]["source"] == "code")
  for a, b in zip(opened["jsonl"], opened[fmt]):
    _rows_equal(a, b)


def test_parquet_streams_row_groups(tmp_path, monkeypatch):
  path = _write(tmp_path / "a.parquet", _rows(100))
  seen = []
  real = pq.ParquetFile.iter_batches

  def spy(self, *args, **kwargs):
    for batch in real(self, *args, **kwargs):
      seen.append(batch.num_rows)
      yield batch

  monkeypatch.setattr(store_raw, "PARQUET_BATCH_ROWS", 8)
  monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
  monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("whole file read"))
  got = list(store_raw.iter_parquet(path, "text", "meta.source"))
  assert len(got) == 100 and max(seen) <= 8 and len(seen) >= 13
  assert got[3][1:] == (_rows(100)[3]["text"], "Web-Text")


# ------------------------------------------------- mapping, selection, minimum


def _train_tokens(rows, sources_, val_fraction):
  return sum(
      len(r["text"].encode()) + 1
      for r in rows
      if r["meta"]["source"] in sources_ and not sources.in_validation(r["text"], val_fraction))


def test_domain_map_selection_and_min_tokens(tmp_path, caplog, monkeypatch):
  rows = _rows(90, ("Web-Text", "code", "Books", "Novels", "code", "Books")) + _rows(
      2, ("tiny",), seed=1)
  path = _write(tmp_path / "all.parquet", rows)
  common = dict(data_files=[path], domain_field="meta.source", val_fraction=0.1)
  with caplog.at_level(logging.WARNING):
    name = corpus.register_corpus(name="cmap", domain_map={
        "Books": "prose",
        "Novels": "prose"
    }, min_tokens=100, **common)
  dset = core.get_domain_set(name)
  assert dset.domains == ["code", "prose", "web_text"]
  assert "dropping domain 'tiny'" in caplog.text and "< min_tokens=100" in caplog.text
  assert dset.metadata["domain_values"]["prose"] == ["Books", "Novels"]
  m = build_store.build_store(name, "train", L, str(tmp_path / "s"))
  for d, values in (("prose", ("Books", "Novels")), ("code", ("code",))):
    assert m["per_domain"][d]["tokens"] == _train_tokens(rows, values, 0.1)
  assert m["unrouted_lines"] == 2  # the dropped domain's records

  # `domains` selects (names after mapping); with a list and no minimum there is no scan.
  monkeypatch.setattr(corpus, "_scan", lambda *a: pytest.fail("scanned"))
  name = corpus.register_corpus(name="csel", domains=["prose", "code"], domain_map={
      "Books": "prose",
      "Novels": "prose"
  }, **common)
  assert core.get_domain_set(name).domains == ["code", "prose"]
  assert sorted(_texts(name, "prose") + _texts(name, "prose", "validation")) == sorted(
      r["text"] for r in rows if r["meta"]["source"] in ("Books", "Novels"))


def test_min_tokens_leaving_one_domain_fails(tmp_path):
  path = _write(tmp_path / "a.jsonl", _rows(40, ("code", "Books")) + _rows(2, ("tiny",)))
  with pytest.raises(ValueError, match=r"1 domain\(s\) \['code'\].*at least two"):
    corpus.register_corpus(name="cmin", data_files=[path], domain_field="meta.source",
                           domains=["code", "tiny"], min_tokens=100)


# ------------------------------------------------------------ validation split


def test_hash_validation_split_is_deterministic_and_disjoint(tmp_path):
  rows = _rows(200)
  paths = [_write(tmp_path / f"p{k}.jsonl", rows[k::2]) for k in range(2)]
  a = corpus.register_corpus(name="hash_a", data_files=paths, domain_field="meta.source",
                             val_fraction=0.25)
  b = corpus.register_corpus(name="hash_b", data_files=paths[::-1], domain_field="meta.source",
                             val_fraction=0.25)
  for d in core.get_domain_set(a).domains:
    train, val = _texts(a, d), _texts(a, d, "validation")
    assert val and train and not set(train) & set(val)
    assert sorted(train + val) == sorted(
        r["text"] for r in rows if core.sanitize(r["meta"]["source"]) == d)
    assert all(sources.in_validation(t, 0.25) for t in val)
    assert (train, val) == (_texts(b, d), _texts(b, d, "validation"))


def test_named_validation_files(tmp_path):
  train = _write(tmp_path / "train" / "a.jsonl.zst", _rows(60))
  val = _write(tmp_path / "val" / "a.parquet", _rows(9, seed=5))
  name = corpus.register_corpus(name="named_val", data_files=[str(tmp_path / "train")],
                                validation_files=[val], domain_field="meta.source")
  assert len(_texts(name, "code")) == 20 and len(_texts(name, "code", "validation")) == 3
  # One directory per domain: each domain's validation files sit in its directory.
  for d in ("web", "code"):
    _write(tmp_path / "dirs" / d / "train.jsonl", _rows(30, (d,)))
    _write(tmp_path / "dirs" / d / "val.parquet", _rows(4, (d,), seed=9))
  name = corpus.register_corpus(name="dir_val", data_dir=str(tmp_path / "dirs"),
                                validation_files=[str(tmp_path / "dirs" / "*" / "val.parquet")])
  assert core.get_domain_set(name).domains == ["code", "web"]
  assert len(_texts(name, "web")) == 30 and len(_texts(name, "web", "validation")) == 4


def test_directory_of_domain_files(tmp_path):
  _write(tmp_path / "d" / "Web-Text.jsonl.zst", _rows(30, ("Web-Text",)))
  _write(tmp_path / "d" / "books.parquet", _rows(20, ("Books",)))
  _write(tmp_path / "d" / "code" / "a.jsonl", _rows(10, ("code",)))
  _write(tmp_path / "d" / "code" / "b.parquet", _rows(10, ("code",), seed=2))
  name = corpus.register_corpus(name="cdir", data_dir=str(tmp_path / "d"), val_fraction=0.2)
  dset = core.get_domain_set(name)
  assert dset.domains == ["books", "code", "web_text"]
  m = build_store.build_store(name, "train", L, str(tmp_path / "s"))
  assert m["per_domain"]["code"]["documents"] == len(_texts(name, "code"))


# -------------------------------------------- gs://-like paths and the tokenizer


def test_ram_filesystem_and_trained_tokenizer(monkeypatch):
  root = "ram://corpus_test"
  _write(f"{root}/data/a.parquet", _rows(60))
  _write(f"{root}/data/b.jsonl.zst", _rows(60, seed=3))
  kwargs = dict(name="cram", data_files=[f"{root}/data/*"], domain_field="meta.source",
                vocabulary="train", vocab_size=150, min_tokens=10, output_dir=f"{root}/study",
                val_fraction=0.2)
  name = corpus.register_corpus(**kwargs)
  voc = core.get_domain_set(name).vocabulary
  assert isinstance(voc, seqio.SentencePieceVocabulary)
  model = voc.sentencepiece_model_file
  assert model.startswith(f"{root}/study/tokenizer/spm_150_") and model.endswith(".model")
  m = build_store.build_store(name, "train", L, f"{root}/store")
  assert m["vocabulary_key"] == f"spm:{model}" and m["rows"] > 0
  # A sample that holds a whole domain gives its exact token count.
  exact = sum(len(voc.encode(t)) + 1 for t in _texts(name, "code"))
  assert abs(m["per_domain"]["code"]["tokens"] - exact) <= 2

  # A rerun reuses the scan and the tokenizer: nothing is read or trained again.
  monkeypatch.setattr(corpus, "_scan", lambda *a: pytest.fail("scanned again"))
  monkeypatch.setattr(train_spm, "train_from_texts", lambda *a, **k: pytest.fail("trained"))
  assert core.get_domain_set(
      corpus.register_corpus(**kwargs)).vocabulary.sentencepiece_model_file == model

  # A SentencePiece model from a (gs://-like) path.
  monkeypatch.undo()
  name = corpus.register_corpus(name="cpath", data_files=[f"{root}/data/*"],
                                domain_field="meta.source", vocabulary=model, val_fraction=0.2)
  assert core.get_domain_set(name).vocabulary.sentencepiece_model_file == model


# --------------------------------------------------------------------- bad input


def _register(**kwargs):
  kwargs.setdefault("domain_field", "meta.source")
  kwargs.setdefault("val_fraction", 0.3)
  return corpus.register_corpus(name="cbad", **kwargs)


def test_missing_or_empty_patterns_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no data file matches '/nonexistent/\*.jsonl'"):
    _register(data_files=["/nonexistent/*.jsonl"])
  with pytest.raises(ValueError, match="empty pattern ''"):
    _register(data_files=[""])
  with pytest.raises(ValueError, match="not neither"):
    _register(data_files=[])
  (tmp_path / "notes.md").write_text("x")
  with pytest.raises(FileNotFoundError, match=r"matches only .*notes.md"):
    _register(data_files=[str(tmp_path / "*.md")])


def test_missing_columns_name_file_and_columns(tmp_path):
  pq_path = _write(tmp_path / "a.parquet", _rows(10))
  with pytest.raises(
      ValueError, match=rf"{pq_path}: no text column 'body'; columns found: "
      r"\['text', 'meta.source', 'id'\]"):
    _register(data_files=[pq_path], text_field="body")
  with pytest.raises(ValueError, match=rf"{pq_path}: no domain column 'meta.src'"):
    _register(data_files=[pq_path], domain_field="meta.src")
  js = _write(tmp_path / "a.jsonl.zst", _rows(10))
  with pytest.raises(
      ValueError, match=rf"{js}: the first record has no domain key 'src'; keys "
      r"found: \['text', 'meta.source', 'id'\]"):
    _register(data_files=[js], domain_field="src")


def test_domain_without_validation_documents_named(tmp_path):
  path = _write(tmp_path / "a.jsonl", _rows(60) + _rows(1, ("tiny",)))
  with pytest.raises(ValueError, match="Domain 'tiny' has no validation document"):
    _register(data_files=[path], val_fraction=0.3)
  name = _register(data_files=[path], val_fraction=0.3, min_tokens=50)  # drops it
  assert "tiny" not in core.get_domain_set(name).domains


def test_single_domain_and_clashing_names(tmp_path):
  one = _write(tmp_path / "one.jsonl", _rows(10, ("code",)))
  with pytest.raises(ValueError, match=r"1 domain\(s\) \['code'\].*at least two"):
    _register(data_files=[one])
  rows = _rows(60, ("Web-Text", "web text", "code"))
  clash = _write(tmp_path / "clash.jsonl", rows)
  with pytest.raises(ValueError, match="'Web-Text' and 'web text' both sanitize to 'web_text'"):
    _register(data_files=[clash])
  name = _register(data_files=[clash], domain_map={"web text": "Web-Text"})
  assert core.get_domain_set(name).domains == ["code", "web_text"]


def test_unreadable_parquet_named(tmp_path):
  good = _write(tmp_path / "good.parquet", _rows(10))
  bad = tmp_path / "bad.parquet"
  bad.write_bytes(b"PAR1 not really parquet")
  with pytest.raises(ValueError, match=f"Cannot read Parquet file {bad}"):
    _register(data_files=[good, str(bad)])


def _mistakes(tmp_path):
  """The README's corpus mistakes as --gin flags of custom_cpu.gin: (flags, expected text)."""
  good = _write(tmp_path / "good.jsonl", _rows(60))
  one = _write(tmp_path / "one.jsonl", _rows(10, ("code",)))
  clash = _write(tmp_path / "clash.jsonl", _rows(60, ("Web-Text", "web text", "code")))
  tiny = _write(tmp_path / "tiny.jsonl", _rows(60) + _rows(1, ("tiny",)))
  bad = tmp_path / "bad.parquet"
  bad.write_bytes(b"PAR1 not really parquet")
  field = "--gin.DOMAIN_FIELD='meta.source'"
  return [
      ([f"--gin.DATA_FILES=['{tmp_path}/none/*.jsonl']"], "no data file matches"),
      ([f"--gin.DATA_FILES=['{good}']",
        "--gin.DOMAIN_FIELD='meta.src'"], "no domain key 'meta.src'"),
      ([f"--gin.DATA_FILES=['{one}']", field], "at least two"),
      ([f"--gin.DATA_FILES=['{clash}']", field], "both sanitize to 'web_text'"),
      ([f"--gin.DATA_FILES=['{tiny}']", field,
        "--gin.VAL_FRACTION=0.3"], "Domain 'tiny' has no validation document"),
      ([f"--gin.DATA_FILES=['{bad}']", field], f"Cannot read Parquet file {bad}"),
      ([f"--gin.DATA_FILE=['{good}']"], "no binding of these gin files uses the macro DATA_FILE; "
       "nearest macros: DATA_FILES"),
      ([f"--gin.DATA_FILES=['{good}']",
        "--gin.DOMIAN_FIELD='meta.source'"], "macro DOMIAN_FIELD; nearest macros: DOMAIN_FIELD"),
      ([], "Give DATA_FILES (file patterns"),
  ]


def test_each_corpus_mistake_is_one_error_line(tmp_path, caplog):
  """Each mistake stops the pipeline's entry point before training with one `error:` line in
  the gin file's terms (macros): no logged ERROR repeating it, no gin trailer naming the
  function and its address. Catches errors printed twice and messages naming Python
  arguments (data_files) where the user set macros (DATA_FILES)."""
  from doremi_jax import pipeline  # pylint: disable=g-import-not-at-top
  out = tmp_path / "study"
  for flags, expected in _mistakes(tmp_path):
    gin.clear_config()
    caplog.clear()
    try:
      with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as e:
        config_lib.run_main(
            pipeline.pipeline,
            ["--gin_file=gin/pipelines/custom_cpu.gin", f"--gin.PIPELINE_DIR='{out}'", *flags])
    finally:
      gin.clear_config()
    message = str(e.value.code)
    assert message.startswith("error: ") and len(message.splitlines()) == 1, message
    assert expected in message, message
    assert "In call to configurable" not in message and "0x" not in message, message
    assert "quotes" not in message, message  # the hint only where it applies
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert not (out / "round1").exists()


# -------------------------------------------------------- the one-command study


def _pipeline(out, *bindings, env_dir):
  cmd = [
      sys.executable, "-m", "doremi_jax.pipeline", "--gin_file=gin/pipelines/custom_cpu.gin",
      f"--gin.PIPELINE_DIR='{out}'", "--gin.SEQ_LEN=32",
      "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.pipeline.main_steps=4",
      "--gin.pipeline.main_batch_size=8", "--gin.reference/train.train_steps=4",
      "--gin.proxy/train.train_steps=4", "--gin.main/train.eval_every=2",
      "--gin.main/train.eval_batch_size=16", "--gin.main/train.eval_max_sequences=4",
      "--gin.pipeline.baselines=['natural', 'uniform']", *bindings
  ]
  env = dict(helpers.child_env(devices=1), DOREMI_JAX_DATA_DIR=str(env_dir))
  return helpers.run(cmd, env=env, timeout=600, check=False)


def test_one_command_study_on_jsonl_zst(tmp_path):
  for k in range(2):
    _write(tmp_path / "data" / f"part-{k}.jsonl.zst", _rows(90, seed=k)[k::1])
  out = tmp_path / "study"
  proc = _pipeline(out, f"--gin.DATA_FILES=['{tmp_path}/data/*.jsonl.zst']",
                   "--gin.DOMAIN_FIELD='meta.source'", "--gin.VOCABULARY='train'",
                   "--gin.VOCAB_SIZE=200", env_dir=tmp_path / "cache")
  assert proc.returncode == 0, proc.stderr[-3000:]
  weights = json.load(open(out / "domain_weights.json"))["domains"]
  assert sorted(weights) == ["books", "code", "web_text"]
  assert (out / "report.md").exists()
  assert [p.name for p in (out / "tokenizer").iterdir()][0].startswith("spm_200_")
  info = json.load(open(out / "main" / "doremi" / "run_info.json"))
  assert info["vocabulary"]["type"] == "SentencePieceVocabulary"


def test_one_command_bad_input_fails_before_training(tmp_path):
  proc = _pipeline(tmp_path / "study", f"--gin.DATA_FILES=['{tmp_path}/none/*.parquet']",
                   env_dir=tmp_path / "cache")
  assert proc.returncode != 0
  assert f"no data file matches '{tmp_path}/none/*.parquet'" in proc.stderr
  # Printed once, as the one error line (not also as a logged ERROR).
  assert [l for l in proc.stderr.splitlines() if "error" in l.lower()] == [
      f"error: DATA_FILES: no data file matches '{tmp_path}/none/*.parquet'; expected .jsonl, "
      ".jsonl.zst, .jsonl.gz, .parquet or .txt files."
  ], proc.stderr
  assert not (tmp_path / "study" / "round1").exists()


def test_tpu_gin_file_binds_the_corpus(tmp_path):
  gin.clear_config()
  try:
    config_lib.parse_gin(["pipelines/custom_280m.gin"], [
        f"PIPELINE_DIR='{tmp_path}'", "DATA_FILES=['gs://bucket/*.parquet']",
        "DOMAIN_FIELD='source'"
    ])
    ref = gin.query_parameter("pipeline.domain_set")
    assert ref.configurable.name == "register_corpus" and ref.evaluate
    assert gin.query_parameter("register_corpus.data_files") is not None
    assert gin.query_parameter("VOCABULARY/macro.value") == "train"
    assert gin.query_parameter("VOCAB_SIZE/macro.value") == 32000
    assert gin.query_parameter("main/train.mesh_shape") == (1, 64, 4)
  finally:
    gin.clear_config()


def test_store_build_command_from_the_study_gin(tmp_path, capsys):
  """The store a study reads, built beforehand (e.g. on Dataflow) from the same gin and flags."""
  _write(tmp_path / "data" / "a.parquet", _rows(40))
  flags = [
      "--gin_file=pipelines/custom_cpu.gin", f"--gin.PIPELINE_DIR='{tmp_path}/study'",
      f"--gin.DATA_FILES=['{tmp_path}/data/*.parquet']", "--gin.DOMAIN_FIELD='meta.source'",
      "--gin.VAL_FRACTION=0.2"
  ]
  try:
    build_store.main(flags + ["--sequence_length=32", f"--cache_dir={tmp_path}/stores"])
  finally:
    gin.clear_config()
  out = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  assert [o["split"] for o in out] == ["train", "validation"]
  assert out[0]["store_dir"] == build_store.store_path("custom", 32, f"{tmp_path}/stores")
