"""Source formats with tiny generated files: JSONL(.zst), Pile, SlimPajama,
directories of files, a JSONL with a domain field, TFDS, SentencePiece."""
import json
import os

import pytest
import seqio
import zstandard

import data_pipelines
from data_pipelines import custom
from data_pipelines import pile
from data_pipelines import slimpajama
from data_pipelines import sources
from data_pipelines import vocab


def _write_jsonl(path, rows, zst=False):
  """Local paths and other tf.io.gfile schemes (ram:// stands in for gs://)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.io.gfile.makedirs(os.path.dirname(path))
  data = "".join(json.dumps(r) + "\n" for r in rows).encode()
  if zst:
    data = zstandard.ZstdCompressor().compress(data)
  with tf.io.gfile.GFile(path, "wb") as f:
    f.write(data)


def _texts(task_name, split="train"):
  task = seqio.get_mixture_or_task(task_name)
  return [
      ex["text"].decode()
      for ex in task.source.get_dataset(split=split, shuffle=False).as_numpy_iterator()
  ]


def test_pile_layout(tmp_path):
  names = ["Pile-CC", "Gutenberg (PG-19)", "Wikipedia (en)"]
  rows = [{"text": f"{n} doc {i}", "meta": {"pile_set_name": n}} for i in range(4) for n in names]
  _write_jsonl(str(tmp_path / "train" / "00.jsonl.zst"), rows, zst=True)
  _write_jsonl(str(tmp_path / "val.jsonl.zst"), rows[:3], zst=True)
  dset = pile.register(str(tmp_path))
  assert len(dset.domains) == 22
  assert "pile_pile_cc" in seqio.TaskRegistry.names()
  assert dset.original_names["gutenberg_pg_19"] == "Gutenberg (PG-19)"
  assert _texts("pile_gutenberg_pg_19") == [f"Gutenberg (PG-19) doc {i}" for i in range(4)]
  assert _texts("pile_pile_cc", "validation") == ["Pile-CC doc 0"]
  assert _texts("pile_arxiv") == []
  rates = data_pipelines.mixture_rates("pile_doremi_280m")
  assert rates["pile_cc"] == pytest.approx(0.6057, abs=1e-3)
  assert data_pipelines.mixture_rates("pile_natural")["pile_cc"] == (
      pytest.approx(0.1121, abs=1e-3))
  # Published rates stay published when counts are given; counts only fill lazy rates.
  ones = {d: 1.0 for d in dset.domains}
  assert data_pipelines.mixture_rates("pile_natural", natural_counts=ones)["pile_cc"] == (
      pytest.approx(0.1121, abs=1e-3))
  # pipeline.natural_weights='counted': this tokenizer's counts x the Pile's epochs.
  counted = data_pipelines.natural_weights("pile", counts=ones, epochs=dset.metadata["epochs"])
  assert counted["wikipedia_en"] / counted["pile_cc"] == pytest.approx(3.0)
  assert counted["gutenberg_pg_19"] / counted["books3"] == pytest.approx(2.5 / 1.5)


def test_pile_layout_on_a_remote_filesystem():
  """A gs://-like DOREMI_JAX_PILE_DIR (TF's ram:// filesystem): the layout is found and its
  one-pass store build reads it."""
  from data_pipelines import build_store  # pylint: disable=g-import-not-at-top
  root = "ram://pile_remote_layout"
  rows = [{
      "text": f"{n} doc {i}",
      "meta": {
          "pile_set_name": n
      }
  } for i in range(3) for n in pile.PILE_SET_NAMES]
  _write_jsonl(f"{root}/train/00.jsonl.zst", rows, zst=True)
  _write_jsonl(f"{root}/val.jsonl.zst", rows, zst=True)
  dset = pile.register(root, name="pile_remote")
  assert _texts("pile_remote_arxiv") == [f"ArXiv doc {i}" for i in range(3)]
  manifest = build_store.build_store(dset.name, "train", 64, "ram://pile_remote_store")
  assert manifest["counters"]["raw_lines"] == len(rows)
  assert manifest["per_domain"]["arxiv"]["rows"] == 1


def test_slimpajama_layout(tmp_path):
  for split, n in (("train", 3), ("validation", 1)):
    rows = [{
        "text": f"{s} {i}",
        "meta": {
            "redpajama_set_name": s
        }
    } for s in slimpajama.SET_NAMES for i in range(n)]
    _write_jsonl(str(tmp_path / split / "chunk1" / f"ex_{split}_0.jsonl.zst"), rows, zst=True)
  dset = slimpajama.register(str(tmp_path))
  assert dset.domains == sorted(
      ["commoncrawl", "c4", "github", "book", "arxiv", "wikipedia", "stackexchange"])
  assert _texts("slimpajama_arxiv") == [f"RedPajamaArXiv {i}" for i in range(3)]
  assert _texts("slimpajama_c4", "validation") == ["RedPajamaC4 0"]


def test_directory_of_domain_files(tmp_path):
  _write_jsonl(str(tmp_path / "news.jsonl"), [{"text": f"news {i}"} for i in range(30)])
  _write_jsonl(
      str(tmp_path / "web.jsonl.zst"), [{
          "body": {
              "t": f"web {i}"
          }
      } for i in range(5)], zst=True)
  (tmp_path / "poems.txt").write_text("roses are red\n\nviolets\nare blue\n")
  os.makedirs(tmp_path / "code")
  for i in range(3):
    (tmp_path / "code" / f"f{i}.txt").write_text(f"print({i})\n\nx = {i}\n")
  srcs = sources.directory_domains(str(tmp_path), val_fraction=0.2)
  assert sorted(srcs) == ["code", "news", "poems", "web"]
  data_pipelines.register_domain_set("dirset", srcs)
  news = _texts("dirset_news") + _texts("dirset_news", "validation")
  assert sorted(news) == sorted(f"news {i}" for i in range(30))
  assert 0 < len(_texts("dirset_news", "validation")) < 15
  assert sorted(_texts("dirset_poems") +
                _texts("dirset_poems", "validation")) == ["roses are red", "violets\nare blue"]
  code = _texts("dirset_code") + _texts("dirset_code", "validation")
  assert sorted(code) == [f"print({i})\n\nx = {i}\n" for i in range(3)]
  nested = sources.directory_domains(str(tmp_path), text_field="body.t")
  web = nested["web"].get_dataset(split="train", shuffle=False)
  assert len(list(web)) + len(list(nested["web"].get_dataset(split="validation",
                                                             shuffle=False))) == 5


def test_single_jsonl_with_domain_field(tmp_path):
  path = str(tmp_path / "all.jsonl")
  _write_jsonl(path, [{
      "text": f"{d} {i}",
      "meta": {
          "src": d
      }
  } for i in range(6) for d in ("b-side", "a side")])
  dset = custom.register_jsonl_domains(name="one", paths=[path], domain_field="meta.src",
                                       val_fraction=0.0)
  assert dset.domains == ["a_side", "b_side"]
  assert _texts("one_b_side") == [f"b-side {i}" for i in range(6)]


def test_malformed_jsonl(tmp_path, caplog):
  path = str(tmp_path / "bad.jsonl")
  with open(path, "w") as f:
    f.write('{"text": "ok"}\n{"text": broken\n[1]\n{"text": "fine"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed"):
    list(sources.iter_jsonl(path))
  docs = list(sources.iter_jsonl(path, on_malformed="skip"))
  assert [d["text"] for d in docs] == ["ok", "fine"]
  assert "skipped 2 malformed" in caplog.text


def test_missing_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    sources.directory_domains(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    sources.files_source([str(tmp_path / "missing.jsonl")])
  with pytest.raises(FileNotFoundError, match="No training files"):
    pile.register(str(tmp_path))
  os.makedirs(tmp_path / "emptydom")
  with pytest.raises(ValueError, match="'emptydom'"):
    sources.directory_domains(str(tmp_path))


def test_tfds_source_construction():
  src = sources.tfds_source("c4/en:3.0.1")
  assert isinstance(src, seqio.TfdsDataSource)
  dset = custom.register_tfds(name="tfdsset", datasets={"c4": "c4/en:3.0.1"})
  assert dset.domains == ["c4"]


def test_vocabularies_and_spm_training(tmp_path):
  assert isinstance(vocab.get_vocabulary(None), seqio.ByteVocabulary)
  with pytest.raises(FileNotFoundError, match="train_spm"):
    vocab.get_vocabulary(str(tmp_path / "nope.model"))
  from data_pipelines import train_spm  # pylint: disable=g-import-not-at-top
  docs = [f"the quick brown fox {i}\n  jumps over the lazy dog {i % 7}\n" for i in range(200)]
  data_pipelines.register_domain_set(
      "spmset", {
          "a": sources.generator_source(lambda s: iter(docs[:100])),
          "b": sources.generator_source(lambda s: iter(docs[100:]))
      })
  path = train_spm.train("spmset_uniform", 60, str(tmp_path / "spm"))
  v = vocab.get_vocabulary(path)
  assert isinstance(v, seqio.SentencePieceVocabulary)
  ids = v.encode("the quick brown fox")
  assert ids and v.decode(ids) == "the quick brown fox"
  assert v.vocab_size <= 80
  # Newlines and indentation survive, so one-shot prompts keep their lines and answers stop
  # at the newline token (data_pipelines.downstream).
  from data_pipelines import downstream  # pylint: disable=g-import-not-at-top
  text = "the fox\n  jumps over\n\nthe dog"
  assert v.decode(v.encode(text)) == text and downstream.keeps_newlines(v)
  newline = downstream.stop_ids(v)[1]
  assert downstream.stop_ids(v) == [1, newline] and v.decode([newline]) == "\n"


def test_spm_training_chunks_keep_whole_lines():
  from data_pipelines import train_spm  # pylint: disable=g-import-not-at-top
  doc = "aaaa\nbb\ncccccccccc\nd\n"
  assert list(train_spm.chunks(doc, 8)) == ["aaaa\nbb\n", "cccccccc", "cc\nd\n"]
  assert "".join(train_spm.chunks(doc, 8)) == doc
