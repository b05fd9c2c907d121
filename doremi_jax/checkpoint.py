"""Orbax checkpoints under MODEL_DIR/checkpoints: the train state and the input position.

Each checkpoint step holds two items saved together: `state` (the TrainState pytree,
sharded) and `data` (the batch iterator's small integer state). MODEL_DIR/run_info.json
records what the run is (model, vocabulary, domains) so that a restart or a DoReMi run can
check a checkpoint before compiling anything.

Faults: a save that fails (disk full, no permission, quota, a gs:// error) stops the run
with one OutputError naming the directory and the cause; complete checkpoints stay as they
are, and the next start removes the unfinished save. On start, a checkpoint that cannot be
restored is moved to MODEL_DIR/checkpoints_set_aside (never deleted) and the newest earlier
one that can be restored is used.
"""
import dataclasses
import logging
import os
import sys
import warnings
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from doremi_jax import outputs
from doremi_jax.model import PLATFORM_FIELDS


def checkpoint_dir(model_dir: str) -> str:
  """MODEL_DIR/checkpoints; orbax needs local paths absolute (gs:// stays as is)."""
  if "://" not in model_dir:
    model_dir = os.path.abspath(model_dir)
  return os.path.join(model_dir, outputs.CHECKPOINTS)


def barrier(name: str) -> None:
  """All processes wait here; files process 0 wrote before it are then readable by all."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


RESUME_KEYS = ("kind", "model", "vocabulary", "domains", "sequence_length", "batch_size",
               "random_seed")


def _identity(key: str, value):
  """What must match on resume: the model less its platform settings (model.PLATFORM_FIELDS:
  the attention kernel may change with the accelerator)."""
  if key == "model" and isinstance(value, dict):
    return {k: v for k, v in value.items() if k not in PLATFORM_FIELDS}
  return value


def check_run_info(model_dir: str, info: dict, *, keys=RESUME_KEYS):
  """Errors if MODEL_DIR holds a checkpoint of a different run; nothing is overwritten.

  Batch size, seed and sequence length are part of a run: changing them on resume would
  change the data stream, so resuming with other values is refused too.
  """
  old = outputs.read_run_info(model_dir)
  if old is None:
    return
  for key in keys:
    if key in old and _identity(key, old[key]) != _identity(key, info.get(key)):
      raise ValueError(f"MODEL_DIR={model_dir} holds a checkpoint of a different {key}:\n"
                       f"  saved:     {old[key]}\n  requested: {info.get(key)}\n"
                       f"Use a new MODEL_DIR, or the original settings to resume.")


class Checkpointer:
  """Async orbax CheckpointManager: save every N steps, keep the last K, restore latest.

  A context manager: leaving it normally waits for the last save (raising if it failed);
  leaving it on an error closes without raising another.
  """

  def __init__(self, model_dir: str, *, save_every: int, keep: int, async_save: bool = True):
    self.model_dir, self.directory = model_dir, checkpoint_dir(model_dir)
    self._pending = None  # the step of a save that may still be running
    _BACKGROUND_ERRORS.install(self.directory)
    _log_unfinished_saves(self.directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=max(save_every, 1),
        create=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        # Created in save(): created in the background, a failure there leaves orbax's other
        # save threads waiting minutes for a signal that never comes.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    try:
      self.manager = ocp.CheckpointManager(
          self.directory, options=options, item_handlers={
              "state": ocp.PyTreeCheckpointHandler(),
              "data": ocp.JsonCheckpointHandler()
          })
    except Exception as e:  # pylint: disable=broad-except
      if not outputs.is_io_error(e):
        raise
      raise outputs.OutputError(f"could not open the checkpoint directory {self.directory}: "
                                f"{outputs.first_line(e)}. {outputs.WRITE_HINT}") from None

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      self.close()
    else:
      self._close_quietly()

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
    """Starts an async save of `step`; a failed earlier save raises OutputError here."""
    self._wait()
    data = {k: np.asarray(v).tolist() for k, v in data_state.items()}
    try:
      saved = self.manager.save(
          step,
          args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                  data=ocp.args.JsonSave(data)), force=force)
    except ocp.checkpoint_manager.StepAlreadyExistsError:
      raise  # a bug, not a fault of the storage
    except Exception as e:  # pylint: disable=broad-except  # I/O, TensorStore, gs://
      raise self._save_error(step, e) from None
    if saved:
      self._pending = step
    return saved

  def check(self) -> None:
    """Raises OutputError if the last save failed in the background; never blocks on a
    save still running (cheap: call it every step)."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self._wait()

  def _wait(self) -> None:
    step, self._pending = self._pending, None
    if step is None:
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from None

  def _save_error(self, step: int, e: BaseException) -> outputs.OutputError:
    done = [s for s in self.manager.all_steps() if s < step]
    resume = (f"it resumes from step {max(done)}, the last complete checkpoint (left as it is)"
              if done else "no checkpoint was completed, so it starts from step 0")
    return outputs.OutputError(
        f"could not save the checkpoint of step {step} in {self.directory}: "
        f"{outputs.first_line(e)}. Free space or restore write access there, then rerun the "
        f"same command: {resume}.")

  def restore(self, step: int, abstract_state):
    """Restores (state, data_state) at `step`, sharded like abstract_state."""
    restored = self.manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                abstract_state,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
            data=ocp.args.JsonRestore()))
    data = {k: np.asarray(v) for k, v in restored["data"].items()}
    return restored["state"], data

  def restore_readable(self, abstract_state, *, step: Optional[int] = None) -> "Restored":
    """The newest checkpoint that restores (or exactly `step`); Restored(step=None) if none.

    Newer ones that fail to restore (or, with `step`, all newer ones) are then moved to
    MODEL_DIR/checkpoints_set_aside, with one warning each. If none restores, nothing is
    moved and OutputError lists what was tried.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if step is not None and step not in steps:
      raise ValueError(f"train.restore_step={step}: {self.directory} holds no checkpoint of "
                       f"that step (it holds steps {sorted(steps) or 'none'}).")
    failed = {}  # step: the first line of why it cannot be restored
    for candidate in ([step] if step is not None else steps):
      try:
        state, data_state = _agreed(self.restore, candidate, abstract_state)
      except Exception as e:  # pylint: disable=broad-except  # any failure to read it
        failed[candidate] = outputs.first_line(e)
        continue
      moved = [
          self._set_aside(s, "unreadable", f"cannot be restored: {failed[s]}") if s in failed else
          self._set_aside(s, "superseded", f"is newer than train.restore_step={step}")
          for s in steps
          if s > candidate
      ]
      if failed:  # the failed reads' background errors are in the warnings above
        jax.effects_barrier()
        _BACKGROUND_ERRORS.reset()
      return Restored(state, data_state, candidate, moved)
    if not failed:
      return Restored(None, None, None, [])
    tried = "\n".join(f"  step {s}: {reason}" for s, reason in failed.items())
    raise outputs.OutputError(
        f"no checkpoint in {self.directory} can be restored (nothing was moved or deleted):\n"
        f"{tried}\nFix or replace them (they are as they were), or start over in a new "
        f"MODEL_DIR.")

  def _set_aside(self, step: int, why: str, reason: str) -> dict:
    """Moves checkpoint `step` to MODEL_DIR/checkpoints_set_aside/<step>.<why>[.n]."""
    fs = outputs.gfile()
    root = os.path.join(os.path.dirname(self.directory), outputs.SET_ASIDE)
    dst, n = os.path.join(root, f"{step}.{why}"), 0
    while fs.exists(dst):
      n += 1
      dst = os.path.join(root, f"{step}.{why}.{n}")
    src = os.path.join(self.directory, str(step))
    if outputs.is_writer():
      outputs.move_dir(src, dst)
    barrier(f"checkpoint {step} set aside")
    self.manager.reload()
    logging.warning("checkpoint %s %s; moved to %s", src, reason, dst)
    return {"step": step, "why": why, "reason": reason, "moved_to": dst}

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    """Waits for pending saves (raising OutputError if one failed) and closes; a second
    call does nothing."""
    if self.manager is not None:
      self._wait()
      manager, self.manager = self.manager, None
      manager.close()
      _BACKGROUND_ERRORS.report()

  def _close_quietly(self) -> None:
    """Closes on an error path: the error already raised is the message; a failure here
    (or what orbax's threads logged) is not another one."""
    manager, self.manager, self._pending = self.manager, None, None
    try:
      if manager is not None:
        manager.close()
    except Exception:  # pylint: disable=broad-except
      pass
    _BACKGROUND_ERRORS.reset()


@dataclasses.dataclass
class Restored:
  """What restore_readable found: the state at `step` (None: no checkpoint yet), and the
  checkpoints it moved aside ({step, why, reason, moved_to})."""
  state: object
  data_state: Optional[dict]
  step: Optional[int]
  set_aside: list


def _agreed(restore, step: int, abstract_state):
  """restore(step, abstract_state) on every process; if it fails on any, it fails on all
  (a truncated file may break only the shards one host reads)."""
  error = None
  try:
    out = restore(step, abstract_state)
  except Exception as e:  # pylint: disable=broad-except
    error, out = e, None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    failures = multihost_utils.process_allgather(np.int32(error is not None))
    if error is None and np.any(failures):
      error = RuntimeError(f"step {step} cannot be read on another process")
  if error is not None:
    raise error
  return out


def _log_unfinished_saves(directory: str) -> None:
  """Logs the unfinished saves a stopped run left (orbax removes them: cleanup_tmp_directories)."""
  if not outputs.is_writer():
    return
  fs = outputs.gfile()
  for path in sorted(fs.glob(os.path.join(directory, "*.orbax-checkpoint-tmp*"))):
    logging.warning("removing %s: an unfinished checkpoint save left by a stopped run", path)


class _BackgroundErrors:
  """Keeps orbax's background-thread failures off the console: a failed save is logged with
  a traceback by each of its threads, asyncio logs every failed write again, and TensorStore
  callbacks then hit orbax's closed event loop. The main thread raises the failure once
  (Checkpointer.check/save/close); close() reports any that were never raised, in one line."""

  def __init__(self):
    self.installed, self.first, self.count = False, None, 0
    self.orbax_dir = os.path.dirname(os.path.dirname(os.path.abspath(ocp.__file__)))
    self.directories = set()  # of the checkpoints: asyncio's records name only their files

  def install(self, directory: str) -> None:
    self.directories.add(directory)
    if not self.installed:
      self.installed = True
      for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(self.filter)
      previous = sys.unraisablehook
      sys.unraisablehook = lambda u: None if self._background(u) else previous(u)
      # Restores abandoned after a failed read leave orbax's coroutines unawaited.
      warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited",
                              category=RuntimeWarning)

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or not self._from_orbax(record):
      return True
    self.count += 1
    if self.first is None:
      self.first = record.getMessage().split("\n", 1)[0]
    return False

  def _from_orbax(self, record: logging.LogRecord) -> bool:
    if record.pathname.startswith(self.orbax_dir):
      return True
    if record.name == "asyncio" and any(d in record.getMessage() for d in self.directories):
      return True  # "Future exception was never retrieved": a write of a failed save
    tb = record.exc_info[2] if record.exc_info else None
    while tb is not None:
      if tb.tb_frame.f_code.co_filename.startswith(self.orbax_dir):
        return True
      tb = tb.tb_next
    return False

  def _background(self, u) -> bool:
    """An unraisable error of orbax's background work (the closed event loop, or a task of a
    failed save or restore, whose failure the main thread reports): not printed."""
    if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
      return True
    tb = u.exc_traceback
    while tb is not None:
      if tb.tb_frame.f_code.co_filename.startswith(self.orbax_dir):
        return True
      tb = tb.tb_next
    return "orbax" in repr(u.object)

  def report(self) -> None:
    """Logs, once, background errors that no save raised (say, removing an old step)."""
    if self.count:
      logging.warning("orbax logged %d error(s) that did not stop the run; the first: %.300s",
                      self.count, self.first)
    self.reset()

  def reset(self) -> None:
    self.first, self.count = None, 0


_BACKGROUND_ERRORS = _BackgroundErrors()


def restore_params(model_dir: str, abstract_params, step: Optional[int] = None):
  """Read-only restore of only the parameters of another run (a DoReMi reference)."""
  directory = checkpoint_dir(model_dir)
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(
        f"No checkpoint in {directory}: train the reference first (gin/runs/reference.gin) "
        f"or point DoReMiConfig.reference_dir at a finished run.")
  item = {"params": abstract_params}
  try:
    restored = manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True)))
  except Exception as e:  # pylint: disable=broad-except  # any failure to read it
    raise outputs.OutputError(
        f"the reference checkpoint {os.path.join(directory, str(step))} cannot be restored: "
        f"{outputs.first_line(e)}. Point DoReMiConfig.reference_dir at a run whose latest "
        f"checkpoint is intact (or retrain the reference).") from None
  finally:
    manager.close()
  logging.info("restored reference parameters from %s step %d", directory, step)
  return restored["state"]["params"], step
