"""Building a run: pure construction from explicit arguments, shared by every tool.

`build_run(RunConfig(...))` validates the configuration, then builds the model, optimizer
and step configs, the mesh, the jitted trainer and the input, and writes nothing. train,
evaluate, compile_check (on a TPU topology's abstract devices), the benchmarks and the tests
call it; only the command-line edge (train.py) reads gin.
"""
import dataclasses
import os
from typing import Mapping, Optional, Sequence, Union

import jax

from doremi_jax import checkpoint as ckpt_lib
from doremi_jax import data as data_lib
from doremi_jax import doremi as doremi_lib
from doremi_jax import downstream_eval
from doremi_jax import evaluation
from doremi_jax import mixing
from doremi_jax import optim
from doremi_jax import outputs
from doremi_jax import schedule as schedule_lib
from doremi_jax import sharding as sharding_lib
from doremi_jax import steps as steps_lib
from doremi_jax import trainer as trainer_lib
from doremi_jax.model import TransformerConfig, config_from_info

DEFAULT_MESH_SHAPE = (1, -1, 1)  # data, fsdp, model: pure FSDP over every device


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything that defines one training run (reference, DoReMi proxy or main).

  A DoReMi config (with reference_dir) makes it a proxy run. stop_after_steps stops (with a
  checkpoint) after this many steps in one invocation; the schedule still spans train_steps.
  """
  model_dir: Optional[str]
  mixture_or_task_name: Optional[str]
  seq_len: Optional[int]
  train_steps: Optional[int]
  batch_size: Optional[int]
  model: TransformerConfig = TransformerConfig()
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig()
  doremi: Optional[doremi_lib.DoReMiConfig] = None  # a DoReMi (proxy) run when set
  reference_dir: Optional[str] = None  # the frozen reference run's MODEL_DIR (DoReMi)
  random_seed: int = 0  # parameters and the input's sampling
  mesh_shape: Sequence[int] = DEFAULT_MESH_SHAPE  # (data, fsdp, model); one -1 fills
  # Batches: "mixture" (the mixture's rates), "uniform", "stratified", {domain: weight}, or a
  # schedule.MixtureSchedule (weights that change with the step); DoReMi runs use
  # doremi.sampling; online runs start from these weights (not stratified, not a schedule).
  sampling: Union[str, Mapping[str, float], schedule_lib.MixtureSchedule] = "mixture"
  # A main run that updates its own sampling weights (online DoReMi with reference_dir, ODM).
  online: Optional[mixing.OnlineConfig] = None
  accum_steps: int = 1  # microbatches per step (gradient accumulation)
  z_loss: float = 0.0  # weight of the log-partition penalty
  log_every: int = 10  # steps between metrics lines
  checkpoint_every: int = 100  # steps between checkpoints
  keep_checkpoints: int = 2  # the newest kept
  eval_every: int = 0  # steps between per-domain evaluations (0: none)
  eval_batch_size: Optional[int] = None  # default: batch_size
  eval_max_sequences: Optional[int] = None  # first N validation sequences per domain
  cache_dir: Optional[str] = None  # tokenized input (local or gs://); default per user
  pack_across_domains: bool = False  # natural mixtures only: rows mix domains
  stop_after_steps: Optional[int] = None
  # One-shot generative downstream tasks (exact match), every downstream.every steps and at
  # the last step, into MODEL_DIR/downstream_history.jsonl.
  downstream: Optional[downstream_eval.DownstreamConfig] = None
  # Resume from this checkpoint step, not the latest (newer ones are moved aside, not
  # deleted); applied once: a restart with the same value resumes from the latest.
  restore_step: Optional[int] = None

  @property
  def kind(self) -> str:
    if self.online is not None:
      return f"online_{self.online.method}"
    return "doremi" if self.doremi is not None else "train"

  @property
  def needs_reference(self) -> bool:
    return self.doremi is not None or (self.online is not None and self.online.needs_reference)


@dataclasses.dataclass
class Run:
  """A built run: its config, identity, compiled trainer and input (None when abstract)."""
  cfg: RunConfig
  domains: list
  trainer: trainer_lib.Trainer
  info: Optional[dict] = None  # run_info.json's content
  ref_model_cfg: Optional[TransformerConfig] = None
  batches: Optional[data_lib.BatchIterator] = None
  evaluator: Optional[evaluation.Evaluator] = None  # when cfg.eval_every
  downstream: Optional[downstream_eval.DownstreamEvaluator] = None  # when cfg.downstream

  def close(self) -> None:
    """Closes the input's open files (store readers) and the downstream evaluators."""
    for rows in (getattr(self.batches, "packed", None), getattr(self.evaluator, "packed",
                                                                None), self.downstream):
      getattr(rows, "close", lambda: None)()


_REQUIRED = (("model_dir", "MODEL_DIR"), ("mixture_or_task_name", "MIXTURE_OR_TASK_NAME"),
             ("seq_len", "TASK_FEATURE_LENGTHS"), ("train_steps", "TRAIN_STEPS"), ("batch_size",
                                                                                   "BATCH_SIZE"))


def validate(cfg: RunConfig, *, abstract: bool = False) -> None:
  """Clear errors for settings that cannot work, before anything is built or written."""
  needed = ("seq_len", "train_steps", "batch_size") if abstract else [k for k, _ in _REQUIRED]
  for key, macro in _REQUIRED:
    if key in needed and getattr(cfg, key) is None:
      raise ValueError(f"{macro} is not set: pass --gin.{macro}=... (see gin/runs/base.gin).")
  if cfg.train_steps <= 0:
    raise ValueError(f"TRAIN_STEPS={cfg.train_steps}: must be a positive number of steps.")
  for name in ("log_every", "checkpoint_every"):
    if getattr(cfg, name) <= 0:
      raise ValueError(f"train.{name}={getattr(cfg, name)}: must be a positive number of steps.")
  if cfg.restore_step is not None and (not isinstance(cfg.restore_step, int) or
                                       cfg.restore_step < 0):
    raise ValueError(f"train.restore_step={cfg.restore_step!r}: give a checkpoint step "
                     f"(an integer >= 0), or leave it unset to resume from the latest.")
  if cfg.eval_every < 0:
    raise ValueError(f"train.eval_every={cfg.eval_every}: use 0 (no evaluation) or a step "
                     f"count.")
  if cfg.downstream is not None:
    cfg.downstream.validate()
  _validate_mixing(cfg)
  if not cfg.needs_reference:
    return
  if not abstract and (not isinstance(cfg.reference_dir, str) or not cfg.reference_dir):
    raise ValueError(f"REFERENCE_DIR is not set: {_reference_user(cfg)} needs a frozen "
                     f"reference; point train.reference_dir at the reference run's MODEL_DIR "
                     f"(--gin.REFERENCE_DIR=\"'...'\").")
  if not abstract and os.path.abspath(cfg.reference_dir) == os.path.abspath(cfg.model_dir):
    raise ValueError(f"MODEL_DIR and REFERENCE_DIR are both {cfg.model_dir}: "
                     f"{_reference_user(cfg)} needs its own MODEL_DIR next to the finished "
                     f"reference run.")


def _reference_user(cfg: RunConfig) -> str:
  return "online DoReMi (OnlineMixing.method='doremi')" if cfg.online else "a DoReMi run"


def _validate_mixing(cfg: RunConfig) -> None:
  """DoReMi, online and schedule settings that cannot work together or alone."""
  if cfg.doremi is not None:
    cfg.doremi.validate()
    if isinstance(cfg.sampling, schedule_lib.MixtureSchedule):
      raise ValueError("train.sampling=@MixtureSchedule() with train.doremi: a DoReMi proxy "
                       "samples by DoReMiConfig.sampling; schedules are for main runs.")
  if cfg.online is None:
    return
  if cfg.doremi is not None:
    raise ValueError("train.doremi and train.online are both set: a DoReMi proxy run "
                     "reweights its loss from uniform batches, an online run resamples its "
                     "own batches; choose one.")
  cfg.online.validate()
  if not cfg.online.needs_reference and cfg.reference_dir:
    raise ValueError(f"train.reference_dir={cfg.reference_dir!r} with OnlineMixing.method="
                     f"{cfg.online.method!r}: this method uses no reference; unset "
                     f"REFERENCE_DIR (or use method='doremi').")
  if isinstance(cfg.sampling, schedule_lib.MixtureSchedule) or cfg.sampling == "stratified":
    raise ValueError(f"train.sampling={cfg.sampling!r} with train.online: an online run draws "
                     f"iid rows from the weights it learns; start it from 'mixture', "
                     f"'uniform' or a {{domain: weight}} dict.")


def sequence_length(task_feature_lengths: Mapping[str, int]) -> int:
  """The decoder length from T5X's TASK_FEATURE_LENGTHS ({'targets': L})."""
  if not isinstance(task_feature_lengths, Mapping) or "targets" not in task_feature_lengths:
    raise ValueError(f"TASK_FEATURE_LENGTHS={task_feature_lengths!r}: give {{'targets': L}}.")
  length = int(task_feature_lengths["targets"])
  if length <= 1:
    raise ValueError(f"TASK_FEATURE_LENGTHS targets={length}: must be > 1.")
  return length


def vocabulary(mixture_or_task_name: str):
  """The seqio vocabulary of a mixture's "targets" (the model's)."""
  from data_pipelines import core  # pylint: disable=g-import-not-at-top
  return core.domain_tasks(mixture_or_task_name)[0][1].output_features["targets"].vocabulary


def vocabulary_info(mixture_or_task_name: str) -> dict:
  vocab = vocabulary(mixture_or_task_name)
  info = {"type": type(vocab).__name__, "vocab_size": int(vocab.vocab_size)}
  model_file = getattr(vocab, "sentencepiece_model_file", None)
  if model_file:
    info["model"] = str(model_file)
  return info


def run_info(cfg: RunConfig, domains: Sequence[str]) -> dict:
  """What a run is: checked on restart and by runs that use it as a reference."""
  return {
      "kind": cfg.kind,
      "model": dataclasses.asdict(cfg.model),
      "mixture": cfg.mixture_or_task_name,
      "domains": list(domains),
      "vocabulary": vocabulary_info(cfg.mixture_or_task_name),
      "sequence_length": cfg.seq_len,
      "batch_size": cfg.batch_size,
      "random_seed": cfg.random_seed,
      "num_params": cfg.model.num_params()
  }


def _check_vocabulary(model_cfg: TransformerConfig, vocab: dict) -> None:
  if model_cfg.vocab_size < vocab["vocab_size"]:
    raise ValueError(f"TransformerConfig.vocab_size={model_cfg.vocab_size} is smaller than the "
                     f"mixture's vocabulary ({vocab['type']}, {vocab['vocab_size']} ids); set "
                     f"TransformerConfig.vocab_size = {vocab['vocab_size']}.")


def reference_model(reference_dir: str, info: Optional[dict]) -> TransformerConfig:
  """The reference run's model config, after checking it shares vocabulary and domains."""
  ref = outputs.read_run_info(reference_dir)
  if ref is None:
    raise FileNotFoundError(
        f"No reference run in {reference_dir} ({outputs.RUN_INFO} missing): train the "
        f"reference first (gin/runs/reference.gin) with MODEL_DIR={reference_dir}.")
  for key, what in (("vocabulary", "vocabulary"), ("domains", "set or order of domains")):
    if info is not None and ref[key] != info[key]:
      raise ValueError(f"The reference in {reference_dir} was trained with another {what}:\n"
                       f"  reference: {ref[key]}\n  this run:  {info[key]}\n"
                       f"Train a reference on this mixture's domain set and vocabulary.")
  return config_from_info(ref["model"])


def _check_eval_batch(cfg: RunConfig, mesh, num_processes: int) -> None:
  dp = sharding_lib.data_parallel_size(mesh)
  if cfg.eval_every and cfg.eval_batch_size and cfg.eval_batch_size % (dp * num_processes):
    raise ValueError(f"train.eval_batch_size={cfg.eval_batch_size} is not divisible by the "
                     f"data-parallel size {dp} x {num_processes} host(s).")


def _check_packing(cfg: RunConfig) -> None:
  if not cfg.pack_across_domains:
    return
  if cfg.online is not None or isinstance(cfg.sampling, schedule_lib.MixtureSchedule):
    raise ValueError("train.pack_across_domains=True packs domains together, so batches "
                     "follow natural proportions: weights that change during a run (a "
                     "schedule, train.online) need sequences packed within a domain; set "
                     "train.pack_across_domains=False.")
  from data_pipelines import core  # pylint: disable=g-import-not-at-top
  natural = f"{core.get_domain_set(cfg.mixture_or_task_name).name}_natural"
  if cfg.doremi is not None or cfg.mixture_or_task_name != natural:
    raise ValueError(f"train.pack_across_domains=True packs domains together, so batches "
                     f"follow natural proportions: use MIXTURE_OR_TASK_NAME='{natural}' and "
                     f"no DoReMi, or pack within domains (the default).")


def open_domains(cfg: RunConfig, split: str, *, process_index: int):
  """The split's packed rows: the token store (built once, read by random access), or the
  in-memory cache of rows packed across domains (pack_across_domains)."""
  if cfg.pack_across_domains:
    return data_lib.PackedDomains.build(cfg.mixture_or_task_name, split, cfg.seq_len,
                                        cache_dir=cfg.cache_dir, pack_across_domains=True)
  from data_pipelines import build_store  # pylint: disable=g-import-not-at-top
  return build_store.open_store(cfg.mixture_or_task_name, split, cfg.seq_len,
                                cache_dir=cfg.cache_dir, process_index=process_index)


def build_input(cfg: RunConfig, *, process_index: int, process_count: int):
  """The training batches of this host. An online run's iterator starts on its initial
  weights and then follows data.OnlineWeights, which the train loop feeds."""
  sampling = cfg.doremi.sampling if cfg.doremi is not None else cfg.sampling
  packed = open_domains(cfg, "train", process_index=process_index)
  if isinstance(sampling, schedule_lib.MixtureSchedule):
    sampling = sampling.resolve(packed.names, train_steps=cfg.train_steps)
  batches = data_lib.BatchIterator(packed, global_batch_size=cfg.batch_size, seed=cfg.random_seed,
                                   sampling=sampling, process_index=process_index,
                                   process_count=process_count)
  if cfg.online is not None:
    batches.follow(data_lib.OnlineWeights(len(packed.names)))
  return batches


def build_run(cfg: RunConfig, *, devices=None, num_processes: Optional[int] = None,
              abstract: bool = False, with_input: bool = True, num_domains: Optional[int] = None,
              ref_model_cfg: Optional[TransformerConfig] = None) -> Run:
  """Validates cfg and builds the run; nothing is written.

  devices: the mesh's devices (default: all; a TPU topology's abstract devices for compile
    checks). num_processes: hosts feeding the batch (default: this job's).
  abstract: build only what compiling the steps needs: no input, no run identity, no
    reference run read (ref_model_cfg, default the proxy's size), and num_domains may stand
    in for an unregistered mixture.
  with_input: False builds and checks everything but the (train and eval) input.
  """
  validate(cfg, abstract=abstract)
  num_processes = jax.process_count() if num_processes is None else num_processes
  if num_domains is not None and abstract:
    domains = [f"domain_{i + 1}" for i in range(num_domains)]
  else:
    domains = data_lib.domain_names(cfg.mixture_or_task_name)
  info = None
  if not abstract:
    info = run_info(cfg, domains)
    _check_vocabulary(cfg.model, info["vocabulary"])
    ckpt_lib.check_run_info(cfg.model_dir, info)
    _check_packing(cfg)
  if cfg.online is not None:
    cfg.online.validate(len(domains))
  if not abstract and isinstance(cfg.sampling, schedule_lib.MixtureSchedule):
    cfg.sampling.resolve(domains, train_steps=cfg.train_steps)  # bad stages fail before compute
  if cfg.needs_reference and ref_model_cfg is None:
    ref_model_cfg = cfg.model if abstract else reference_model(cfg.reference_dir, info)
  mesh = sharding_lib.make_mesh(cfg.mesh_shape, devices=devices)
  _check_eval_batch(cfg, mesh, num_processes)
  step_cfg = steps_lib.StepConfig(
      num_domains=len(domains), accum_steps=cfg.accum_steps, z_loss=cfg.z_loss, doremi=cfg.doremi,
      online=cfg.online)
  trainer = trainer_lib.build_trainer(model_cfg=cfg.model, mesh=mesh,
                                      global_batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                                      total_steps=cfg.train_steps, step_cfg=step_cfg,
                                      opt_cfg=cfg.optimizer, ref_model_cfg=ref_model_cfg,
                                      num_processes=num_processes)
  run = Run(cfg=cfg, domains=domains, trainer=trainer, info=info, ref_model_cfg=ref_model_cfg)
  if with_input and not abstract:
    # Input and evaluation data: built (or read from cache) before MODEL_DIR is written.
    if cfg.downstream is not None:  # first: a missing dataset fails before anything is read
      run.downstream = downstream_eval.DownstreamEvaluator(
          cfg.downstream, model_cfg=cfg.model, mesh=mesh,
          vocabulary=vocabulary(cfg.mixture_or_task_name))
    run.batches = build_input(cfg, process_index=jax.process_index(), process_count=num_processes)
    if cfg.eval_every:
      validation = open_domains(
          dataclasses.replace(cfg, pack_across_domains=False), "validation",
          process_index=jax.process_index())
      run.evaluator = evaluation.Evaluator(trainer, validation, batch_size=cfg.eval_batch_size or
                                           cfg.batch_size,
                                           max_sequences_per_domain=cfg.eval_max_sequences)
  return run
