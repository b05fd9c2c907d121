"""Online mixing: a main run's sampling weights updated from its own training signal.

Pure jnp, shape key K domains. Two methods:

- online DoReMi ("doremi"): each step, the main model's clipped per-domain excess loss over
  a frozen reference gives the paper's exponentiated-gradient update (doremi.step: same eta,
  smoothing c, floor c/K). A domain absent from the batch keeps its previous excess (the last
  value: the paper's rule), so a rarely drawn domain's estimate can be many steps old.
- ODM ("odm"; Albalak et al. 2023, "Efficient Online Data Mixing", Algorithm 1): EXP3 over
  domains with the training loss as reward, no reference. Exploration eps_t =
  min(1/K, sqrt(ln K / (K t))), policy pi = (1 - K eps_t) softmax(eps_{t-1} R) + eps_t, and
  the reward an exponential moving average (factor a) of the importance-weighted loss
  loss_i / pi_i. ODM draws one domain per step; here a step draws B rows from pi, taken as
  n_i plays of domain i with its mean token loss: R_i <- a^{n_i} R_i + (1 - a^{n_i})
  loss_i / pi_i. A domain with no row keeps its reward (ODM's unplayed arm).

The weights reach the host sampler one step late, so the host never waits for the device:
batch s is drawn with the weights produced by the update of step s - 2 (the first two
batches with the initial weights). The state keeps both weights in flight, `pending_K` (this
step's batch was drawn with them) and `next_K` (the next batch's), so a resumed run draws
exactly what an uninterrupted one would.
"""
import dataclasses
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from doremi_jax import doremi

METHODS = ("doremi", "odm")


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
  """A main run that updates its own sampling weights (gin: `OnlineMixing`).

  method: "doremi" (needs train.reference_dir: a reference of the same vocabulary and
    domains) or "odm" (no reference).
  eta, smoothing: online DoReMi's step size and c (the paper's 1.0 and 1e-3).
  reward_smoothing: ODM's moving-average factor a of the reward, in [0, 1).
  exploration: ODM's floor eps; None: the decaying eps_t above; else a constant in (0, 1/K)
    (1/K would make the policy uniform for ever).
  learning_rate: ODM's softmax scale; None: eps_{t-1} as in ODM; else a constant > 0.
  """
  method: str = "doremi"
  eta: float = 1.0
  smoothing: float = 1e-3
  reward_smoothing: float = 0.9
  exploration: Optional[float] = None
  learning_rate: Optional[float] = None

  def validate(self, num_domains: Optional[int] = None) -> None:
    if self.method not in METHODS:
      raise ValueError(f"OnlineMixing.method={self.method!r}: use one of {METHODS}.")
    if self.method == "doremi":
      doremi.validate(eta=self.eta, smoothing=self.smoothing)
      return
    if not 0.0 <= self.reward_smoothing < 1.0:
      raise ValueError(f"OnlineMixing.reward_smoothing={self.reward_smoothing}: ODM's moving "
                       f"average factor must be in [0, 1) (ODM uses 0.9).")
    if self.learning_rate is not None and not self.learning_rate > 0:
      raise ValueError(f"OnlineMixing.learning_rate={self.learning_rate}: must be > 0, or None "
                       f"for ODM's eps_(t-1).")
    if self.exploration is not None:
      top = 1.0 / num_domains if num_domains else 1.0
      if not 0.0 < self.exploration < top:
        raise ValueError(f"OnlineMixing.exploration={self.exploration}: the floor must be in "
                         f"(0, 1/K) = (0, {top:.4g}), or None for ODM's decaying schedule.")

  @property
  def needs_reference(self) -> bool:
    return self.method == "doremi"


class OdmState(NamedTuple):
  reward_K: jnp.ndarray  # smoothed importance-weighted loss per domain
  num_updates: jnp.ndarray  # t, int32


class MixingState(NamedTuple):
  """Online weights in the train state (replicated; checkpointed with the rest)."""
  pending_K: jnp.ndarray  # the weights this step's batch was drawn with
  next_K: jnp.ndarray  # the weights the next step's batch is drawn with
  method: Any  # doremi.DoReMiState or OdmState


def init_state(cfg: OnlineConfig, initial_K) -> MixingState:
  w = jnp.asarray(initial_K, jnp.float32)
  w = w / jnp.sum(w)
  if cfg.method == "doremi":
    method = doremi.init_state(w.shape[0], initial_alpha_K=w)
  else:
    method = OdmState(reward_K=jnp.zeros_like(w), num_updates=jnp.zeros((), jnp.int32))
  return MixingState(pending_K=w, next_K=w, method=method)


def exploration(t, num_domains: int, fixed: Optional[float] = None):
  """ODM's eps_t = min(1/K, sqrt(ln K / (K t))) for t >= 1 (1/K at t = 0), or a constant."""
  k = num_domains
  if fixed is not None:
    return jnp.asarray(fixed, jnp.float32)
  t = jnp.maximum(jnp.asarray(t, jnp.float32), 1e-9)
  return jnp.minimum(1.0 / k, jnp.sqrt(math.log(k) / (k * t)))


def odm_policy(reward_K, t, cfg: OnlineConfig):
  """pi_t = (1 - K eps_t) softmax(lr * R) + eps_t, lr = eps_{t-1} unless fixed."""
  k = reward_K.shape[-1]
  eps = exploration(t, k, cfg.exploration)
  lr = exploration(t - 1, k, cfg.exploration) if cfg.learning_rate is None else cfg.learning_rate
  return (1.0 - k * eps) * jax.nn.softmax(lr * reward_K) + eps


def odm_step(ostate: OdmState, loss_sums_K, counts_K, rows_K, pi_K,
             cfg: OnlineConfig) -> tuple[OdmState, jnp.ndarray]:
  """One ODM update from the batch drawn with pi_K; returns (state, next policy)."""
  present = counts_K > 0
  mean_loss = loss_sums_K / jnp.where(present, counts_K, 1.0)
  keep = jnp.power(cfg.reward_smoothing, rows_K)
  played = keep * ostate.reward_K + (1.0 - keep) * mean_loss / jnp.maximum(pi_K, 1e-30)
  reward = jnp.where(present, played, ostate.reward_K)
  t = ostate.num_updates + 1
  return OdmState(reward_K=reward, num_updates=t), odm_policy(reward, t + 1, cfg)


def step(mstate: MixingState, cfg: OnlineConfig, *, loss_sums_K, counts_K, rows_K,
         excess_sums_K=None) -> MixingState:
  """One online update; the new weights are drawn from two steps later (module docstring)."""
  if cfg.method == "doremi":
    method = doremi.step(mstate.method, excess_sums_K, counts_K, eta=cfg.eta,
                         smoothing=cfg.smoothing)
    new_K = method.alpha_K
  else:
    method, new_K = odm_step(mstate.method, loss_sums_K, counts_K, rows_K, mstate.pending_K, cfg)
  return MixingState(pending_K=mstate.next_K, next_K=new_K, method=method)


def rows_per_domain(domain_ids_BxL, num_domains: int):
  """[K] number of rows of each domain (rows are packed within one domain; padding is 0)."""
  row_domain = jnp.max(domain_ids_BxL, axis=1)
  ids = jnp.arange(1, num_domains + 1, dtype=row_domain.dtype)
  return jnp.sum((row_domain[:, None] == ids).astype(jnp.float32), axis=0)
