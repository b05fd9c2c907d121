"""Optimizers (Adafactor as in the paper, or AdamW) and the paper's learning-rate schedule.

Weight decay is decoupled and scaled by the scheduled learning rate for both optimizers:
one step with a zero gradient moves a weight w by -lr_t * weight_decay * w. This is AdamW's
rule, and the paper's Adafactor setting (Pax `sharded_adafactor`, HF `Adafactor`). Note that
`optax.adafactor(weight_decay_rate=wd)` adds wd * w after its learning-rate scaling, i.e.
unscaled by the learning rate: 1000x (at lr 1e-3) to 10000x (at 1e-4) stronger.
"""
import dataclasses
from typing import Callable, NamedTuple

import gin
import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adafactor", "adamw")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer and schedule of a run; gin/runs/base.gin binds the paper's values.

  Adafactor follows the authors' code (HF Adafactor with scale_parameter=False,
  relative_step=False): factored second moments with decay t^-0.8, update clipping at
  RMS 1.0, first moment beta1 = b1 (0.9; None-equivalent when b1 = 0). AdamW uses b1, b2.
  """
  name: str = "adafactor"  # "adafactor" (the paper's) or "adamw"
  peak_lr: float = 1e-3
  final_lr: float = 1e-4  # exponential decay from peak_lr reaches this at the last step
  warmup_fraction: float = 0.06  # linear warmup over this fraction of the steps
  weight_decay: float = 0.01  # decoupled, times the scheduled learning rate
  clip_norm: float = 1.0  # global gradient-norm clipping (0: none)
  b1: float = 0.9  # Adafactor's and AdamW's first-moment decay (0: no momentum)
  b2: float = 0.99  # AdamW's second-moment decay (the authors' value)
  eps: float = 1e-8  # AdamW's epsilon
  decay_rate: float = 0.8  # Adafactor: second-moment decay 1 - t^-decay_rate
  update_clip: float = 1.0  # Adafactor: clip each update's RMS at this (0: none)

  def validate(self) -> None:
    if self.name not in OPTIMIZERS:
      raise ValueError(f"OptimizerConfig.name={self.name!r}: use one of {OPTIMIZERS}.")
    if not 0 < self.final_lr <= self.peak_lr:
      raise ValueError(f"OptimizerConfig: need 0 < final_lr ({self.final_lr}) <= peak_lr "
                       f"({self.peak_lr}).")
    if not 0 <= self.warmup_fraction < 1:
      raise ValueError(f"OptimizerConfig.warmup_fraction={self.warmup_fraction}: must be "
                       f"in [0, 1).")
    for field in ("weight_decay", "clip_norm", "update_clip", "eps"):
      if getattr(self, field) < 0:
        raise ValueError(f"OptimizerConfig.{field}={getattr(self, field)}: must be >= 0.")
    for field in ("b1", "b2"):
      if not 0 <= getattr(self, field) < 1:
        raise ValueError(f"OptimizerConfig.{field}={getattr(self, field)}: must be in [0, 1).")


def lr_schedule(total_steps: int, *, peak_lr: float = 1e-3, final_lr: float = 1e-4,
                warmup_fraction: float = 0.06) -> Callable:
  """Linear warmup over a fraction of the steps, then exponential decay to final_lr at the end."""
  warmup = max(int(round(warmup_fraction * total_steps)), 1)
  decay_steps = max(total_steps - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak_lr * jnp.minimum(step + 1.0, warmup) / warmup
    frac = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    decayed = peak_lr * (final_lr / peak_lr)**frac
    return jnp.where(step < warmup, warm, decayed)

  return schedule


class _DecayState(NamedTuple):
  count: jnp.ndarray


def add_scheduled_decay(weight_decay: float, schedule: Callable) -> optax.GradientTransformation:
  """updates + schedule(t) * weight_decay * params (place after the lr scaling, before the
  sign flip): decoupled decay that shrinks with the learning rate, as in AdamW."""

  def init(params):
    del params
    return _DecayState(count=jnp.zeros((), jnp.int32))

  def update(updates, state, params):
    rate = schedule(state.count) * weight_decay
    updates = jax.tree.map(lambda u, p: u + rate * p.astype(u.dtype), updates, params)
    return updates, _DecayState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def _adafactor(cfg: OptimizerConfig, schedule) -> optax.GradientTransformation:
  chain = [optax.scale_by_factored_rms(decay_rate=cfg.decay_rate)]
  if cfg.update_clip:
    chain.append(optax.clip_by_block_rms(cfg.update_clip))
  chain.append(optax.scale_by_learning_rate(schedule, flip_sign=False))
  if cfg.b1:  # HF Adafactor: the first moment averages lr-scaled updates
    chain.append(optax.ema(cfg.b1, debias=False))
  if cfg.weight_decay:
    chain.append(add_scheduled_decay(cfg.weight_decay, schedule))
  chain.append(optax.scale(-1.0))
  return optax.chain(*chain)


def make_optimizer(cfg: OptimizerConfig, total_steps: int):
  """Returns (optax transform, schedule). Gradient clipping by global norm comes first."""
  cfg.validate()
  schedule = lr_schedule(total_steps, peak_lr=cfg.peak_lr, final_lr=cfg.final_lr,
                         warmup_fraction=cfg.warmup_fraction)
  if cfg.name == "adamw":  # optax.adamw's decay is lr * wd * params (decoupled, scheduled)
    opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  else:
    opt = _adafactor(cfg, schedule)
  chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
  return optax.chain(*chain, opt), schedule
