r"""Runs one training stage (reference, DoReMi proxy, or main) from gin.

  python -m doremi_jax.train --gin_file=gin/runs/reference.gin \
      --gin.MODEL_DIR="'/tmp/ref'" --gin.TRAIN_STEPS=200

The run kind comes from gin: `train.doremi = @DoReMiConfig()` (gin/runs/doremi.gin) makes
it a DoReMi run against the frozen reference in DoReMiConfig.reference_dir.
"""

if __name__ == "__main__":
  # Under `python -m`, this file runs as __main__; run the importable module instead so
  # that gin registers its configurables once, under doremi_jax.train.
  from doremi_jax import train as _module  # pylint: disable=g-import-not-at-top
  _module.main()
  raise SystemExit(0)

import dataclasses
import logging
import os
import signal
import time
from typing import Mapping, Optional

import gin
import jax
import numpy as np

from doremi_jax import checkpoint as ckpt_lib
from doremi_jax import config as config_lib
from doremi_jax import data as data_lib
from doremi_jax import doremi as doremi_lib
from doremi_jax import evaluate as eval_lib
from doremi_jax import metrics as metrics_lib
from doremi_jax import optim
from doremi_jax import sharding as sharding_lib
from doremi_jax import steps as steps_lib
from doremi_jax import trainer as trainer_lib
from doremi_jax.model import TransformerConfig
from doremi_jax.trainer import build_trainer  # noqa: F401  (re-exported for tools)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DoReMiConfig:
  """A DoReMi (proxy) run: Algorithm 1 against a frozen reference run."""
  reference_dir: Optional[str] = None  # MODEL_DIR of the reference run (required)
  eta: float = 1.0  # exponentiated-gradient step size
  smoothing: float = 1e-3  # c: mixing toward uniform
  objective: str = "domain_mean"  # the paper's; "token_weighted" is the authors' code
  sampling: str = "stratified"  # proxy batches: "stratified" (B/K per domain) or "uniform"
  initial_lambda: float = 0.0  # excess of a domain absent before it is first seen

  def validate(self):
    if not isinstance(self.reference_dir, str) or not self.reference_dir:
      raise ValueError("DoReMiConfig.reference_dir is not set: point it at the reference "
                       "run's MODEL_DIR (--gin.REFERENCE_DIR=\"'...'\").")
    doremi_lib.validate(eta=self.eta, smoothing=self.smoothing, objective=self.objective)
    if self.sampling not in ("stratified", "uniform"):
      raise ValueError(f"DoReMiConfig.sampling={self.sampling!r}: the proxy samples domains "
                       f"uniformly; use 'stratified' or 'uniform'.")


class _Preemption:
  """SIGTERM (a TPU preemption notice) asks for a checkpoint at the next step and an exit."""

  def __init__(self, process_count: int):
    self.requested = False
    # Multi-host: JAX's preemption service owns SIGTERM and syncs the step across hosts.
    self._previous = None
    if process_count == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handler)

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handler(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint at the next step, then exiting.")
    self.requested = True


@gin.configurable
def train(model_dir: str = gin.REQUIRED, *, mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED, train_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED, random_seed: int = 0, mesh_shape=(1, -1, 1),
          sampling="mixture", accum_steps: int = 1, z_loss: float = 0.0, log_every: int = 10,
          checkpoint_every: int = 100, keep_checkpoints: int = 2, eval_every: int = 0,
          eval_batch_size: Optional[int] = None, eval_max_sequences: Optional[int] = None,
          doremi: Optional[DoReMiConfig] = None,
          optimizer: optim.OptimizerConfig = optim.OptimizerConfig(),
          cache_dir: Optional[str] = None, pack_across_domains: bool = False,
          stop_after_steps: Optional[int] = None) -> dict:
  """Trains to `train_steps` (resuming from MODEL_DIR) and returns the last metrics.

  stop_after_steps: stop (with a checkpoint) after this many steps in this invocation;
  for tests and time-sliced jobs, the schedule still spans train_steps.
  """
  for name, value in (("MODEL_DIR", model_dir), ("MIXTURE_OR_TASK_NAME", mixture_or_task_name),
                      ("TASK_FEATURE_LENGTHS", task_feature_lengths),
                      ("TRAIN_STEPS", train_steps), ("BATCH_SIZE", batch_size)):
    if type(value) is object:  # pylint: disable=unidiomatic-typecheck  # %gin.REQUIRED macro
      raise ValueError(f"{name} is not set: pass --gin.{name}=... (see gin/runs/base.gin).")
  seq_len = config_lib.sequence_length(task_feature_lengths)
  if train_steps <= 0:
    raise ValueError(f"TRAIN_STEPS={train_steps}: must be a positive number of steps.")
  for name, value in (("log_every", log_every), ("checkpoint_every", checkpoint_every)):
    if value <= 0:
      raise ValueError(f"train.{name}={value}: must be a positive number of steps.")
  if eval_every < 0:
    raise ValueError(f"train.eval_every={eval_every}: use 0 (no evaluation) or a step count.")
  if doremi is not None:
    doremi.validate()
    if os.path.abspath(doremi.reference_dir) == os.path.abspath(model_dir):
      raise ValueError(f"MODEL_DIR and REFERENCE_DIR are both {model_dir}: a DoReMi run "
                       f"needs its own MODEL_DIR next to the finished reference run.")
  model_cfg = TransformerConfig()
  domains = data_lib.domain_names(mixture_or_task_name)
  info = config_lib.run_info(model_cfg, mixture_or_task_name, domains, seq_len,
                             kind="doremi" if doremi else "train", batch_size=batch_size,
                             random_seed=random_seed)
  config_lib.check_vocabulary(model_cfg, info["vocabulary"])
  ckpt_lib.check_run_info(model_dir, info)
  ref_cfg = None
  if doremi is not None:
    ref_cfg = config_lib.check_reference(doremi.reference_dir, info)
  mesh = sharding_lib.make_mesh(mesh_shape)
  if eval_every and eval_batch_size and eval_batch_size % (
      sharding_lib.data_parallel_size(mesh) * jax.process_count()):
    raise ValueError(f"train.eval_batch_size={eval_batch_size} is not divisible by the "
                     f"data-parallel size {sharding_lib.data_parallel_size(mesh)} x "
                     f"{jax.process_count()} host(s).")
  step_cfg = steps_lib.StepConfig(
      num_domains=len(domains), accum_steps=accum_steps, z_loss=z_loss,
      **({"eta": doremi.eta, "smoothing": doremi.smoothing, "objective": doremi.objective}
         if doremi else {}))
  trainer = build_trainer(model_cfg=model_cfg, mesh=mesh, global_batch_size=batch_size,
                          seq_len=seq_len, total_steps=train_steps, step_cfg=step_cfg,
                          opt_cfg=optimizer, ref_model_cfg=ref_cfg,
                          num_processes=jax.process_count(),
                          initial_lambda=doremi.initial_lambda if doremi else 0.0)

  if pack_across_domains:
    from data_pipelines import core  # pylint: disable=g-import-not-at-top
    natural = f"{core.get_domain_set(mixture_or_task_name).name}_natural"
    if doremi is not None or mixture_or_task_name != natural:
      raise ValueError(f"train.pack_across_domains=True packs domains together, so batches "
                       f"follow natural proportions: use MIXTURE_OR_TASK_NAME='{natural}' and "
                       f"no DoReMi, or pack within domains (the default).")
  # Input: built (or read from cache) before anything is written to MODEL_DIR.
  packed = data_lib.PackedDomains.build(mixture_or_task_name, "train", seq_len,
                                        cache_dir=cache_dir,
                                        pack_across_domains=pack_across_domains)
  batches = data_lib.BatchIterator(packed, global_batch_size=batch_size, seed=random_seed,
                                   sampling=doremi.sampling if doremi else sampling,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count())
  evaluator = None
  if eval_every:
    evaluator = eval_lib.Evaluator(trainer, mixture_or_task_name, seq_len,
                                   batch_size=eval_batch_size or batch_size, cache_dir=cache_dir,
                                   max_sequences_per_domain=eval_max_sequences)

  # The reference first: a missing checkpoint fails before MODEL_DIR is touched.
  ref_params = None
  if doremi is not None:
    ref_params, ref_step = ckpt_lib.restore_params(doremi.reference_dir,
                                                   trainer.abstract_ref_params)
    ref_params = steps_lib.cast_params(ref_params, ref_cfg.compute_dtype)
    info["reference_step"] = ref_step
  ckpt = ckpt_lib.Checkpointer(model_dir, save_every=checkpoint_every, keep=keep_checkpoints)
  start = ckpt.latest_step()
  if start is None:
    state = trainer.init_fn(jax.random.key(random_seed))
    start = 0
  else:
    state, data_state = ckpt.restore(start, trainer.abstract_state)
    batches.set_state(data_state)
    logging.info("resumed from %s at step %d", model_dir, start)
  ckpt_lib.write_json(os.path.join(model_dir, ckpt_lib.RUN_INFO), info)
  config_lib.write_operative_config(model_dir)

  writer = metrics_lib.MetricsWriter(model_dir)
  writer.truncate_after(start)
  if evaluator is not None:
    if jax.process_index() == 0:
      metrics_lib.truncate_jsonl(eval_lib.history_path(model_dir), start)
    ckpt_lib.barrier("eval history truncated")
    # Killed between the checkpoint and its evaluation: evaluate the restored step now.
    if start and (start % eval_every == 0 or start == train_steps) and start not in [
        r["step"] for r in eval_lib.read_history(model_dir)]:
      evaluator.run(state.params, start, model_dir)
  progress = metrics_lib.Progress(train_steps, start)
  preempt = _Preemption(jax.process_count())
  trajectory = config_lib.Trajectory(model_dir, start) if doremi else None
  end = train_steps if stop_after_steps is None else min(train_steps, start + stop_after_steps)
  pending, last, tokens, t_log = None, {}, 0.0, time.time()
  step = start
  while step < end:
    batch = trainer.make_batch(next(batches))
    state, step_metrics = trainer.step_fn(*trainer_lib.step_args(trainer, state, batch,
                                                                 ref_params))
    # Read the previous step's metrics now: the host never waits on the step just issued.
    if pending is not None:
      last, tokens = _consume(pending, domains, trajectory, tokens)
    pending = (step + 1, step_metrics)
    step += 1
    stopping = preempt.requested or (jax.process_count() > 1 and ckpt.reached_preemption(step))
    saving = step % checkpoint_every == 0 or stopping or step == end
    # A checkpoint never holds a state whose metrics (and NaN check) are still unread.
    if step % log_every == 0 or saving:
      last, tokens = _consume(pending, domains, trajectory, tokens)
      pending = None
      elapsed, t_log = time.time() - t_log, time.time()
      last.update(tokens_per_second=tokens / max(elapsed, 1e-9),
                  learning_rate=float(trainer.schedule(step - 1)))
      tokens = 0.0
      writer.write(step, last)
      if trajectory is not None:
        trajectory.flush()
      progress.update(step, last["loss"], last["tokens_per_second"])
      if not progress.enabled and jax.process_index() == 0:
        logging.info("step %d/%d loss %.4f  %.0f tokens/s", step, train_steps, last["loss"],
                     last["tokens_per_second"])
    if saving:
      ckpt.save(step, state, batches.get_state(), force=True)
    if evaluator is not None and (step % eval_every == 0 or step == train_steps):
      evaluator.run(state.params, step, model_dir)
    if stopping:
      logging.warning("preempted: checkpoint saved at step %d; exiting.", step)
      break
  if pending is not None:
    last, tokens = _consume(pending, domains, trajectory, tokens)
  ckpt.close()
  progress.close()
  writer.close()
  if trajectory is not None:
    trajectory.flush()
    if step >= train_steps:
      config_lib.write_domain_weights(model_dir, state, info, doremi, steps=train_steps)
  preempt.restore()
  ckpt_lib.barrier(f"train done: {model_dir}")  # outputs written by process 0 are complete
  return {"step": step, "preempted": preempt.requested and step < train_steps, **last}


def _consume(pending, domains, trajectory, tokens):
  """Host copies of one step's metrics; NaN/inf loss stops the run with its step."""
  step, metrics = pending
  m = jax.device_get(metrics)
  loss = float(m["loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(f"loss is {loss} at step {step}: lower the learning rate, enable "
                             f"z-loss, or resume from an earlier checkpoint.")
  out = {"loss": loss, "ce_loss": float(m["ce_loss"]), "grad_norm": float(m["grad_norm"])}
  counts, sums = np.asarray(m["domain_token_counts"]), np.asarray(m["domain_loss_sums"])
  out["domain_loss"] = {d: float(s / c) for d, s, c in zip(domains, sums, counts) if c > 0}
  if "domain_weights" in m:
    out["ref_loss"] = float(m["ref_loss"])
    for key in ("domain_weights", "avg_domain_weights", "domain_excess"):
      out[key] = dict(zip(domains, map(float, m[key])))
    trajectory.append(step, m["domain_weights"], m["avg_domain_weights"])
  return out, tokens + float(m["num_tokens"])


def main(argv=None):
  config_lib.run_main(train, argv)
