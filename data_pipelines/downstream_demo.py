r"""Offline downstream tasks for the demo: one-shot generative analogues of the paper's benchmarks.

`make demo` trains tiny byte-level models on the embedded demo corpus (data_pipelines.demo), with
no network access, so the paper's TFDS benchmarks (data_pipelines.downstream) are out of reach.
These two tasks reuse that module's machinery (one-shot prompt, shot chosen by hash from a pool,
left-truncated inputs, the "answers" feature, exact_match) on data derived from the built demo
corpus. They were chosen as analogues of the paper's two task types, by rules fixed in advance;
nothing here is tuned to make any model or domain weighting score well.

downstream_demo_unicode: closed-book fact recall, as TriviaQA / NaturalQuestions / WebQuestions.
  Name a Unicode code point. The structured domain trains on rows
  "U+XXXX<TAB>NAME<TAB>category<TAB>..."; as in closed-book QA, the answer is knowledge present in
  the pretraining data: the code points come from the structured domain's *train* documents. The
  prompt is in the corpus's own row format, the shot being another code point's row:
  "U+00C8\tLATIN CAPITAL LETTER E WITH GRAVE\nU+00E9\t" -> "LATIN SMALL LETTER E WITH ACUTE".
  Predictions are cut at the first tab or newline. Sample: the rows ranked by sha256 of
  "U+XXXX"; the first 200 are evaluated, the next 32 form the shot pool. (normalize_answer drops
  the articles "a"/"an", so "... LETTER A" also accepts "... LETTER".)

downstream_demo_cloze: last-word prediction, as LAMBADA. Documents: the *validation* split (held
  out from training) of the natural-language domains docs, legal and prose. Each line of a
  document whose last word (trailing punctuation removed) is alphabetic, at least 3 letters long
  and not an article ("the" normalizes to nothing) gives a candidate: the target is that word, the
  passage the last whole words of the document text before it (whitespace collapsed) that fit in
  CLOZE_PASSAGE_CHARS = 40 characters. The demo models train on 128-byte sequences, and this size
  keeps the one-shot prompt (shot passage + word, then the passage) and its answer within them.
  Attribution lines ("-- Author") give no candidate, nor do lines within the first 40 characters
  of a document. Candidates are ranked by sha256 of (domain, document, passage, word); the first
  200 are evaluated, the next 32 form the shot pool, and a shot always comes from another document
  than the evaluated passage (so it never shows the evaluated word). The prediction is the first
  generated word.

Both read the built corpus (demo.build_corpus, demo.corpus_dir) when a dataset is first built, and
are deterministic (sha256 ranks, FarmHash shot choice). The eval split is called "validation". A
smaller corpus (demo.configure) with fewer than 200 + 32 candidates evaluates all but the 32
shots. Importing this module registers both tasks and the mixture `downstream_demo` in the byte
vocabulary; register_demo_tasks(vocabulary) registers them in another.
"""
import functools
import hashlib
import os
import re
from typing import Mapping, Optional

import gin
import seqio
import tensorflow as tf

from data_pipelines import demo
from data_pipelines import downstream
from data_pipelines import sources
from data_pipelines import vocab as vocab_lib

DESCRIPTION = (
    "Two offline one-shot generative tasks built from the demo corpus, as analogues of the "
    "paper's task types, scored by exact match (%): unicode, closed-book recall of a code "
    "point's name from the structured domain's training rows (prompted in the corpus's row "
    "format; like TriviaQA, NaturalQuestions, WebQuestions); cloze, the word ending a line of "
    "held-out docs/legal/prose text after a 40-character passage (like LAMBADA). 200 examples "
    "each, a fixed sample by sha256 rank.")
NUM_EXAMPLES = 200
NUM_SHOTS = 32
# The corpus's row format: the shot's row (code point, name), then the code point asked about.
UNICODE_PROMPT = "{shot_question}\t{shot_answer}\n{question}\t"
# LAMBADA's format (downstream.LAMBADA_PROMPT): a complete passage, then one without its last word.
CLOZE_PROMPT = downstream.LAMBADA_PROMPT
CLOZE_DOMAINS = ("docs", "legal", "prose")
# The demo models train on 128-byte sequences (gin/pipelines/demo_cpu.gin): a 40-character
# passage keeps a one-shot cloze prompt and its answer within them (see the module docstring).
CLOZE_PASSAGE_CHARS = 40
_CLOZE_WORD_RE = re.compile(r"[A-Za-z]{3,}")
_TRAILING_PUNCT = ".,;:!?\"')]}\u2019\u201d"
_ROW_RE = re.compile(r"U\+[0-9A-F]{4,6}")


def postprocess_field(output, example=None, is_target=False):
  """As downstream.postprocess_answer, but a prediction ends at the first tab or newline."""
  if is_target:
    return downstream.postprocess_answer(output, example, is_target=True)
  return downstream.cut_prediction(output, "\t\n")


def _fields(ex):
  return {k: v for k, v in ex.items()}


UNICODE = downstream.Benchmark("demo_unicode", _fields, UNICODE_PROMPT, target_prefix="",
                               postprocess_fn=postprocess_field, stops="\t\n")
CLOZE = downstream.Benchmark("demo_cloze", _fields, CLOZE_PROMPT, prompt_fields=("passage",),
                             key_field="passage", group_field="doc",
                             postprocess_fn=downstream.postprocess_word)


def _sha(*parts: str) -> str:
  return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()


def _split_sample(candidates: list, rank_key, num_examples: int, num_shots: int, what: str):
  """(evaluated, shot pool): the first num_examples by rank, then the next num_shots."""
  ranked = sorted(candidates, key=rank_key)
  if len(ranked) <= num_shots:
    raise ValueError(f"{what}: only {len(ranked)} candidates in the demo corpus, need more than "
                     f"{num_shots}; build a larger corpus (demo.configure).")
  n_eval = min(num_examples, len(ranked) - num_shots)
  return ranked[:n_eval], ranked[n_eval:n_eval + num_shots]


def corpus_documents(domain: str, split: str):
  """The texts of a split of a demo domain, from the built corpus (built first if needed)."""
  demo.build_corpus()
  for obj in sources.iter_jsonl(os.path.join(demo.corpus_dir(), f"{domain}.{split}.jsonl")):
    yield obj["text"]


@functools.lru_cache(maxsize=8)
def unicode_examples(corpus: str, num_examples: int = NUM_EXAMPLES,
                     num_shots: int = NUM_SHOTS) -> tuple[list[dict], list[dict]]:
  """(evaluated, shot pool) of the code-point task for the corpus at `corpus` (its cache key)."""
  del corpus  # Cache key: demo.corpus_dir().
  rows = {}
  for text in corpus_documents("structured", "train"):
    for line in text.split("\n"):
      parts = line.split("\t")
      if len(parts) >= 2 and _ROW_RE.fullmatch(parts[0]) and parts[1]:
        rows.setdefault(parts[0], parts[1])
  cands = [{"question": q, "answer": a, "answers": [a]} for q, a in rows.items()]
  return _split_sample(cands, lambda c: _sha(c["question"]), num_examples, num_shots,
                       "downstream_demo_unicode")


def _window(words: list[str], max_chars: int) -> str:
  """The longest run of last words whose " "-joined text has at most max_chars characters."""
  out, size = [], -1
  for w in reversed(words):
    if size + 1 + len(w) > max_chars:
      break
    out.append(w)
    size += 1 + len(w)
  return " ".join(reversed(out))


def _cloze_candidates(domain: str, doc_index: int, text: str) -> list[dict]:
  """One candidate per line whose last word is a word (see the module docstring)."""
  out, before, n_chars = [], [], 0
  doc = f"{domain}:{doc_index}"
  for line in text.split("\n"):
    words = line.split()
    if not words:
      continue
    word = words[-1].rstrip(_TRAILING_PUNCT)
    context = before[-CLOZE_PASSAGE_CHARS:] + words[:-1]  # more words than the window holds
    n_before = n_chars + sum(len(w) + 1 for w in words[:-1])
    passage = _window(context, CLOZE_PASSAGE_CHARS)
    if (_CLOZE_WORD_RE.fullmatch(word) and downstream.normalize_answer(word) and passage and
        n_before > CLOZE_PASSAGE_CHARS and not words[0].startswith("--")):
      out.append({"passage": passage, "answer": word, "answers": [word], "doc": doc})
    before.extend(words)
    n_chars += sum(len(w) + 1 for w in words)
  return out


@functools.lru_cache(maxsize=8)
def cloze_examples(corpus: str, num_examples: int = NUM_EXAMPLES,
                   num_shots: int = NUM_SHOTS) -> tuple[list[dict], list[dict]]:
  """(evaluated, shot pool) of the cloze task for the corpus at `corpus` (its cache key)."""
  del corpus  # Cache key: demo.corpus_dir().
  cands = []
  for domain in CLOZE_DOMAINS:
    for i, text in enumerate(corpus_documents(domain, "validation")):
      cands.extend(_cloze_candidates(domain, i, text))
  ev, pool = _split_sample(cands, lambda c: _sha(c["doc"], c["passage"], c["answer"]), num_examples,
                           num_shots, "downstream_demo_cloze")
  if len({c["doc"] for c in pool}) < 2:
    raise ValueError("downstream_demo_cloze: the shot pool needs passages of 2+ documents.")
  return ev, pool


_EXAMPLES = {"unicode": unicode_examples, "cloze": cloze_examples}


def _signature(example: Mapping) -> dict:
  return {k: tf.TensorSpec([None] if k == downstream.ANSWERS else [], tf.string) for k in example}


def _source(kind: str, num_examples: int, num_shots: int) -> seqio.FunctionDataSource:
  """An in-memory source of the evaluated examples (split "validation")."""

  def dataset_fn(split, shuffle_files=False, seed=None):
    del shuffle_files, seed  # Fixed order; nothing random.
    if split != downstream.EVAL_SPLIT:
      raise ValueError(f"Unknown split {split!r}; available: [{downstream.EVAL_SPLIT!r}].")
    examples, _ = _EXAMPLES[kind](demo.corpus_dir(), num_examples, num_shots)
    return tf.data.Dataset.from_generator(lambda: iter(examples),
                                          output_signature=_signature(examples[0]))

  return seqio.FunctionDataSource(dataset_fn, splits=[downstream.EVAL_SPLIT])


def _pool(kind: str, num_examples: int, num_shots: int) -> dict[str, list[str]]:
  _, pool = _EXAMPLES[kind](demo.corpus_dir(), num_examples, num_shots)
  return {k: [ex[k] for ex in pool] for k in pool[0] if k != downstream.ANSWERS}


@gin.configurable
def register_demo_tasks(vocabulary=None, *, prefix: str = "downstream_demo",
                        num_examples: int = NUM_EXAMPLES, num_shots: int = NUM_SHOTS,
                        prompts: Optional[Mapping[str, str]] = None) -> list[str]:
  """Registers `{prefix}_unicode`, `{prefix}_cloze` and the mixture `{prefix}` (equal rates).

  Reads no data (the corpus is read when a dataset is first built). Re-registering with the same
  arguments is a no-op. prompts: {"unicode"|"cloze": template} overriding the defaults.
  Returns the task names.
  """
  vocabulary = vocab_lib.get_vocabulary(vocabulary)
  prompts = dict(prompts or {})
  benchmarks = {"unicode": UNICODE, "cloze": CLOZE}
  if set(prompts) - set(benchmarks):
    raise ValueError(f"Unknown demo task(s) {sorted(set(prompts) - set(benchmarks))}.")
  names = [f"{prefix}_{kind}" for kind in benchmarks]
  key = (vocab_lib.vocab_key(vocabulary), int(num_examples), int(num_shots),
         tuple(sorted(prompts.items())))
  if downstream.already_registered(prefix, key, names):
    return names
  sizes = (int(num_examples), int(num_shots))
  for (kind, bm), name in zip(benchmarks.items(), names):
    pool_fn = functools.partial(_pool, kind, *sizes)
    downstream.register_one_shot_task(name, _source(kind, *sizes), benchmark=bm, pool_fn=pool_fn,
                                      vocabulary=vocabulary, prompt=prompts.get(kind))
  downstream.register_mixture(prefix, key, names)
  return names


register_demo_tasks()
