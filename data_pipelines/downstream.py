"""The paper's downstream evaluation as SeqIO tasks: one-shot generative QA, scored by exact match.

DoReMi (Xie et al. 2023, Sec. 3) reports one-shot generative accuracy on TriviaQA,
NaturalQuestions, WebQuestions, SQuADv2 and LAMBADA. Each benchmark is a seqio.Task over a
prepared TFDS dataset, usable from any decoder-only model through
`seqio.Evaluator(..., feature_converter=seqio.PrefixLMFeatureConverter(pack=False))` and a predict
function that decodes greedily from "inputs" (stopping at `stop_ids(vocabulary)`).

  from data_pipelines import downstream
  names = downstream.register_paper_tasks(tfds_data_dir="/data/tfds")   # + "downstream_paper"
  downstream.check_prepared(names)        # fails fast, naming the `tfds build ...` command

Benchmarks (task `{prefix}_<key>`; every task's eval split is called "validation"):

  key                  TFDS name                             evaluated   one-shot pool
  triviaqa             trivia_qa/unfiltered.nocontext:1.1.0  validation  train
  natural_questions    natural_questions_open:1.0.0          validation  train
  web_questions        web_questions:1.0.0                   test        train
  squad_v2             squad/v2.0:3.0.0                      validation  train (answerable)
  lambada              lambada:1.0.0                         test        train (= LAMBADA dev)

TriviaQA uses `unfiltered.nocontext` rather than `rc.nocontext`: the unfiltered set is the one
TriviaQA's authors released for open-domain QA (its questions are not filtered on whether the
retrieved evidence holds the answer), which is what a closed-book prompt is; it has one example
per question (rc repeats questions across its web and Wikipedia files); its test split has no
answers, so its validation split (11,313 questions) is evaluated; `nocontext` leaves out the
evidence documents, which the prompt never shows, making a far smaller build. WebQuestions and
LAMBADA have no validation split: their test split is evaluated, under the name "validation", so
one Evaluator split covers the whole mixture.

Features: "inputs" (the one-shot prompt, no EOS), "targets" (" " + the first gold answer, EOS) and
ANSWERS = "answers" (1-D tf.string: all gold aliases). "answers" is not an output feature, so it
passes through Task.get_dataset untouched and reaches the postprocessor as `example["answers"]`;
the feature converter ignores it. Targets start with the space that follows "A:" in the shot, so
that inputs + targets is exactly the shot's own format. Sequence lengths: "inputs", "targets".

One-shot prompts: the shot is one of `num_shots` examples (with a non-empty answer) spread evenly over
the shot split (every n/(2 num_shots)-th example), read when the dataset is first built. Its index is
`tf.strings.to_hash_bucket_fast(key, num_shots)` of the evaluated example's key (question, or the
LAMBADA passage), moved on to the next pool entry while that entry's key equals the example's: same
example, same shot, in every run and process, and never the evaluated example itself. Prompts are
`str.format` templates over the example's fields and the shot's (`shot_` + field); prompts longer
than the "inputs" length keep their last tokens (the question is at the end).

Scoring: `exact_match` = 100 x mean over examples of the max over gold aliases of
normalize_answer(prediction) == normalize_answer(alias), as in the SQuAD / TriviaQA scripts.
Predictions are cut at the first newline (LAMBADA: the first word of that line) and stripped.

Nothing downloads at run time: sources read prepared TFDS data only (read_only) and a missing
dataset fails before any compute with the `tfds build ...` command that prepares it.
"""
import dataclasses
import functools
import logging
import os
import re
import string
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import gin
import numpy as np
import seqio
import tensorflow as tf

from data_pipelines import vocab as vocab_lib

DESCRIPTION = (
    "One-shot generative exact match (%) on the paper's five benchmarks: TriviaQA (unfiltered, "
    "validation), NaturalQuestions (NQ-open, validation), WebQuestions (test), SQuADv2 "
    "(validation) and LAMBADA (test), the shot drawn from each train split; greedy answers cut "
    "at the first newline (LAMBADA: the first word), SQuAD-normalized, max over gold aliases.")
ANSWERS = "answers"
EVAL_SPLIT = "validation"
STOP_STRING = "\n"
DEFAULT_NUM_SHOTS = 64
METRIC_KEY = "exact_match"

# Closed-book QA as in GPT-3 / PaLM: "Q: ...\nA: <answer>", one solved example first.
CLOSED_BOOK_QA_PROMPT = "Q: {shot_question}\nA: {shot_answer}\n\nQ: {question}\nA:"
TRIVIAQA_PROMPT = CLOSED_BOOK_QA_PROMPT
NATURAL_QUESTIONS_PROMPT = CLOSED_BOOK_QA_PROMPT
WEB_QUESTIONS_PROMPT = CLOSED_BOOK_QA_PROMPT
# Reading comprehension in GPT-3's SQuADv2 layout (title, background passage, question): the shot
# is another article's passage, question and answer.
SQUAD_V2_PROMPT = ("Title: {shot_title}\n\nBackground: {shot_context}\n\nQ: {shot_question}\n\n"
                   "A: {shot_answer}\n\n\nTitle: {title}\n\nBackground: {context}\n\n"
                   "Q: {question}\n\nA:")
# LAMBADA: a passage without its last word -> that word; the shot is another complete passage.
LAMBADA_PROMPT = "{shot_passage} {shot_answer}\n\n{passage}"

# --------------------------------------------------------------------------------- scoring

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
  """SQuAD normalization: lowercase, drop punctuation and articles, collapse whitespace."""
  s = s.lower()
  s = "".join(ch for ch in s if ch not in _PUNCTUATION)
  s = _ARTICLES_RE.sub(" ", s)
  return " ".join(s.split())


def _aliases(target) -> list[str]:
  if isinstance(target, (str, bytes)):
    target = [target]
  return [a.decode("utf-8", "replace") if isinstance(a, bytes) else str(a) for a in target]


def exact_match(targets: Sequence[Any], predictions: Sequence[str]) -> dict[str, float]:
  """seqio metric_fn: {"exact_match": percentage (0-100)}.

  Args:
    targets: per example, the list of gold aliases (a bare string counts as one alias). A
      SQuADv2 unanswerable question has gold [""], as in the official v2 script.
    predictions: per example, the postprocessed prediction.
  """
  if len(targets) != len(predictions):
    raise ValueError(f"exact_match: {len(targets)} targets but {len(predictions)} predictions.")
  if not targets:
    return {METRIC_KEY: 0.0}
  hits, unanswerable = [], []
  for target, pred in zip(targets, predictions):
    p = normalize_answer(_aliases(pred)[0])
    hits.append(max((p == normalize_answer(a) for a in _aliases(target)), default=False))
    unanswerable.append(_aliases(target) == [""])
  out = {METRIC_KEY: 100.0 * float(np.mean(hits))}
  hits, unanswerable = np.asarray(hits, bool), np.asarray(unanswerable, bool)
  if unanswerable.any() and not unanswerable.all():  # SQuADv2: also HasAns and NoAns, as its script
    out[f"{METRIC_KEY}_has_answer"] = 100.0 * float(hits[~unanswerable].mean())
    out[f"{METRIC_KEY}_no_answer"] = 100.0 * float(hits[unanswerable].mean())
  return out


def _to_str(x) -> str:
  return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _gold(output, example) -> list[str]:
  if example is not None and ANSWERS in example:
    return _aliases(list(np.asarray(example[ANSWERS]).reshape(-1)))
  return [_to_str(output).strip()]


def cut_prediction(output, stops: str = STOP_STRING) -> str:
  """The decoded text up to the first character of `stops`, stripped."""
  text = _to_str(output)
  cut = min((i for i in (text.find(c) for c in stops) if i >= 0), default=len(text))
  return text[:cut].strip()


# The next turn of the QA templates ("\n\nQ:") as a vocabulary that drops newlines decodes
# it: predictions are cut there too, so that such a vocabulary still scores.
NEXT_TURN = " Q:"


def postprocess_answer(output, example=None, is_target=False):
  """Task.postprocess_fn: targets -> gold aliases (example["answers"]); predictions -> the
  decoded text cut at the first newline (or the next " Q:"), stripped."""
  if is_target:
    return _gold(output, example)
  text = _to_str(output)
  turn = text.find(NEXT_TURN)
  return cut_prediction(text[:turn] if turn >= 0 else text)


def postprocess_word(output, example=None, is_target=False):
  """As postprocess_answer, but a prediction is the first word of its first line (LAMBADA)."""
  if is_target:
    return _gold(output, example)
  words = cut_prediction(output).split()
  return words[0] if words else ""


def keeps_newlines(vocabulary: Optional[seqio.Vocabulary] = None) -> bool:
  """Whether text with newlines survives encode/decode (bytes, and SentencePiece models from
  data_pipelines.train_spm; SentencePiece's defaults turn newlines into spaces)."""
  vocabulary = vocab_lib.get_vocabulary(vocabulary)
  text = "a\nb\n\nc"
  return vocabulary.decode(list(vocabulary.encode(text))) == text


def stop_ids(vocabulary: Optional[seqio.Vocabulary] = None, stops: str = STOP_STRING) -> list[int]:
  """Token ids that end a generated answer: EOS, and the token of each character of `stops`
  that the vocabulary has (bytes; SentencePiece with "\n" as a piece, after its word-boundary
  piece)."""
  vocabulary = vocab_lib.get_vocabulary(vocabulary)
  out = [int(vocabulary.eos_id)]
  for char in stops:
    for i in vocabulary.encode(char):
      if vocabulary.decode([int(i)]) == char and int(i) not in out:
        out.append(int(i))
  return out


# ------------------------------------------------------------------------------ benchmarks


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """How a dataset's examples become one-shot prompts.

  Attributes:
    key: short name; the task is `{prefix}_{key}`.
    fields_fn: raw example -> {prompt fields..., "answer": first gold (scalar), "answers": all
      gold (1-D)}, all tf.string.
    prompt: default template (fields of the example, and of the shot with the prefix "shot_").
    prompt_fields: the example's fields a template may use (never its answer).
    key_field: hashed to choose the shot.
    group_field: the shot's value of this field must differ from the example's.
    target_prefix: prepended to a non-empty target (the separator after the prompt).
    postprocess_fn: the Task's postprocessor.
    stops: characters that end a generated answer (decoding stops at their tokens).
    tfds_name, eval_split, shot_split: the prepared TFDS dataset (None: not a TFDS task).
  """
  key: str
  fields_fn: Callable[[Mapping[str, Any]], dict]
  prompt: str
  prompt_fields: tuple[str, ...] = ("question",)
  key_field: str = "question"
  group_field: Optional[str] = None
  target_prefix: str = " "
  postprocess_fn: Callable[..., Any] = postprocess_answer
  stops: str = STOP_STRING
  tfds_name: Optional[str] = None
  eval_split: Optional[str] = None
  shot_split: Optional[str] = None

  @property
  def group(self) -> str:
    return self.group_field or self.key_field


def _first_or_empty(values: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(first value or "", values or [""]) of a 1-D string tensor."""
  padded = tf.concat([values, [""]], 0)
  answers = tf.cond(tf.size(values) > 0, lambda: values, lambda: tf.constant([""]))
  return padded[0], answers


def _qa_fields(question: tf.Tensor, answers: tf.Tensor) -> dict:
  first, answers = _first_or_empty(answers)
  return {"question": question, "answer": first, ANSWERS: answers}


def _triviaqa_fields(ex):
  # The canonical value first, then its aliases (the official script scores all of them).
  answers = tf.concat([[ex["answer"]["value"]], ex["answer"]["aliases"]], 0)
  return _qa_fields(ex["question"], answers)


def _natural_questions_fields(ex):
  return _qa_fields(ex["question"], ex["answer"])


def _web_questions_fields(ex):
  return _qa_fields(ex["question"], ex["answers"])


def _squad_v2_fields(ex):
  # Unanswerable questions get gold [""], as the official SQuAD v2.0 script does: only an empty
  # prediction matches them.
  out = _qa_fields(ex["question"], ex["answers"]["text"])
  out.update(title=ex["title"], context=ex["context"])
  return out


def _lambada_fields(ex):
  words = tf.concat([[""], tf.strings.split(tf.strings.strip(ex["passage"]))], 0)
  last = words[-1]
  return {
      "passage": tf.strings.reduce_join(words[1:-1], separator=" "),
      "answer": last,
      ANSWERS: tf.reshape(last, [1]),
  }


SQUAD_V2_FIELDS = ("title", "context", "question")
LAMBADA_FIELDS = ("passage",)

BENCHMARKS = {
    b.key: b for b in (
        Benchmark("triviaqa", _triviaqa_fields, TRIVIAQA_PROMPT,
                  tfds_name="trivia_qa/unfiltered.nocontext:1.1.0", eval_split="validation",
                  shot_split="train"),
        Benchmark("natural_questions", _natural_questions_fields, NATURAL_QUESTIONS_PROMPT,
                  tfds_name="natural_questions_open:1.0.0", eval_split="validation",
                  shot_split="train"),
        Benchmark("web_questions", _web_questions_fields, WEB_QUESTIONS_PROMPT,
                  tfds_name="web_questions:1.0.0", eval_split="test", shot_split="train"),
        Benchmark("squad_v2", _squad_v2_fields, SQUAD_V2_PROMPT, SQUAD_V2_FIELDS,
                  tfds_name="squad/v2.0:3.0.0", eval_split="validation", shot_split="train"),
        Benchmark("lambada", _lambada_fields, LAMBADA_PROMPT, LAMBADA_FIELDS, key_field="passage",
                  postprocess_fn=postprocess_word, tfds_name="lambada:1.0.0", eval_split="test",
                  shot_split="train"),
    )
}


def get_benchmark(benchmark: Union[str, Benchmark]) -> Benchmark:
  if isinstance(benchmark, Benchmark):
    return benchmark
  if benchmark not in BENCHMARKS:
    raise ValueError(f"Unknown benchmark {benchmark!r}; known: {sorted(BENCHMARKS)}.")
  return BENCHMARKS[benchmark]


# --------------------------------------------------------------------------------- prompts


def _template_fields(template: str) -> list[tuple[str, Optional[str]]]:
  """[(literal text, field or None)] of a str.format template (plain field names only)."""
  out = []
  for literal, field, spec, conversion in string.Formatter().parse(template):
    if field is not None and (spec or conversion or not field.isidentifier()):
      raise ValueError(f"Prompt {template!r}: use plain fields like {{question}}, got {field!r}.")
    out.append((literal, field))
  return out


def check_prompt(template: str, benchmark: Union[str, Benchmark]) -> None:
  """Raises ValueError if the template uses a field the benchmark does not provide (or the
  evaluated example's own answer)."""
  bm = get_benchmark(benchmark)
  allowed = set(bm.prompt_fields)
  allowed |= {f"shot_{f}" for f in bm.prompt_fields + ("answer",)}
  used = {f for _, f in _template_fields(template) if f is not None}
  if used - allowed:
    raise ValueError(f"Prompt for {bm.key!r} uses {sorted(used - allowed)}; allowed fields: "
                     f"{sorted(allowed)}.")


def _pool_fields(bm: Benchmark) -> tuple[str, ...]:
  return tuple(dict.fromkeys(bm.prompt_fields + ("answer", bm.key_field, bm.group)))


def shot_pool_from_dataset(ds: tf.data.Dataset, benchmark: Union[str, Benchmark],
                           num_shots: int = DEFAULT_NUM_SHOTS) -> dict[str, list[str]]:
  """The first `num_shots` examples of raw `ds` with a non-empty answer: {field: [values]}."""
  bm = get_benchmark(benchmark)
  fields = _pool_fields(bm)
  ds = ds.map(lambda ex: {f: bm.fields_fn(ex)[f] for f in fields})
  ds = ds.filter(lambda ex: tf.strings.length(ex["answer"]) > 0).take(num_shots)
  pool = {f: [] for f in fields}
  for ex in ds.as_numpy_iterator():
    for f in fields:
      pool[f].append(_to_str(ex[f]))
  n_groups = len(set(pool[bm.group]))
  if n_groups < 2:
    raise ValueError(f"{bm.key}: the one-shot pool needs at least 2 distinct "
                     f"{bm.group!r} values, found {n_groups} in {len(pool[bm.group])} examples.")
  return pool


def _shot_index(key: tf.Tensor, group: tf.Tensor, pool_groups: tf.Tensor, n: int) -> tf.Tensor:
  """hash(key) mod n, moved on to the next entry whose group differs from the example's."""
  start = tf.strings.to_hash_bucket_fast(key, n)
  order = (start + tf.range(n, dtype=tf.int64)) % n
  ok = tf.not_equal(tf.gather(pool_groups, order), group)
  return tf.gather(order, tf.argmax(tf.cast(ok, tf.int32)))


def one_shot_prompt(ds: tf.data.Dataset, *, benchmark: Union[str, Benchmark],
                    pool_fn: Callable[[], Mapping[str, Sequence[str]]],
                    prompt: Optional[str] = None) -> tf.data.Dataset:
  """Raw examples -> {"inputs": prompt, "targets": prefix + first gold, "answers": gold}.

  Args:
    ds: raw examples (as the dataset's TFDS builder yields them).
    benchmark: a Benchmark or its key.
    pool_fn: returns the shot pool ({field: [values]}); called once, when this runs.
    prompt: template; default the benchmark's.
  """
  bm = get_benchmark(benchmark)
  template = prompt or bm.prompt
  check_prompt(template, bm)
  pieces = _template_fields(template)
  pool = {f: tf.constant(list(v), tf.string) for f, v in pool_fn().items()}
  n = len(pool[bm.group])

  def _fn(raw):
    ex = bm.fields_fn(raw)
    j = _shot_index(ex[bm.key_field], ex[bm.group], pool[bm.group], n)
    values = dict(ex, **{f"shot_{f}": v[j] for f, v in pool.items()})
    parts = []
    for literal, field in pieces:
      parts.append(tf.constant(literal))
      if field is not None:
        parts.append(values[field])
    answer = ex["answer"]
    prefix = tf.where(tf.strings.length(answer) > 0, bm.target_prefix, "")
    return {"inputs": tf.strings.join(parts), "targets": prefix + answer, ANSWERS: ex[ANSWERS]}

  return ds.map(_fn, num_parallel_calls=tf.data.AUTOTUNE)


def truncate_inputs_left(ds: tf.data.Dataset,
                         sequence_length: Optional[Mapping[str, int]] = None) -> tf.data.Dataset:
  """Keeps the last sequence_length["inputs"] tokens of "inputs" (no-op without a length)."""
  if not sequence_length or not sequence_length.get("inputs"):
    return ds
  n = int(sequence_length["inputs"])

  def _fn(ex):
    ex = dict(ex)
    ex["inputs"] = ex["inputs"][-n:]
    return ex

  return ds.map(_fn, num_parallel_calls=tf.data.AUTOTUNE)


# ------------------------------------------------------------------------ prepared data


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset a downstream task reads is not prepared (nothing downloads at run time)."""


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def _data_dir_root(data_dir: Optional[str]) -> str:
  if data_dir:
    return data_dir
  from tensorflow_datasets.core import constants  # pylint: disable=g-import-not-at-top
  return os.environ.get("TFDS_DATA_DIR") or constants.DATA_DIR


def build_command(tfds_name: str, data_dir: Optional[str] = None) -> str:
  """The command that prepares a TFDS dataset (run once, with network access)."""
  return f"tfds build {tfds_name} --data_dir={_data_dir_root(data_dir)}"


def missing_tfds(tfds_name: str, data_dir: Optional[str], splits: Sequence[str]) -> Optional[str]:
  """None if prepared with all `splits`, else why not (reads metadata only; downloads nothing)."""
  builder = _tfds().builder(tfds_name, data_dir=data_dir)
  if not builder.is_prepared():
    return f"not prepared in {_data_dir_root(data_dir)}"
  missing = [s for s in splits if s not in builder.info.splits]
  if missing:
    return f"prepared without split(s) {missing} (has {list(builder.info.splits)})"
  return None


def _not_prepared_message(problems: Sequence[tuple[str, str, str, Optional[str]]]) -> str:
  lines = [
      "Downstream evaluation reads prepared TFDS datasets only; nothing is downloaded at run "
      "time. Missing:"
  ]
  for task, tfds_name, why, _ in problems:
    lines.append(f"  {tfds_name} (task {task}): {why}")
  lines.append("Prepare them once (with network access), then rerun:")
  for cmd in dict.fromkeys(build_command(p[1], p[3]) for p in problems):
    lines.append(f"  {cmd}")
  return "\n".join(lines)


_TASK_TFDS: dict[str, dict[str, Any]] = {}  # task name -> its TFDS dataset and splits


def _subtask_names(names: Union[str, Sequence[str]]) -> list[str]:
  out = []
  for name in [names] if isinstance(names, str) else names:
    provider = seqio.get_mixture_or_task(name)
    out.extend(t.name for t in seqio.get_subtasks(provider))
  return list(dict.fromkeys(out))


def check_prepared(task_names: Union[str, Sequence[str]], tfds_data_dir: Optional[str] = None):
  """Raises DatasetNotPreparedError (a FileNotFoundError) naming the `tfds build` command of every
  TFDS dataset the tasks (or mixtures) read that is not prepared. Tasks without TFDS data (the
  demo tasks) pass. tfds_data_dir: look there instead of where the tasks were registered."""
  problems = []
  for task in _subtask_names(task_names):
    if task not in _TASK_TFDS:
      continue
    info = _TASK_TFDS[task]
    data_dir = tfds_data_dir or info["data_dir"]
    why = missing_tfds(info["tfds_name"], data_dir, info["splits"])
    if why:
      problems.append((task, info["tfds_name"], why, data_dir))
  if problems:
    raise DatasetNotPreparedError(_not_prepared_message(problems))


class PreparedTfdsSource(seqio.TfdsDataSource):
  """A read-only seqio.TfdsDataSource that checks the data is prepared before reading it."""

  def __init__(self, tfds_name: str, *, tfds_data_dir: Optional[str], splits: Mapping[str, str],
               extra_splits: Sequence[str] = (), task_name: str = ""):
    super().__init__(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir, splits=dict(splits),
                     read_only=True)
    self._needed = list(dict.fromkeys(list(splits.values()) + list(extra_splits)))
    self._check_args = (task_name, tfds_name, tfds_data_dir)
    self._checked = False

  def check(self) -> None:
    if self._checked:
      return
    task, name, data_dir = self._check_args
    why = missing_tfds(name, data_dir, self._needed)
    if why:
      raise DatasetNotPreparedError(_not_prepared_message([(task, name, why, data_dir)]))
    self._checked = True

  def get_dataset(self, split=None, shuffle=True, seed=None, shard_info=None, **kwargs):
    self.check()
    return super().get_dataset(split, shuffle, seed, shard_info, **kwargs)

  def num_input_examples(self, split: str):
    self.check()
    return super().num_input_examples(split)

  def list_shards(self, split: str):
    self.check()
    return super().list_shards(split)


@functools.lru_cache(maxsize=None)
def _tfds_pool(benchmark_key: str, tfds_name: str, data_dir: Optional[str], split: str,
               num_shots: int) -> dict[str, list[str]]:
  why = missing_tfds(tfds_name, data_dir, [split])
  if why:
    raise DatasetNotPreparedError(
        _not_prepared_message([(benchmark_key, tfds_name, why, data_dir)]))
  builder = _tfds().builder(tfds_name, data_dir=data_dir)
  ds = builder.as_dataset(split=split, shuffle_files=False)
  # Spread over the split (SQuAD's train split is ordered by article): every stride-th example,
  # with room for the ones without an answer that the pool skips.
  stride = max(1, builder.info.splits[split].num_examples // (2 * num_shots))
  pool = shot_pool_from_dataset(ds.shard(stride, 0), benchmark_key, num_shots)
  logging.info("%s: one-shot pool of %d examples from %s[%s].", benchmark_key, len(pool["answer"]),
               tfds_name, split)
  return pool


def load_tfds_pool(benchmark: Union[str, Benchmark], tfds_data_dir: Optional[str] = None,
                   num_shots: int = DEFAULT_NUM_SHOTS) -> dict[str, list[str]]:
  """The benchmark's one-shot pool from its prepared shot split (cached per process)."""
  bm = get_benchmark(benchmark)
  return _tfds_pool(bm.key, bm.tfds_name, tfds_data_dir, bm.shot_split, num_shots)


# ---------------------------------------------------------------------------- registration


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  return {
      "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=False, dtype=tf.int32),
      "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True, dtype=tf.int32),
  }


_TASK_STOPS: dict[str, str] = {}  # task name -> its benchmark's stop characters


def task_stops(task_name: str) -> str:
  """The characters that end a registered one-shot task's answers (default: newline)."""
  return _TASK_STOPS.get(task_name, STOP_STRING)


def register_one_shot_task(name: str, source: seqio.DataSource, *, benchmark: Union[str, Benchmark],
                           pool_fn: Callable[[], Mapping[str, Sequence[str]]],
                           vocabulary: Optional[seqio.Vocabulary] = None,
                           prompt: Optional[str] = None) -> seqio.Task:
  """Registers (replacing any of that name) a one-shot generative task over `source`."""
  bm = get_benchmark(benchmark)
  check_prompt(prompt or bm.prompt, bm)
  seqio.TaskRegistry.remove(name)
  _TASK_TFDS.pop(name, None)
  _TASK_STOPS[name] = bm.stops
  return seqio.TaskRegistry.add(
      name, source=source, preprocessors=[
          functools.partial(one_shot_prompt, benchmark=bm, pool_fn=pool_fn, prompt=prompt),
          seqio.preprocessors.tokenize,
          seqio.preprocessors.append_eos,
          truncate_inputs_left,
      ], output_features=output_features(vocab_lib.get_vocabulary(vocabulary)),
      postprocess_fn=bm.postprocess_fn, metric_fns=[exact_match])


_REGISTRATIONS: dict[str, tuple] = {}  # mixture name -> the arguments it was registered with


def already_registered(mixture: str, key: tuple, task_names: Sequence[str]) -> bool:
  """True when `mixture` and its tasks are registered with these arguments (`key`)."""
  return (_REGISTRATIONS.get(mixture) == key and mixture in seqio.MixtureRegistry.names() and
          all(t in seqio.TaskRegistry.names() for t in task_names))


def register_mixture(mixture: str, key: tuple, task_names: Sequence[str]) -> None:
  seqio.MixtureRegistry.remove(mixture)
  seqio.MixtureRegistry.add(mixture, [(t, 1.0) for t in task_names])
  _REGISTRATIONS[mixture] = key


@gin.configurable
def register_paper_tasks(vocabulary=None, *, tfds_data_dir: Optional[str] = None,
                         prefix: str = "downstream", prompts: Optional[Mapping[str, str]] = None,
                         num_shots: int = DEFAULT_NUM_SHOTS,
                         benchmarks: Optional[Sequence[str]] = None) -> list[str]:
  """Registers `{prefix}_<benchmark>` tasks and the mixture `{prefix}_paper` (equal rates).

  Reads no data: the shot pools load when a dataset is first built. Re-registering with the same
  arguments is a no-op; other arguments replace the tasks.

  Args:
    vocabulary: a seqio.Vocabulary or vocab.get_vocabulary spec (default: bytes).
    tfds_data_dir: where the TFDS datasets are prepared (default: TFDS's, $TFDS_DATA_DIR).
    prefix: task-name prefix.
    prompts: {benchmark key: template} overriding the module's *_PROMPT defaults.
    num_shots: size of each one-shot pool.
    benchmarks: keys of BENCHMARKS to register (default: all five).

  Returns:
    The task names, in BENCHMARKS order.
  """
  vocabulary = vocab_lib.get_vocabulary(vocabulary)
  keys = list(benchmarks or BENCHMARKS)
  prompts = dict(prompts or {})
  unknown = sorted((set(keys) | set(prompts)) - set(BENCHMARKS))
  if unknown:
    raise ValueError(f"Unknown benchmark(s) {unknown}; known: {sorted(BENCHMARKS)}.")
  names = [f"{prefix}_{k}" for k in keys]
  mixture = f"{prefix}_paper"
  key = (vocab_lib.vocab_key(vocabulary), tfds_data_dir, tuple(keys),
         tuple(sorted(prompts.items())), int(num_shots))
  if already_registered(mixture, key, names):
    return names
  for k, name in zip(keys, names):
    bm = BENCHMARKS[k]
    source = PreparedTfdsSource(bm.tfds_name, tfds_data_dir=tfds_data_dir,
                                splits={EVAL_SPLIT: bm.eval_split}, extra_splits=[bm.shot_split],
                                task_name=name)
    pool_fn = functools.partial(load_tfds_pool, k, tfds_data_dir, int(num_shots))
    register_one_shot_task(name, source, benchmark=bm, pool_fn=pool_fn, vocabulary=vocabulary,
                           prompt=prompts.get(k))
    _TASK_TFDS[name] = {
        "tfds_name": bm.tfds_name,
        "data_dir": tfds_data_dir,
        "splits": [bm.eval_split, bm.shot_split]
    }
  register_mixture(mixture, key, names)
  return names
