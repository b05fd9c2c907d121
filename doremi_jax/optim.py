"""Optimizers (optax AdamW or Adafactor) and the paper's learning-rate schedule."""
import gin
import jax.numpy as jnp
import optax


@gin.configurable
def lr_schedule(total_steps: int, *, peak_lr: float = 1e-3, final_lr: float = 1e-4,
                warmup_fraction: float = 0.06):
  """Linear warmup over a fraction of the steps, then exponential decay to final_lr at the end."""
  warmup = max(int(round(warmup_fraction * total_steps)), 1)
  decay_steps = max(total_steps - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak_lr * jnp.minimum(step + 1.0, warmup) / warmup
    frac = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    decayed = peak_lr * (final_lr / peak_lr) ** frac
    return jnp.where(step < warmup, warm, decayed)

  return schedule


@gin.configurable
def make_optimizer(total_steps: int, *, name: str = "adamw", weight_decay: float = 0.01,
                   clip_norm: float = 1.0, b1: float = 0.9, b2: float = 0.95):
  """Returns (optax transform, schedule). Gradient clipping by global norm comes first."""
  schedule = lr_schedule(total_steps)
  if name == "adamw":
    opt = optax.adamw(schedule, b1=b1, b2=b2, eps=1e-8, weight_decay=weight_decay)
  elif name == "adafactor":
    opt = optax.adafactor(schedule, weight_decay_rate=weight_decay or None,
                          multiply_by_parameter_scale=False, clipping_threshold=None)
  else:
    raise ValueError(f"optimizer name={name!r}: use 'adamw' or 'adafactor'.")
  chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  return optax.chain(*chain, opt), schedule
