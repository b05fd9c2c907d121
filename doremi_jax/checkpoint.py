"""Orbax checkpoints under MODEL_DIR/checkpoints: the train state and the input position.

Each checkpoint step holds two items saved together: `state` (the TrainState pytree,
sharded) and `data` (the batch iterator's small integer state). MODEL_DIR/run_info.json
records what the run is (model, vocabulary, domains) so that a restart or a DoReMi run can
check a checkpoint before compiling anything.
"""
import logging
import os
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from doremi_jax import outputs


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


def check_run_info(model_dir: str, info: dict, *, keys=RESUME_KEYS):
  """Errors if MODEL_DIR holds a checkpoint of a different run; nothing is overwritten.

  Batch size, seed and sequence length are part of a run: changing them on resume would
  change the data stream, so resuming with other values is refused too.
  """
  old = outputs.read_run_info(model_dir)
  if old is None:
    return
  for key in keys:
    if key in old and old[key] != info.get(key):
      raise ValueError(f"MODEL_DIR={model_dir} holds a checkpoint of a different {key}:\n"
                       f"  saved:     {old[key]}\n  requested: {info.get(key)}\n"
                       f"Use a new MODEL_DIR, or the original settings to resume.")


class Checkpointer:
  """Async orbax CheckpointManager: save every N steps, keep the last K, restore latest."""

  def __init__(self, model_dir: str, *, save_every: int, keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=max(save_every, 1),
                                           create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        checkpoint_dir(model_dir), options=options, item_handlers={
            "state": ocp.PyTreeCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler()
        })

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
    data = {k: np.asarray(v).tolist() for k, v in data_state.items()}
    return self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                data=ocp.args.JsonSave(data)), force=force)

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

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    """Waits for pending saves and closes; a second call does nothing."""
    if self.manager is not None:
      manager, self.manager = self.manager, None
      manager.wait_until_finished()
      manager.close()


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
  restored = manager.restore(
      step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
              partial_restore=True)))
  manager.close()
  logging.info("restored reference parameters from %s step %d", directory, step)
  return restored["state"]["params"], step
