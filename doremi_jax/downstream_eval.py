"""One-shot generative downstream evaluation (exact match), the T5X way.

The tasks are SeqIO tasks with "inputs" (the one-shot prompt) and "targets" (the answer),
defined in data_pipelines.downstream (the paper's five: TriviaQA, NaturalQuestions,
WebQuestions, SQuADv2, LAMBADA, from prepared TFDS data) and data_pipelines.downstream_demo
(offline CPU tasks built from installed packages). Each task is read by a `seqio.Evaluator`
with `seqio.PrefixLMFeatureConverter(pack=False)`, T5X's converter for decoder-only
models, and scored by its own metric through the model's predict function: greedy decoding
with a key/value cache (decoding.Decoder), sharded like training.

Results: {"step", "tasks": {task: exact match in %}, "average", "examples": {task: n}},
appended to MODEL_DIR/downstream_history.jsonl during training (train.downstream) and
written to MODEL_DIR/downstream.json by `python -m doremi_jax.evaluate` with
gin/runs/downstream.gin.
"""
import dataclasses
import logging
import os
from typing import Optional, Sequence

import gin
import numpy as np

from doremi_jax import outputs

SUITES = ("paper", "demo")
METRIC = "exact_match"
NUM_SAMPLES = 4  # generations kept per task in each result, to read what the model says


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DownstreamConfig:
  """Which one-shot generative tasks to run, and how to decode them.

  suite: "paper" (the five TFDS tasks; `tfds build` them first), "demo" (offline), or
    None (only `tasks`).
  tasks: None for the whole suite, or some of its task names (with or without the
    `downstream_` prefix); any other registered SeqIO task with "inputs"/"targets", a
    "validation" split and a metric returning "exact_match" works too.
  inputs_length: prompt tokens (longer prompts keep their last tokens: the question).
  targets_length: the maximum decode length (answers are cut at a newline).
  batch_size: prompts decoded at once (a multiple of the mesh's data-parallel size).
  max_examples: the first N examples of each task (None: all of them).
  tfds_data_dir: where the TFDS datasets were prepared (None: TFDS's default).
  every: during training, steps between evaluations (0: at the last step only).
  """
  suite: Optional[str] = "paper"
  tasks: Optional[Sequence[str]] = None
  inputs_length: int = 512
  targets_length: int = 32
  batch_size: int = 32
  max_examples: Optional[int] = None
  tfds_data_dir: Optional[str] = None
  every: int = 0

  def validate(self) -> None:
    if self.suite not in SUITES + (None,):
      raise ValueError(f"DownstreamConfig.suite={self.suite!r}: use one of {SUITES}, or None "
                       f"with DownstreamConfig.tasks.")
    if self.suite is None and not self.tasks:
      raise ValueError("DownstreamConfig.suite=None needs DownstreamConfig.tasks: the "
                       "registered SeqIO tasks to evaluate.")
    for name in ("inputs_length", "targets_length", "batch_size"):
      if getattr(self, name) <= 0:
        raise ValueError(f"DownstreamConfig.{name}={getattr(self, name)}: must be positive.")
    if self.every < 0:
      raise ValueError(f"DownstreamConfig.every={self.every}: use 0 (the last step only) or "
                       f"a step count.")
    if self.max_examples is not None and self.max_examples <= 0:
      raise ValueError(f"DownstreamConfig.max_examples={self.max_examples}: give a positive "
                       f"number, or None for every example.")


def register_tasks(cfg: DownstreamConfig, vocabulary) -> list[str]:
  """Registers the suite's tasks in `vocabulary` (the model's); the task names to run.

  A missing TFDS dataset raises its `tfds build` command here, before any compute.
  """
  from data_pipelines import downstream  # pylint: disable=g-import-not-at-top
  from data_pipelines import downstream_demo  # pylint: disable=g-import-not-at-top
  suite = []
  if cfg.suite == "paper":
    suite = downstream.register_paper_tasks(vocabulary, tfds_data_dir=cfg.tfds_data_dir)
  elif cfg.suite == "demo":
    suite = downstream_demo.register_demo_tasks(vocabulary)
  names = [_task_name(t, suite) for t in cfg.tasks] if cfg.tasks else list(suite)
  if cfg.suite == "paper":
    downstream.check_prepared([n for n in names if n in suite], tfds_data_dir=cfg.tfds_data_dir)
  return names


def _task_name(name: str, suite_names: Sequence[str]) -> str:
  import seqio  # pylint: disable=g-import-not-at-top
  for candidate in (name, f"downstream_{name}"):
    if candidate in suite_names or candidate in seqio.TaskRegistry.names():
      return candidate
  raise ValueError(f"DownstreamConfig.tasks names {name!r}, which is not a registered SeqIO "
                   f"task; the suite has {list(suite_names)}.")


def short_name(task: str) -> str:
  return task[len("downstream_"):] if task.startswith("downstream_") else task


class DownstreamEvaluator:
  """Exact match of a model's greedy one-shot answers on each task.

  Built once per run: every task's examples are read and tokenized once (seqio.Evaluator's
  memory cache) and the decoder compiles once; evaluate() then runs at any step.
  """

  def __init__(self, cfg: DownstreamConfig, *, model_cfg, mesh, vocabulary):
    import seqio  # pylint: disable=g-import-not-at-top
    from data_pipelines import downstream  # pylint: disable=g-import-not-at-top
    from doremi_jax import decoding  # pylint: disable=g-import-not-at-top
    cfg.validate()
    self.cfg = cfg
    self.tasks = register_tasks(cfg, vocabulary)
    # +1: the decoder input starts with id 0, as every example does in training (decoder
    # inputs are the targets shifted right).
    self.decoder = decoding.Decoder(model_cfg, mesh, batch_size=cfg.batch_size,
                                    max_prompt_len=cfg.inputs_length + 1,
                                    max_decode_len=cfg.targets_length)
    self.stop_ids = {
        t: downstream.stop_ids(vocabulary, downstream.task_stops(t)) for t in self.tasks
    }
    if not downstream.keeps_newlines(vocabulary):
      logging.warning(
          "the vocabulary turns newlines into spaces: one-shot prompts lose their line "
          "structure and answers are cut at the next ' Q:' instead of a newline. Models with "
          "SentencePiece vocabularies from data_pipelines.train_spm keep newlines.")
    lengths = {"inputs": cfg.inputs_length, "targets": cfg.targets_length}
    self.evaluators = {
        t:
            seqio.Evaluator(t, seqio.PrefixLMFeatureConverter(pack=False), eval_split="validation",
                            sequence_length=lengths, num_examples=cfg.max_examples,
                            async_compute_metrics=False) for t in self.tasks
    }
    for task, ev in self.evaluators.items():
      if not ev.eval_tasks:
        raise ValueError(f"task {task!r} has no 'validation' split or no metric: a downstream "
                         f"task needs both (see data_pipelines/downstream.py).")
    self.examples = {
        short_name(t): sum(1 for _ in ev.cached_task_datasets[t])
        for t, ev in self.evaluators.items()
    }
    self.vocabulary = vocabulary

  def _predict_fn(self, params, task: str):
    """seqio's predict_fn: (index, features) examples -> [(index, decoded token ids)]."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    def predict(dataset):
      indices, prompts = [], []
      for index, ex in tfds.as_numpy(dataset):
        prompts.append(prompt_tokens(ex))
        indices.append(int(index))
      tokens = self.decoder.decode(params, prompts, stop_ids=self.stop_ids[task])
      return [(i, row.tolist()) for i, row in zip(indices, tokens)]

    return predict

  def evaluate(self, params, step: Optional[int] = None) -> dict:
    """{"tasks": {task: exact match %}, "average", "examples": {task: n}, "metrics": {task:
    every metric the task reports (SQuADv2: also with and without an answer)}, "samples":
    {task: the first NUM_SAMPLES generations, decoded}}."""
    metrics, samples = {}, {}
    for task, ev in self.evaluators.items():
      result, outputs_by_type = ev.evaluate(compute_metrics=True, step=step,
                                            predict_fn=self._predict_fn(params, task))
      metrics[short_name(task)] = {
          k: float(getattr(v, "value", v)) for k, v in result.result()[task].items()
      }
      predictions = next(iter(outputs_by_type[task].values()))
      samples[short_name(task)] = [
          self.vocabulary.decode(list(p)) for p in predictions[:NUM_SAMPLES]
      ]
    missing = [t for t, m in metrics.items() if METRIC not in m]
    if missing:
      raise ValueError(f"tasks {missing} report no {METRIC!r} metric (they report "
                       f"{metrics[missing[0]]}); give them data_pipelines.downstream.exact_match.")
    scores = {t: m[METRIC] for t, m in metrics.items()}
    result = {
        "tasks": scores,
        "average": float(np.mean(list(scores.values()))),
        "examples": dict(self.examples),
        "metrics": metrics,
        "samples": samples
    }
    logging.info("downstream exact match at step %s: %s", step, result["tasks"])
    return result

  def run(self, params, step: int, model_dir: str) -> dict:
    """Evaluates and appends {"step", ...} to MODEL_DIR/downstream_history.jsonl."""
    result = {"step": int(step), "suite": self.cfg.suite, **self.evaluate(params, step)}
    outputs.append_jsonl(os.path.join(model_dir, outputs.DOWNSTREAM_HISTORY), [result])
    return result


def prompt_tokens(example) -> list:
  """The decoder input of a PrefixLM-converted example's prompt: id 0, then the inputs part
  of decoder_target_tokens (decoder_causal_attention marks the inputs and one position
  more); exactly decoder_input_tokens up to the first answer token."""
  n = int(np.sum(example["decoder_causal_attention"]))
  return np.asarray(example["decoder_input_tokens"][:n]).tolist()


def describe(suite: str) -> str:
  """What a suite's tasks are, for reports (the task modules state it)."""
  from data_pipelines import downstream  # pylint: disable=g-import-not-at-top
  from data_pipelines import downstream_demo  # pylint: disable=g-import-not-at-top
  return {"paper": downstream.DESCRIPTION, "demo": downstream_demo.DESCRIPTION}[suite]


def describe_runs(mains: dict) -> Optional[dict]:
  """{"suite", "description"} of the main runs' downstream histories (None without)."""
  suites = {h.get("suite") for m in mains.values() for h in m.get("downstream", [])}
  if not suites:
    return None
  suite = suites.pop() if len(suites) == 1 else None
  return {"suite": suite, "description": describe(suite) if suite in SUITES else None}


def read_history(model_dir: str) -> list[dict]:
  return outputs.read_jsonl(os.path.join(model_dir, outputs.DOWNSTREAM_HISTORY))
