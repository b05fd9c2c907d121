"""Builds a run's model, optimizer, shardings and jitted steps on a mesh.

Abstract init -> shardings -> sharded init: parameters are never materialized on one device
and resharded. The same builder serves training, DoReMi, evaluation and compile checks on
abstract (TPU topology) devices.
"""
import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from doremi_jax import doremi
from doremi_jax import mixing
from doremi_jax import optim
from doremi_jax import sharding as sharding_lib
from doremi_jax import steps
from doremi_jax.model import Transformer, TransformerConfig
from doremi_jax.state import TrainState

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions", "domain_ids")
_BATCH_DTYPES = {"loss_mask": jnp.float32}


def validate_shapes(*, model_cfg: TransformerConfig, mesh: Mesh, global_batch_size: int,
                    seq_len: int, accum_steps: int, total_steps: int,
                    num_processes: int = 1) -> None:
  """Clear errors for shapes that cannot work, before anything compiles."""
  if total_steps <= 0:
    raise ValueError(f"TRAIN_STEPS={total_steps}: must be a positive number of steps.")
  if seq_len > model_cfg.max_len:
    raise ValueError(f"sequence length {seq_len} (TASK_FEATURE_LENGTHS) is over the model's "
                     f"maximum max_len={model_cfg.max_len}; shorten it or raise "
                     f"TransformerConfig.max_len.")
  if model_cfg.logits_chunk and seq_len > model_cfg.logits_chunk and \
      seq_len % model_cfg.logits_chunk:
    raise ValueError(f"TransformerConfig.logits_chunk={model_cfg.logits_chunk} must divide the "
                     f"sequence length {seq_len}.")
  dp = sharding_lib.data_parallel_size(mesh)
  if accum_steps < 1 or global_batch_size % accum_steps:
    raise ValueError(f"BATCH_SIZE={global_batch_size} is not divisible by accum_steps="
                     f"{accum_steps}; choose sizes with BATCH_SIZE % accum_steps == 0.")
  micro = global_batch_size // accum_steps
  if micro % dp:
    raise ValueError(
        f"BATCH_SIZE={global_batch_size} (microbatch {micro} with accum_steps={accum_steps}) "
        f"is not divisible by the data-parallel size {dp} (mesh data x fsdp = "
        f"{mesh.shape['data']} x {mesh.shape['fsdp']}); use a multiple of {dp * accum_steps}.")
  if global_batch_size % num_processes:
    raise ValueError(f"BATCH_SIZE={global_batch_size} is not divisible by the {num_processes} "
                     f"hosts; each host feeds an equal slice.")
  for name, size, axis in (("num_heads", model_cfg.num_heads, "model"),
                           ("mlp_dim", model_cfg.mlp_dim, "model"), ("emb_dim", model_cfg.emb_dim,
                                                                     "fsdp")):
    if size % mesh.shape[axis]:
      raise ValueError(f"{name}={size} is not divisible by the mesh's {axis} axis "
                       f"({mesh.shape[axis]}); change MESH_SHAPE or the model size.")


@dataclasses.dataclass
class Trainer:
  """Everything compiled for one run; see build_trainer."""
  model_cfg: TransformerConfig
  model: Transformer
  mesh: Mesh
  tx: Any
  schedule: Any
  opt_cfg: optim.OptimizerConfig
  step_cfg: steps.StepConfig
  abstract_state: Any  # TrainState of ShapeDtypeStructs with shardings
  state_shardings: Any
  batch_sharding: NamedSharding
  abstract_batch: dict
  init_fn: Any  # jitted rng -> TrainState
  step_fn: Any  # jitted (state, batch) or (state, ref_params, batch)
  eval_fn: Any  # jitted (params, batch) -> per-domain sums and counts
  ref_model_cfg: Optional[TransformerConfig] = None
  abstract_ref_params: Any = None
  ref_shardings: Any = None

  @property
  def is_doremi(self) -> bool:
    """The step takes the frozen reference (a DoReMi proxy step, or online DoReMi)."""
    return self.ref_model_cfg is not None

  def make_batch(self, host_batch: dict) -> dict:
    """Global jax arrays from this host's numpy slice of the batch."""
    out = {}
    for key, spec in self.abstract_batch.items():
      local = np.asarray(host_batch[key], spec.dtype)
      global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
      out[key] = jax.make_array_from_process_local_data(self.batch_sharding, local, global_shape)
    return out


def abstract_params_and_shardings(model, mesh, rules, seq_len):
  dummy = jnp.zeros((1, seq_len), jnp.int32)
  boxed = jax.eval_shape(lambda r: model.init(r, dummy, dummy, dummy), jax.random.key(0))
  logical = nn.get_partition_spec(boxed)["params"]
  abstract = nn.meta.unbox(boxed)["params"]
  shardings = sharding_lib.logical_shardings(logical, mesh, rules)
  return abstract, shardings, dummy


def _opt_state_shardings(tx, abstract_params, param_sh, repl):
  """Moments shaped like their parameter are sharded like it; the rest (counts, Adafactor's
  small factored moments) is replicated."""
  abstract_opt = jax.eval_shape(tx.init, abstract_params)

  def pick(leaf, p_sharding, p_abstract):
    return p_sharding if getattr(leaf, "shape", None) == p_abstract.shape else repl

  return optax.tree_map_params(tx, pick, abstract_opt, param_sh, abstract_params,
                               transform_non_params=lambda _: repl)


def in_mesh(fn, mesh: Mesh, rules):
  """fn traced with the mesh and logical-axis rules in context, so that the model's
  activation constraints (nn.with_logical_constraint) take effect."""

  @functools.wraps(fn)
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args)

  return wrapped


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                      shardings)


def build_trainer(*, model_cfg: TransformerConfig, mesh: Mesh, global_batch_size: int, seq_len: int,
                  total_steps: int, step_cfg: steps.StepConfig,
                  opt_cfg: optim.OptimizerConfig = optim.OptimizerConfig(),
                  rules=sharding_lib.DEFAULT_RULES,
                  ref_model_cfg: Optional[TransformerConfig] = None, initial_alpha_K=None,
                  num_processes: int = 1) -> Trainer:
  """Model, optimizer, abstract state, shardings and jitted steps for one run.

  A reference model config makes this a DoReMi (proxy) run: the state carries the domain
  weights, and step_fn is proxy_step(state, ref_params, batch) with step_cfg.doremi's
  settings (the paper's defaults when None). step_cfg.online makes it an online-mixing main
  run: the state carries the sampling weights (uniform at init; train._start sets the
  input's initial weights), and step_fn is online_step (with the reference for online DoReMi).
  """
  validate_shapes(model_cfg=model_cfg, mesh=mesh, global_batch_size=global_batch_size,
                  seq_len=seq_len, accum_steps=step_cfg.accum_steps, total_steps=total_steps,
                  num_processes=num_processes)
  model = Transformer(model_cfg)
  tx, schedule = optim.make_optimizer(opt_cfg, total_steps)
  abstract_params, param_sh, dummy = abstract_params_and_shardings(model, mesh, rules, seq_len)
  repl = sharding_lib.replicated(mesh)
  opt_sh = _opt_state_shardings(tx, abstract_params, param_sh, repl)
  num_domains = step_cfg.num_domains
  online = step_cfg.online
  is_doremi = ref_model_cfg is not None and online is None

  def init(rng):
    params = nn.meta.unbox(model.init(rng, dummy, dummy, dummy))["params"]
    initial_lambda = (step_cfg.doremi or doremi.DoReMiConfig()).initial_lambda
    dstate = (
        doremi.init_state(num_domains, initial_lambda, initial_alpha_K) if is_doremi else None)
    # Uniform here (the state's shape for abstract init and restore); a fresh run replaces
    # it with the input's initial weights (train._start).
    mstate = (
        mixing.init_state(online, jnp.full(num_domains, 1.0 /
                                           num_domains)) if online is not None else None)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), doremi=dstate,
        mixing=mstate)

  abstract_state = jax.eval_shape(init, jax.random.key(0))
  state_sh = TrainState(step=repl, params=param_sh, opt_state=opt_sh,
                        doremi=jax.tree.map(lambda _: repl, abstract_state.doremi),
                        mixing=jax.tree.map(lambda _: repl, abstract_state.mixing))
  abstract_state = _with_shardings(abstract_state, state_sh)
  init_fn = jax.jit(init, out_shardings=state_sh)

  batch_sh = sharding_lib.batch_sharding(mesh, rules)
  abstract_batch = {
      k:
          jax.ShapeDtypeStruct((global_batch_size, seq_len), _BATCH_DTYPES.get(k, jnp.int32),
                               sharding=batch_sh) for k in BATCH_KEYS
  }
  trainer = Trainer(model_cfg=model_cfg, model=model, mesh=mesh, tx=tx, schedule=schedule,
                    opt_cfg=opt_cfg, step_cfg=step_cfg, abstract_state=abstract_state,
                    state_shardings=state_sh, batch_sharding=batch_sh,
                    abstract_batch=abstract_batch, init_fn=init_fn, step_fn=None, eval_fn=None)
  _jit_steps(trainer, model, tx, step_cfg, rules, ref_model_cfg)
  return trainer


def _jit_steps(trainer: Trainer, model, tx, step_cfg: steps.StepConfig, rules,
               ref_model_cfg: Optional[TransformerConfig]) -> None:
  """trainer.step_fn (train or proxy step) and eval_fn, jitted with shardings and donation."""
  mesh, state_sh, batch_sh = trainer.mesh, trainer.state_shardings, trainer.batch_sharding
  repl = sharding_lib.replicated(mesh)
  param_sh = state_sh.params
  if ref_model_cfg is not None:
    ref_model = Transformer(ref_model_cfg)
    abstract_ref, ref_sh, _ = abstract_params_and_shardings(
        ref_model, mesh, rules, trainer.abstract_batch["inputs"].shape[1])
    trainer.ref_model_cfg = ref_model_cfg
    trainer.abstract_ref_params = _with_shardings(abstract_ref, ref_sh)
    trainer.ref_shardings = ref_sh
    step = steps.online_step if step_cfg.online is not None else steps.proxy_step
    trainer.step_fn = jax.jit(
        in_mesh(
            functools.partial(step, model=model, ref_model=ref_model, tx=tx, cfg=step_cfg), mesh,
            rules), in_shardings=(state_sh, ref_sh, batch_sh), out_shardings=(state_sh, repl),
        donate_argnums=(0,))
  elif step_cfg.online is not None:  # ODM: no reference
    trainer.step_fn = jax.jit(
        in_mesh(
            functools.partial(steps.online_step_without_reference, model=model, tx=tx,
                              cfg=step_cfg), mesh, rules), in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, repl), donate_argnums=(0,))
  else:
    trainer.step_fn = jax.jit(
        in_mesh(functools.partial(steps.train_step, model=model, tx=tx, cfg=step_cfg), mesh, rules),
        in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl), donate_argnums=(0,))
  trainer.eval_fn = jax.jit(
      in_mesh(functools.partial(steps.eval_step, model=model, cfg=step_cfg), mesh, rules),
      in_shardings=(param_sh, batch_sh), out_shardings=repl)


def step_args(trainer: Trainer, state, batch, ref_params=None):
  """Positional arguments of trainer.step_fn."""
  return (state, ref_params, batch) if trainer.is_doremi else (state, batch)


def abstract_step_args(trainer: Trainer):
  """Abstract arguments for trainer.step_fn.lower(...) (compile checks)."""
  return step_args(trainer, trainer.abstract_state, trainer.abstract_batch,
                   trainer.abstract_ref_params)
