r"""Trains a SentencePiece model locally from a mixture's training text.

  python -m data_pipelines.train_spm --mixture=demo_natural \
      --vocab_size=8000 --output=/tmp/demo_spm

writes /tmp/demo_spm.model (pad=0, eos=1, unk=2, as SeqIO
expects). Import the module that registers the mixture with --module
(default: data_pipelines.demo).
"""
import argparse
import importlib
import io
import logging
import os
from typing import Iterable, Optional

import tensorflow as tf


def iter_mixture_text(mixture: str, split: str = "train",
                      max_documents_per_domain: Optional[int] = None):
  from data_pipelines import core  # pylint: disable=g-import-not-at-top
  for dom, task in core.domain_tasks(mixture):
    ds = task.source.get_dataset(split=split, shuffle=False)
    if max_documents_per_domain:
      ds = ds.take(max_documents_per_domain)
    for ex in ds.as_numpy_iterator():
      yield ex["text"].decode("utf-8", "replace")
    logging.info("train_spm: read domain %s", dom)


def train(mixture: str, vocab_size: int, output: str, *, split: str = "train",
          max_documents_per_domain: Optional[int] = None, **kwargs) -> str:
  """Trains and writes `<output>.model` (local or gs://) from a mixture's text; returns its
  path. kwargs: train_from_texts's trainer settings."""
  return train_from_texts(
      iter_mixture_text(mixture, split, max_documents_per_domain), vocab_size, output, **kwargs)


def chunks(text: str, max_chars: int):
  """A document as pieces of whole lines (newlines kept) of at most max_chars characters (a
  longer line is cut); SentencePiece skips longer sentences."""
  piece = ""
  for line in text.splitlines(keepends=True):
    while len(line) > max_chars:
      if piece:
        yield piece
        piece = ""
      yield line[:max_chars]
      line = line[max_chars:]
    if len(piece) + len(line) > max_chars:
      yield piece
      piece = ""
    piece += line
  if piece.strip():
    yield piece


def train_from_texts(texts: Iterable[str], vocab_size: int, output: str, *,
                     model_type: str = "unigram", character_coverage: float = 0.9995,
                     max_sentence_length: int = 16384) -> str:
  """Trains a SentencePiece model (pad=0, eos=1, unk=2, no bos, as SeqIO expects) and writes
  `<output>.model` (local or gs://, atomically); returns its path. The vocabulary may come out
  smaller than vocab_size on a small text (hard_vocab_limit=False).

  Newlines and runs of spaces are kept ("\n" is a piece of its own; no whitespace folding),
  so that code keeps its layout and one-shot prompts their lines (data_pipelines.downstream
  stops answers at a newline): documents are trained on as pieces of whole lines."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  model = io.BytesIO()
  # Characters, not bytes: a piece of max_sentence_length / 4 characters fits in UTF-8.
  pieces = (p for doc in texts for p in chunks(doc, max_sentence_length // 4) if p.strip())
  spm.SentencePieceTrainer.train(sentence_iterator=pieces, model_writer=model,
                                 vocab_size=vocab_size, model_type=model_type,
                                 character_coverage=character_coverage, pad_id=0, eos_id=1,
                                 unk_id=2, bos_id=-1, max_sentence_length=max_sentence_length,
                                 hard_vocab_limit=False, normalization_rule_name="nmt_nfkc",
                                 remove_extra_whitespaces=False, user_defined_symbols=["\n"],
                                 num_threads=os.cpu_count() or 1, minloglevel=2)
  path = output if output.endswith(".model") else output + ".model"
  d = os.path.dirname(path)
  if d:
    tf.io.gfile.makedirs(d)
  tmp = f"{path}.tmp-{os.getpid()}"
  with tf.io.gfile.GFile(tmp, "wb") as f:
    f.write(model.getvalue())
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return path


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--mixture", default="demo_natural")
  p.add_argument("--module", default="data_pipelines.demo")
  p.add_argument("--vocab_size", type=int, default=8000)
  p.add_argument("--output", required=True)
  p.add_argument("--split", default="train")
  p.add_argument("--max_documents_per_domain", type=int, default=None)
  p.add_argument("--model_type", default="unigram")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  for m in args.module.split(","):
    importlib.import_module(m)
  path = train(args.mixture, args.vocab_size, args.output, split=args.split,
               max_documents_per_domain=args.max_documents_per_domain, model_type=args.model_type)
  print(path)


if __name__ == "__main__":
  main()
