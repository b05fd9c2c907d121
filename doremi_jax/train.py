r"""Runs one training stage (reference, DoReMi proxy, or main) from gin.

  doremi-train --gin_file=runs/reference.gin \
      --gin.MODEL_DIR="'/tmp/ref'" --gin.TRAIN_STEPS=200

The run kind comes from gin: `train.doremi = @DoReMiConfig()` (gin/runs/doremi.gin) makes
it a DoReMi run against the frozen reference in train.reference_dir. `train` is the gin
edge: it turns the bindings into a run.RunConfig, builds the run, and runs the loop.
"""

if __name__ == "__main__":
  # Under `python -m`, this file runs as __main__; run the importable module instead so
  # that gin registers its configurables once, under doremi_jax.train.
  from doremi_jax import quiet as _quiet  # pylint: disable=g-import-not-at-top
  _quiet.quiet_start()
  from doremi_jax import train as _module  # pylint: disable=g-import-not-at-top
  _module.main()
  raise SystemExit(0)

# pylint: disable=g-import-not-at-top,wrong-import-position
import contextlib
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
from doremi_jax import doremi as doremi_lib
from doremi_jax import downstream_eval
from doremi_jax import metrics as metrics_lib
from doremi_jax import mixing
from doremi_jax import mixing_log
from doremi_jax import optim
from doremi_jax import outputs
from doremi_jax import run as run_lib
from doremi_jax import schedule as schedule_lib
from doremi_jax import steps as steps_lib
from doremi_jax import trainer as trainer_lib
from doremi_jax.model import TransformerConfig

# The one DoReMi settings type, configurable from gin as `DoReMiConfig`.
DoReMiConfig = gin.external_configurable(doremi_lib.DoReMiConfig, module="doremi_jax.train")
# Main runs whose weights change: `train.online = @OnlineMixing()` (online DoReMi, ODM) and
# `train.sampling = @MixtureSchedule()` (stages, interpolation).
OnlineMixing = gin.external_configurable(mixing.OnlineConfig, "OnlineMixing",
                                         module="doremi_jax.train")
MixtureSchedule = gin.external_configurable(schedule_lib.MixtureSchedule, module="doremi_jax.train")


def _given(value):
  """None for an unset %gin.REQUIRED macro (gin passes a bare object())."""
  return None if type(value) is object else value  # pylint: disable=unidiomatic-typecheck


@gin.configurable("train", module="doremi_jax.train")
def run_config(model_dir: Optional[str] = gin.REQUIRED, *, mixture_or_task_name: str = gin.REQUIRED,
               task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
               train_steps: int = gin.REQUIRED, batch_size: int = gin.REQUIRED,
               random_seed: int = 0, mesh_shape=run_lib.DEFAULT_MESH_SHAPE, sampling="mixture",
               accum_steps: int = 1, z_loss: float = 0.0, log_every: int = 10,
               checkpoint_every: int = 100, keep_checkpoints: int = 2, eval_every: int = 0,
               eval_batch_size: Optional[int] = None, eval_max_sequences: Optional[int] = None,
               doremi: Optional[doremi_lib.DoReMiConfig] = None,
               online: Optional[mixing.OnlineConfig] = None, reference_dir: Optional[str] = None,
               optimizer: Optional[optim.OptimizerConfig] = None,
               model: Optional[TransformerConfig] = None, cache_dir: Optional[str] = None,
               pack_across_domains: bool = False, stop_after_steps: Optional[int] = None,
               restore_step: Optional[int] = None,
               downstream: Optional[downstream_eval.DownstreamConfig] = None) -> run_lib.RunConfig:
  """The gin bindings `train.*` as a RunConfig (run.RunConfig documents every setting).

  The model is TransformerConfig() as gin binds it, unless given. Unset %gin.REQUIRED
  macros become None, for run.validate to name.
  """
  lengths = _given(task_feature_lengths)
  return run_lib.RunConfig(
      model_dir=_given(model_dir), mixture_or_task_name=_given(mixture_or_task_name),
      seq_len=run_lib.sequence_length(lengths) if lengths is not None else None,
      train_steps=_given(train_steps), batch_size=_given(batch_size), model=model or
      TransformerConfig(), optimizer=optimizer or optim.OptimizerConfig(), doremi=doremi,
      online=online, reference_dir=_given(reference_dir), random_seed=random_seed,
      mesh_shape=tuple(mesh_shape), sampling=sampling, accum_steps=accum_steps, z_loss=z_loss,
      log_every=log_every, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
      eval_every=eval_every, eval_batch_size=eval_batch_size, eval_max_sequences=eval_max_sequences,
      cache_dir=cache_dir, pack_across_domains=pack_across_domains,
      stop_after_steps=stop_after_steps, restore_step=restore_step, downstream=downstream)


def train(model_dir: Optional[str] = None, **overrides) -> dict:
  """Trains to train_steps (resuming from MODEL_DIR) and returns the last metrics.

  Arguments override the gin bindings of `train.*` (the pipeline passes MODEL_DIR, the
  mixture and the lengths itself).
  """
  args = ({"model_dir": model_dir} if model_dir is not None else {}) | overrides
  return run_training(run_lib.build_run(run_config(**args)))


class _Preemption(contextlib.AbstractContextManager):
  """SIGTERM (a TPU preemption notice) asks for a checkpoint at the next step and an exit.

  Multi-host, JAX's preemption service owns SIGTERM and syncs the step across hosts.
  """

  def __init__(self, process_count: int):
    self.requested = False
    self._previous = None
    if process_count == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handler)

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handler(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint at the next step, then exiting.")
    self.requested = True


def _restore_reference(run: run_lib.Run):
  """The frozen reference's parameters (first: a missing checkpoint fails before MODEL_DIR
  is touched), cast to its compute dtype."""
  if not run.cfg.needs_reference:
    return None
  params, step = ckpt_lib.restore_params(run.cfg.reference_dir, run.trainer.abstract_ref_params)
  run.info["reference_step"] = step
  return steps_lib.cast_params(params, run.ref_model_cfg.compute_dtype)


# run_info.json: each start that did not resume from the latest checkpoint (a checkpoint that
# could not be restored, or train.restore_step), kept across restarts.
FALLBACKS = "checkpoint_fallbacks"


def _start(run: run_lib.Run, ckpt: ckpt_lib.Checkpointer):
  """(state, step): the newest checkpoint of MODEL_DIR that restores (and the input
  position), or train.restore_step's, or init. A fallback is recorded in run_info.json."""
  cfg = run.cfg
  history = (outputs.read_run_info(cfg.model_dir) or {}).get(FALLBACKS, [])
  run.info[FALLBACKS] = history
  step = cfg.restore_step
  if step is not None and any(e.get("restore_step") == step for e in history):
    logging.info(
        "train.restore_step=%d was applied by an earlier start (run_info.json); "
        "resuming from the latest checkpoint", step)
    step = None
  got = ckpt.restore_readable(run.trainer.abstract_state, step=step)
  if got.step is None:
    state = run.trainer.init_fn(jax.random.key(cfg.random_seed))
    if cfg.online is not None:  # starts from the input's initial weights
      state = state.replace(
          mixing=mixing_log.initial_state(cfg.online, run.batches.probs,
                                          run.trainer.state_shardings.mixing))
    return state, 0
  run.batches.set_state(got.data_state)
  if got.set_aside or step is not None:
    history.append({
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "restored_step": got.step,
        "restore_step": step,
        "set_aside": got.set_aside
    })
  logging.info("resumed from %s at step %d", cfg.model_dir, got.step)
  return got.state, got.step


def _evaluators(run: run_lib.Run):
  """(evaluator, its history file, steps between evaluations) for each one the run has:
  per-domain log-perplexity and downstream tasks. Each also runs at the last step."""
  cfg = run.cfg
  if run.evaluator is not None:
    yield run.evaluator, outputs.EVAL_HISTORY, cfg.eval_every
  if run.downstream is not None:
    yield run.downstream, outputs.DOWNSTREAM_HISTORY, cfg.downstream.every


def _due(step: int, every: int, last: int) -> bool:
  return step > 0 and ((every and step % every == 0) or step == last)


def _catch_up_eval(run: run_lib.Run, state, start: int) -> None:
  """Drops evaluations after the restored step; killed between a checkpoint and its
  evaluation, evaluates the restored step now."""
  cfg = run.cfg
  for evaluator, name, every in _evaluators(run):
    path = os.path.join(cfg.model_dir, name)
    outputs.truncate_jsonl(path, start)
    ckpt_lib.barrier(f"{name} truncated")
    if _due(start, every,
            cfg.train_steps) and start not in [r["step"] for r in outputs.read_jsonl(path)]:
      evaluator.run(state.params, start, cfg.model_dir)


def run_training(run: run_lib.Run) -> dict:
  """The training loop of a built run; every resource is closed on every exit."""
  cfg = run.cfg
  ref_params = _restore_reference(run)
  with contextlib.ExitStack() as stack:
    stack.callback(run.close)
    ckpt = stack.enter_context(
        ckpt_lib.Checkpointer(cfg.model_dir, save_every=cfg.checkpoint_every,
                              keep=cfg.keep_checkpoints))
    state, start = _start(run, ckpt)
    outputs.write_json(os.path.join(cfg.model_dir, outputs.RUN_INFO), run.info)
    config_lib.write_operative_config(cfg.model_dir)
    writer = metrics_lib.MetricsWriter(cfg.model_dir)
    stack.callback(writer.close)
    writer.truncate_after(start)
    _catch_up_eval(run, state, start)
    trajectory = metrics_lib.Trajectory(cfg.model_dir, start) if cfg.doremi else None
    if trajectory is not None:
      stack.callback(trajectory.flush)
    mlog = None
    if run.batches is not None and run.batches.sampling == "scheduled":
      mlog = mixing_log.MixingLog(cfg.model_dir, run.domains, run.batches, online=cfg.online,
                                  start=start, state=state)
      stack.callback(mlog.flush)
    preempt = stack.enter_context(_Preemption(jax.process_count()))
    loop = _Loop(run, ckpt, writer, (trajectory, mlog), preempt, start)
    stack.callback(loop.progress.close)
    state = loop.run(state, ref_params)
    ckpt.close()  # waits for the last save before the outputs below
  if trajectory is not None and loop.step >= cfg.train_steps:
    trajectory.flush()
    metrics_lib.write_domain_weights(cfg.model_dir, state, run.info, cfg.doremi,
                                     reference_dir=cfg.reference_dir, steps=cfg.train_steps)
  if mlog is not None and loop.step >= cfg.train_steps and jax.process_index() == 0:
    mlog.finish(cfg.train_steps, state)
  ckpt_lib.barrier(f"train done: {cfg.model_dir}")  # outputs written by process 0 are complete
  return {
      "step": loop.step,
      "preempted": preempt.requested and loop.step < cfg.train_steps,
      **loop.last
  }


class _Loop:
  """The step loop: metrics are read one step late, checkpoints hold no unread metrics."""

  def __init__(self, run, ckpt, writer, logs, preempt, start: int):
    self.run_, self.ckpt, self.writer = run, ckpt, writer
    (self.trajectory, self.mlog), self.preempt = logs, preempt
    self.step, self.last, self.tokens = start, {}, 0.0
    self.pending, self.t_log = None, time.time()
    self.progress = metrics_lib.Progress(run.cfg.train_steps, start)

  def run(self, state, ref_params):
    cfg, trainer = self.run_.cfg, self.run_.trainer
    end = cfg.train_steps
    if cfg.stop_after_steps is not None:
      end = min(end, self.step + cfg.stop_after_steps)
    while self.step < end:
      batch = trainer.make_batch(next(self.run_.batches))
      state, metrics = trainer.step_fn(*trainer_lib.step_args(trainer, state, batch, ref_params))
      # Read the previous step's metrics now: the host never waits on the step just issued.
      self._consume()
      self.pending = (self.step + 1, metrics)
      self.step += 1
      stopping = self.preempt.requested or (jax.process_count() > 1 and
                                            self.ckpt.reached_preemption(self.step))
      saving = self.step % cfg.checkpoint_every == 0 or stopping or self.step == end
      if self.step % cfg.log_every == 0 or saving:
        self._log()
      if saving:
        self.ckpt.save(self.step, state, self.run_.batches.get_state(), force=True)
      self.ckpt.check()  # a save that failed in the background stops the run now
      # Preempted: exit within the grace period; a due evaluation runs on resume (_catch_up_eval).
      for evaluator, _, every in _evaluators(self.run_) if not stopping else ():
        if _due(self.step, every, cfg.train_steps):
          evaluator.run(state.params, self.step, cfg.model_dir)
      if stopping:
        logging.warning("preempted: checkpoint saved at step %d; exiting.", self.step)
        break
    self._consume()
    return state

  def _consume(self) -> None:
    if self.pending is not None:
      self.last, tokens = _host_metrics(self.pending, self.run_.domains, self.trajectory, self.mlog)
      self.tokens += tokens
      self.pending = None

  def _log(self) -> None:
    self._consume()
    elapsed, self.t_log = time.time() - self.t_log, time.time()
    self.last.update(tokens_per_second=self.tokens / max(elapsed, 1e-9),
                     learning_rate=float(self.run_.trainer.schedule(self.step - 1)))
    self.tokens = 0.0
    if self.trajectory is not None:  # have the weights settled so far?
      self.last["weight_diagnostics"] = self.trajectory.diagnostics()
    self.writer.write(self.step, self.last)
    for log in (self.trajectory, self.mlog):
      if log is not None:
        log.flush()
    self.progress.update(self.step, self.last["loss"], self.last["tokens_per_second"])
    if not self.progress.enabled and jax.process_index() == 0:
      logging.info("step %d/%d loss %.4f  %.0f tokens/s", self.step, self.run_.cfg.train_steps,
                   self.last["loss"], self.last["tokens_per_second"])


def _host_metrics(pending, domains, trajectory, mlog=None):
  """Host copies of one step's metrics and its token count; NaN/inf loss stops the run."""
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
    ref_sums = np.asarray(m["domain_ref_loss_sums"])
    out["domain_ref_loss"] = {d: float(s / c) for d, s, c in zip(domains, ref_sums, counts) if c > 0}
    for key in ("domain_weights", "avg_domain_weights", "domain_excess"):
      out[key] = dict(zip(domains, map(float, m[key])))
    trajectory.append(step, m["domain_weights"], m["avg_domain_weights"])
  if mlog is not None:  # weights in force at this step; an online run's next ones to the input
    out["sampling_weights"] = mlog.record(step, m)
    if "domain_excess" in m:
      out["domain_excess"] = dict(zip(domains, map(float, m["domain_excess"])))
  return out, float(m["num_tokens"])


def main(argv=None):
  config_lib.run_main(train, argv)
