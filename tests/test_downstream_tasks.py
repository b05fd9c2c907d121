"""Downstream tasks: exact match, one-shot prompts on TFDS-shaped examples, missing data, demo tasks
and full seqio.Evaluator round trips. No network, no prepared TFDS data (tiny fakes are written)."""
import importlib
import importlib.resources
import os
import unicodedata

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import dataset_builder
from tensorflow_datasets.core.dataset_builders import adhoc_builder

from data_pipelines import demo
from data_pipelines import downstream
from data_pipelines import downstream_demo

TFDS_NAMES = {k: b.tfds_name for k, b in downstream.BENCHMARKS.items()}

# ------------------------------------------------------------------------------- scoring


def test_normalize_answer():
  assert downstream.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
  assert downstream.normalize_answer("an apple, a pear") == "apple pear"
  assert downstream.normalize_answer("  U.S.A.\n") == "usa"
  assert downstream.normalize_answer("Theory") == "theory"  # articles only as whole words
  assert downstream.normalize_answer("") == ""


def test_exact_match():
  em = downstream.exact_match
  assert em([["Paris"]], ["paris."]) == {"exact_match": 100.0}
  assert em([["The Beatles"]], ["beatles"])["exact_match"] == 100.0
  assert em([["New  York", "NYC"]], ["nyc"])["exact_match"] == 100.0  # max over aliases
  assert em([["Paris"], ["Rome"]], ["Paris", "Milan"])["exact_match"] == 50.0
  assert em([["Paris"]], ["Paris France"])["exact_match"] == 0.0
  # SQuADv2 unanswerable: gold [""] matches only an empty (after normalization) prediction.
  assert em([[""], [""]], ["", "the"])["exact_match"] == 100.0
  assert em([[""]], ["Denver"])["exact_match"] == 0.0
  assert em(["Paris"], ["paris"])["exact_match"] == 100.0  # a bare string is one alias
  assert em([], []) == {"exact_match": 0.0}
  with pytest.raises(ValueError, match="targets"):
    em([["a"]], [])


def test_postprocessors():
  ex = {"answers": np.array([b"Mars", b"the red planet"], dtype=object)}
  assert downstream.postprocess_answer(" Mars", example=ex,
                                       is_target=True) == ["Mars", "the red planet"]
  assert downstream.postprocess_answer(" Mars", is_target=True) == ["Mars"]
  assert downstream.postprocess_answer("  Mars \nQ: next", example=ex) == "Mars"
  assert downstream.postprocess_word(" window and\nmore", example=ex) == "window"
  assert downstream.postprocess_word("\n") == ""
  assert downstream_demo.postprocess_field("LATIN SMALL LETTER A\tLl\n") == "LATIN SMALL LETTER A"


def test_stop_ids():
  assert downstream.stop_ids() == [1, 13]  # bytes: EOS and "\n" (byte 10 + 3 special ids)
  # The demo's code-point names end at a tab, as in the corpus's rows.
  assert downstream.task_stops("downstream_demo_unicode") == "\t\n"
  assert downstream.stop_ids(stops=downstream.task_stops("downstream_demo_unicode")) == [1, 12, 13]
  assert downstream.task_stops("downstream_triviaqa") == "\n"

  class WordBoundaryThenNewline(seqio.ByteVocabulary):  # as SentencePiece: "▁", "\n"

    def encode(self, s):
      return [35, 13] if s == "\n" else super().encode(s)

  class FoldsNewlines(seqio.ByteVocabulary):  # SentencePiece's default normalization

    def encode(self, s):
      return super().encode(s.replace("\n", " "))

  assert downstream.stop_ids(WordBoundaryThenNewline()) == [1, 13]
  assert downstream.stop_ids(FoldsNewlines()) == [1]
  assert downstream.keeps_newlines() and not downstream.keeps_newlines(FoldsNewlines())
  # Such a vocabulary still scores: the answer ends at the next turn, " Q:".
  assert downstream.postprocess_answer(" Paris Q: who wrote it? A: Hugo") == "Paris"


# --------------------------------------------------------------- TFDS-shaped examples


def _spec(benchmark: str):
  """The element spec of the benchmark's TFDS dataset (from the installed builder's code)."""
  return tfds.builder(TFDS_NAMES[benchmark]).info.features.get_tensor_spec()


def _fill(spec, values):
  """A full example of `spec`: `values` where given, else empty strings/sequences and zeros."""
  if isinstance(spec, dict):
    return {k: _fill(s, (values or {}).get(k)) for k, s in spec.items()}
  if values is not None:
    return values
  if spec.shape.rank:
    return np.zeros([0], spec.dtype.as_numpy_dtype) if spec.dtype != tf.string else []
  return "" if spec.dtype == tf.string else spec.dtype.as_numpy_dtype(0)


def _tfds_like(benchmark: str, examples):
  spec = _spec(benchmark)
  full = [_fill(spec, v) for v in examples]
  ds = tf.data.Dataset.from_generator(lambda: iter(full), output_signature=spec)
  tf.nest.assert_same_structure(ds.element_spec, spec)
  return ds


def _prompts(benchmark, shots, evals, num_shots=8):
  pool = downstream.shot_pool_from_dataset(_tfds_like(benchmark, shots), benchmark, num_shots)
  ds = downstream.one_shot_prompt(
      _tfds_like(benchmark, evals), benchmark=benchmark, pool_fn=lambda: pool)
  return [{k: v for k, v in ex.items()} for ex in ds.as_numpy_iterator()], pool


def _shot(key: str, n: int) -> int:
  return int(tf.strings.to_hash_bucket_fast(key, n))


def _tqa(q, value, aliases):
  return {"question": q, "answer": {"value": value, "aliases": aliases}}


def test_hash_is_stable():
  # FarmHash fingerprints: the same shot in every run, process and machine.
  assert [_shot("who wrote hamlet?", n) for n in (2, 3, 64)] == [1, 2, 31]


def test_triviaqa_prompt():
  shots = [_tqa("Capital of France?", "Paris", ["Paris"]), _tqa("2+2?", "Four", ["Four", "4"])]
  q = "Which planet is known as the Red Planet?"
  out, pool = _prompts("triviaqa", shots, [_tqa(q, "Mars", ["Mars", "The Red Planet"])])
  j = _shot(q, 2)
  sq, sa = pool["question"][j], pool["answer"][j]
  assert out[0]["inputs"].decode() == f"Q: {sq}\nA: {sa}\n\nQ: {q}\nA:"
  assert out[0]["targets"] == b" Mars"
  assert list(out[0]["answers"]) == [b"Mars", b"Mars", b"The Red Planet"]


@pytest.mark.parametrize("benchmark,answer_key", [("natural_questions", "answer"),
                                                  ("web_questions", "answers")])
def test_closed_book_prompts(benchmark, answer_key):
  shots = [{
      "question": f"shot question {i}",
      answer_key: [f"shot answer {i}", "alt"]
  } for i in range(5)]
  evals = [{
      "question": "shot question 3",
      answer_key: ["x", "y"]
  }, {
      "question": "who wrote hamlet?",
      answer_key: ["Shakespeare", "William Shakespeare"]
  }]
  out, pool = _prompts(benchmark, shots, evals, num_shots=5)
  for ev, ex in zip(evals, out):
    text = ex["inputs"].decode()
    shot_q = text.split("\n")[0][len("Q: "):]
    assert shot_q != ev["question"]  # never the evaluated example, even when it is in the pool
    j = pool["question"].index(shot_q)
    assert text == f"Q: {shot_q}\nA: {pool['answer'][j]}\n\nQ: {ev['question']}\nA:"
    assert ex["targets"].decode() == " " + ev[answer_key][0]
    assert [a.decode() for a in ex["answers"]] == ev[answer_key]
  assert out[1]["inputs"].decode().startswith(f"Q: shot question {_shot('who wrote hamlet?', 5)}")
  again, _ = _prompts(benchmark, shots, evals, num_shots=5)
  assert [e["inputs"] for e in again] == [e["inputs"] for e in out]  # deterministic


def _squad(i, answers, title="T"):
  return {
      "id": f"id{i}",
      "title": title,
      "context": f"Context {i}.",
      "question": f"Question {i}?",
      "is_impossible": not answers,
      "answers": {
          "text": answers,
          "answer_start": np.zeros([len(answers)], np.int32)
      }
  }


def test_squad_v2_prompt():
  shots = [_squad(0, []), _squad(1, ["one"], "Ones"), _squad(2, ["two", "2"], "Twos")]
  out, pool = _prompts("squad_v2", shots, [_squad(7, ["seven", "7"]), _squad(8, [])])
  assert pool["question"] == ["Question 1?", "Question 2?"]  # unanswerable shots are skipped
  j = _shot("Question 7?", 2)
  assert out[0]["inputs"].decode() == (
      f"Title: {pool['title'][j]}\n\nBackground: {pool['context'][j]}\n\n"
      f"Q: {pool['question'][j]}\n\nA: {pool['answer'][j]}\n\n\n"
      "Title: T\n\nBackground: Context 7.\n\nQ: Question 7?\n\nA:")
  assert out[0]["targets"] == b" seven" and list(out[0]["answers"]) == [b"seven", b"7"]
  # Unanswerable: empty target, gold [""] (official v2 script).
  assert out[1]["targets"] == b"" and list(out[1]["answers"]) == [b""]


def test_lambada_prompt():
  shots = [{"passage": "the cat sat on the mat\n"}, {"passage": "she opened the old door\n"}]
  passage = "he looked out of the  window"
  out, pool = _prompts("lambada", shots, [{"passage": passage + "\n"}])
  assert pool["passage"] == ["the cat sat on the", "she opened the old"]
  j = _shot("he looked out of the", 2)
  assert out[0]["inputs"].decode() == (
      f"{pool['passage'][j]} {pool['answer'][j]}\n\nhe looked out of the")
  assert out[0]["targets"] == b" window" and list(out[0]["answers"]) == [b"window"]


def test_prompt_checked():
  with pytest.raises(ValueError, match="answer"):
    downstream.check_prompt("Q: {question}\nA: {answer}", "triviaqa")
  with pytest.raises(ValueError, match="context"):
    downstream.check_prompt("{context} Q: {question}\nA:", "natural_questions")
  downstream.check_prompt("Question: {shot_question} {shot_answer}\nQuestion: {question}",
                          "web_questions")


def test_truncate_inputs_left():
  ds = tf.data.Dataset.from_tensors({"inputs": tf.range(1, 11), "targets": tf.constant([5])})
  trunc = downstream.truncate_inputs_left
  assert list(next(iter(trunc(ds, {"inputs": 4, "targets": 2})))["inputs"]) == [7, 8, 9, 10]
  assert len(next(iter(trunc(ds, {"inputs": 20})))["inputs"]) == 10
  assert len(next(iter(trunc(ds, None)))["inputs"]) == 10


# ------------------------------------------------------------------- missing TFDS data


def test_missing_tfds_dataset_fails_clearly(tmp_path):
  data_dir = str(tmp_path / "tfds")
  os.makedirs(data_dir)
  names = downstream.register_paper_tasks(tfds_data_dir=data_dir, prefix="dsmissing")
  assert names == [f"dsmissing_{k}" for k in downstream.BENCHMARKS]
  with pytest.raises(FileNotFoundError) as err:
    downstream.check_prepared("dsmissing_paper")
  msg = str(err.value)
  assert "nothing is downloaded at run time" in msg
  for name in TFDS_NAMES.values():
    assert f"tfds build {name} --data_dir={data_dir}" in msg
  # The Evaluator (and Task.get_dataset) fail with the same message before any compute.
  with pytest.raises(downstream.DatasetNotPreparedError,
                     match="tfds build trivia_qa/unfiltered.nocontext:1.1.0"):
    seqio.Evaluator("dsmissing_triviaqa", seqio.PrefixLMFeatureConverter(pack=False))
  assert os.listdir(data_dir) == []  # nothing was downloaded or created
  check = downstream.check_prepared
  with pytest.raises(FileNotFoundError, match=f"lambada:1.0.0 --data_dir={tmp_path}"):
    check(["dsmissing_lambada"], tfds_data_dir=str(tmp_path))
  check("downstream_demo")  # no TFDS data needed


def test_register_paper_tasks_is_idempotent(tmp_path):
  kwargs = {"tfds_data_dir": str(tmp_path), "prefix": "dsidem"}
  names = downstream.register_paper_tasks(**kwargs)
  task = seqio.get_mixture_or_task(names[0])
  assert downstream.register_paper_tasks(**kwargs) == names
  assert seqio.get_mixture_or_task(names[0]) is task  # unchanged
  mixture = seqio.get_mixture_or_task("dsidem_paper")
  assert sorted(t.name for t in mixture.tasks) == sorted(names)
  prompts = {
      "triviaqa": "Question: {shot_question}\nAnswer: {shot_answer}\n\nQuestion: "
                  "{question}\nAnswer:"
  }
  downstream.register_paper_tasks(prompts=prompts, **kwargs)
  assert seqio.get_mixture_or_task(names[0]) is not task  # replaced
  with pytest.raises(ValueError, match="Unknown benchmark"):
    downstream.register_paper_tasks(prompts={"trivia": "{question}"}, **kwargs)


# ------------------------------------------------- end to end on tiny prepared TFDS data


def _store_fake_tfds(monkeypatch, data_dir, benchmark, splits):
  """Writes a tiny prepared TFDS dataset under the benchmark's real name, version and features."""
  try:
    importlib.import_module("importlib_resources")
  except ImportError:  # TFDS's optional dependency; the stdlib module has what it uses.
    monkeypatch.setattr(dataset_builder, "importlib_resources", importlib.resources, raising=False)
  name, version = TFDS_NAMES[benchmark].split(":")
  name, _, config = name.partition("/")
  spec = _spec(benchmark)
  features = tfds.builder(TFDS_NAMES[benchmark]).info.features
  split_data = {s: [(i, _fill(spec, ex)) for i, ex in enumerate(exs)] for s, exs in splits.items()}
  adhoc_builder.store_as_tfds_dataset(name, version, features, split_data, config=config or None,
                                      data_dir=data_dir, disable_shuffling=True)


def _predict_fn(evaluator, text_fn, length=160):
  """A predict_fn answering each example with text_fn(its aliases) and a newline, 0-padded.

  Examples are recognized by their tokens (inputs + targets), so one predict_fn serves every task
  of the evaluator."""
  gold = {}
  for ds in evaluator.cached_task_datasets.values():
    for ex in ds.as_numpy_iterator():
      gold[tuple(ex["inputs"]) + tuple(ex["targets"])] = [a.decode() for a in ex["answers"]]
  vocab = seqio.ByteVocabulary()

  def predict_fn(ds):
    out = []
    for index, feats in ds.as_numpy_iterator():
      aliases = gold[tuple(np.trim_zeros(feats["decoder_target_tokens"], "b"))]
      tokens = vocab.encode(text_fn(aliases)) + [13]
      out.append((int(index), np.pad(tokens, (0, length - len(tokens)))))
    return out

  return predict_fn


def test_paper_tasks_on_prepared_tfds(tmp_path, monkeypatch):
  data_dir = str(tmp_path)
  web = lambda i, ans: {"question": f"web q{i}?", "answers": ans, "url": f"u{i}"}
  web_train = [web(i, [f"shot{i}"]) for i in range(3)]
  web_test = [web(10, ["Lisbon", "lisboa"]), web(11, ["Ottawa", "ottawa ON"])]
  _store_fake_tfds(monkeypatch, data_dir, "web_questions", {"train": web_train, "test": web_test})
  lambada_train = [{"passage": f"shot passage {i} word{i}\n"} for i in range(3)]
  lambada_test = [{"passage": "the end of the story\n"}]
  _store_fake_tfds(monkeypatch, data_dir, "lambada", {"train": lambada_train, "test": lambada_test})
  names = downstream.register_paper_tasks(tfds_data_dir=data_dir, prefix="dsfake", num_shots=2,
                                          benchmarks=["web_questions", "lambada"])
  downstream.check_prepared(names)
  ev = seqio.Evaluator("dsfake_paper", seqio.PrefixLMFeatureConverter(pack=False),
                       async_compute_metrics=False)
  web_ex = next(ev.cached_task_datasets["dsfake_web_questions"].as_numpy_iterator())
  j = _shot("web q10?", 2)  # the pool: the first 2 train examples
  assert web_ex["inputs_pretokenized"].decode() == f"Q: web q{j}?\nA: shot{j}\n\nQ: web q10?\nA:"
  lam = next(ev.cached_task_datasets["dsfake_lambada"].as_numpy_iterator())
  j = _shot("the end of the", 2)
  assert lam["inputs_pretokenized"].decode() == f"shot passage {j} word{j}\n\nthe end of the"
  # Answering with the LAST alias scores 100: the aliases reach the metric through "answers".
  metrics, _ = ev.evaluate(compute_metrics=True, predict_fn=_predict_fn(ev, lambda a: " " + a[-1]))
  assert metrics.result() == {t: {"exact_match": 100.0} for t in names}
  metrics, _ = ev.evaluate(compute_metrics=True, predict_fn=_predict_fn(ev, lambda a: " Oslo"))
  assert metrics.result() == {t: {"exact_match": 0.0} for t in names}


# ------------------------------------------------------------------------ demo tasks


@pytest.fixture(scope="module")
def demo_corpus(tmp_path_factory):
  old = dict(demo._CONFIG)
  demo.configure(data_dir=str(tmp_path_factory.mktemp("downstream_demo")))
  yield demo.corpus_dir()
  demo._CONFIG.update(old)


def _demo_examples(task_name, sequence_length=None):
  task = seqio.get_mixture_or_task(task_name)
  ds = task.get_dataset(sequence_length, split="validation", shuffle=False)
  return list(ds.as_numpy_iterator())


def _canon(exs):
  return [(e["inputs"].tolist(), e["targets"].tolist(), e["answers"].tolist()) for e in exs]


def test_demo_tasks_registered():
  assert downstream_demo.register_demo_tasks() == [
      "downstream_demo_unicode", "downstream_demo_cloze"
  ]
  mixture = seqio.get_mixture_or_task("downstream_demo")
  assert sorted(
      t.name for t in mixture.tasks) == ["downstream_demo_cloze", "downstream_demo_unicode"]


def test_demo_unicode_task(demo_corpus):
  del demo_corpus
  exs = _demo_examples("downstream_demo_unicode")
  assert len(exs) == downstream_demo.NUM_EXAMPLES
  assert _canon(exs) == _canon(_demo_examples("downstream_demo_unicode"))  # deterministic
  train = "".join(downstream_demo.corpus_documents("structured", "train"))
  for ex in exs:
    shot, query = ex["inputs_pretokenized"].decode().split("\n")
    code = query.rstrip("\t")
    name = ex["targets_pretokenized"].decode()
    assert list(ex["answers"]) == [name.encode()]
    assert unicodedata.name(chr(int(code[2:], 16))) == name  # a true fact ...
    assert f"{code}\t{name}\t" in train  # ... seen in pretraining
    shot_code, shot_name = shot.split("\t")
    assert shot_code != code and f"{shot_code}\t{shot_name}\t" in train


def test_demo_cloze_task(demo_corpus):
  del demo_corpus
  exs = _demo_examples("downstream_demo_cloze")
  assert len(exs) == downstream_demo.NUM_EXAMPLES
  held_out = {
      d: [" ".join(t.split()) for t in downstream_demo.corpus_documents(d, "validation")]
      for d in downstream_demo.CLOZE_DOMAINS
  }
  texts = [t for ts in held_out.values() for t in ts]
  evaluated, pool = downstream_demo.cloze_examples(demo.corpus_dir())
  for ex, cand in zip(exs, evaluated):
    shot, passage = ex["inputs_pretokenized"].decode().split("\n\n")
    word = ex["targets_pretokenized"].decode()
    assert passage == cand["passage"] and word == " " + cand["answer"]
    assert any(f"{passage}{word}" in t for t in texts)  # the next word of a held-out document
    shot_doc = [p["doc"] for p in pool if shot == f"{p['passage']} {p['answer']}"]
    assert shot_doc and shot_doc[0] != cand["doc"]  # the shot is from another document
  trunc = _demo_examples("downstream_demo_cloze", {"inputs": 50, "targets": 16})
  assert [list(t["inputs"]) for t in trunc] == [list(e["inputs"][-50:]) for e in exs]


@pytest.mark.parametrize("text_fn,expected", [(lambda a: " " + a[0] + "\tLu", 100.0),
                                              (lambda a: " zzz qq", 0.0)])
def test_demo_evaluator_round_trip(demo_corpus, text_fn, expected):
  del demo_corpus
  ev = seqio.Evaluator("downstream_demo", seqio.PrefixLMFeatureConverter(pack=False),
                       async_compute_metrics=False)
  metrics, _ = ev.evaluate(compute_metrics=True, predict_fn=_predict_fn(ev, text_fn))
  assert metrics.result() == {
      "downstream_demo_unicode": {
          "exact_match": expected
      },
      "downstream_demo_cloze": {
          "exact_match": expected
      }
  }
