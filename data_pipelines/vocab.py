"""Vocabularies: bytes for tiny runs, SentencePiece models for real ones."""
from typing import Optional, Union

import seqio
import tensorflow as tf


def get_vocabulary(spec: Union[None, str, seqio.Vocabulary] = None,
                   extra_ids: int = 0) -> seqio.Vocabulary:
  """None/'byte' -> ByteVocabulary; a .model path (local or gs://) -> SPM."""
  if isinstance(spec, seqio.Vocabulary):
    return spec
  if spec is None or spec == "byte":
    return seqio.ByteVocabulary(extra_ids=extra_ids)
  if not tf.io.gfile.exists(spec):
    raise FileNotFoundError(f"SentencePiece model not found: {spec}. Train one with `python -m "
                            "data_pipelines.train_spm --mixture=... --output=...`.")
  return seqio.SentencePieceVocabulary(spec, extra_ids=extra_ids)


def sentencepiece_vocabulary(path: str, extra_ids: int = 0) -> seqio.SentencePieceVocabulary:
  return get_vocabulary(path, extra_ids)  # pytype: disable=bad-return-type


def vocab_key(vocabulary: Optional[seqio.Vocabulary]) -> str:
  """A string identifying a vocabulary (for cache keys)."""
  if isinstance(vocabulary, seqio.SentencePieceVocabulary):
    return f"spm:{vocabulary.sentencepiece_model_file}"
  if vocabulary is None or isinstance(vocabulary, seqio.ByteVocabulary):
    return f"byte:{getattr(vocabulary, 'extra_ids', 0)}"
  # Stable across processes (a default repr would hold a memory address).
  return f"{type(vocabulary).__name__}:{vocabulary.vocab_size}:{getattr(vocabulary, 'extra_ids', 0)}"
