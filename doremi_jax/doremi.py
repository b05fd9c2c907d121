"""DoReMi (Xie et al., 2023, Algorithm 1) as small pure functions of jnp arrays.

Shape key: B batch, L length, K domains. Domain ids are 1-based per token, 0 = padding;
every function takes an explicit token mask (a clipped excess of 0 is not padding).

One step t, given per-token proxy and reference losses of the global batch:
  excess_j    = max(loss_proxy_j - loss_ref_j, 0) on unmasked tokens
  lambda[i]   = sum of excess over domain i's tokens / their count   (absent: previous lambda)
  alpha'      = alpha_{t-1} * exp(eta * lambda)
  alpha_t     = (1 - c) * alpha' / sum(alpha') + c / K
  objective   = sum_i alpha_t[i] * mean proxy loss over domain i   (alpha_t held constant)
  output      = mean of alpha_1 .. alpha_T
"""
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

OBJECTIVES = ("domain_mean", "token_weighted")
SAMPLINGS = ("stratified", "uniform")


@dataclasses.dataclass(frozen=True)
class DoReMiConfig:
  """A DoReMi (proxy) run's settings: gin binds them (DoReMiConfig.eta, ...), the proxy
  step reads eta, smoothing and objective, the input reads sampling."""
  eta: float = 1.0  # exponentiated-gradient step size
  smoothing: float = 1e-3  # c: mixing toward uniform
  objective: str = "domain_mean"  # the paper's; "token_weighted" is the authors' code
  sampling: str = "stratified"  # proxy batches: "stratified" (B/K per domain) or "uniform"
  initial_lambda: float = 0.0  # excess of a domain absent before it is first seen

  def validate(self) -> None:
    validate(eta=self.eta, smoothing=self.smoothing, objective=self.objective)
    if self.sampling not in SAMPLINGS:
      raise ValueError(f"DoReMiConfig.sampling={self.sampling!r}: the proxy samples domains "
                       f"uniformly; use one of {SAMPLINGS}.")


class DoReMiState(NamedTuple):
  """The DoReMi part of the train state (replicated; checkpointed with the rest)."""
  alpha_K: jnp.ndarray  # current domain weights alpha_t
  avg_alpha_K: jnp.ndarray  # mean of alpha_1 .. alpha_t
  lambda_K: jnp.ndarray  # last per-domain excess (kept for domains absent from a batch)
  num_updates: jnp.ndarray  # t, int32


def init_state(num_domains: int, initial_lambda: float = 0.0, initial_alpha_K=None) -> DoReMiState:
  """alpha_0 is uniform unless given; the average starts empty (t = 0)."""
  k = num_domains
  alpha = (
      jnp.full(
          (k,), 1.0 /
          k, jnp.float32) if initial_alpha_K is None else jnp.asarray(initial_alpha_K, jnp.float32))
  return DoReMiState(alpha_K=alpha, avg_alpha_K=jnp.array(alpha), lambda_K=jnp.full(
      (k,), initial_lambda, jnp.float32), num_updates=jnp.zeros((), jnp.int32))


def clipped_excess(proxy_loss_BxL, ref_loss_BxL, mask_BxL):
  """max(proxy - reference, 0) per token, 0 where masked."""
  return jnp.maximum(proxy_loss_BxL - ref_loss_BxL, 0.0) * mask_BxL


def domain_one_hot(domain_ids_BxL, mask_BxL, num_domains: int):
  """[B, L, K] float32 one-hot of the 1-based domain id, zero on masked tokens."""
  ids = jnp.arange(1, num_domains + 1, dtype=domain_ids_BxL.dtype)
  return (domain_ids_BxL[..., None] == ids).astype(jnp.float32) * mask_BxL[..., None]


def per_domain_sums(values_BxL, domain_ids_BxL, mask_BxL, num_domains: int):
  """(sum of values over each domain's unmasked tokens, their count), both [K].

  A one-hot contraction rather than a scatter: it shards like the batch and reduces
  across the whole (global) batch inside jit.
  """
  one_hot = domain_one_hot(domain_ids_BxL, mask_BxL, num_domains)
  sums = jnp.einsum("bl,blk->k", values_BxL.astype(jnp.float32), one_hot)
  return sums, jnp.sum(one_hot, axis=(0, 1))


def domain_excess(excess_sums_K, counts_K, prev_lambda_K):
  """Per-domain mean excess; a domain with no tokens keeps its previous value."""
  present = counts_K > 0
  return jnp.where(present, excess_sums_K / jnp.where(present, counts_K, 1.0), prev_lambda_K)


def update_weights(alpha_K, lambda_K, *, eta: float, smoothing: float):
  """Exponentiated-gradient step with smoothing c toward uniform; stays on the simplex.

  Computed in log space (softmax) so that large eta * lambda cannot overflow.
  """
  k = alpha_K.shape[-1]
  logits = jnp.log(jnp.maximum(alpha_K, 1e-30)) + eta * lambda_K
  return (1.0 - smoothing) * jax.nn.softmax(logits) + smoothing / k


def running_average(avg_K, new_K, num_updates):
  """Mean of new values after `num_updates` (>= 1) updates, given the mean before."""
  n = num_updates.astype(jnp.float32)
  return avg_K + (new_K - avg_K) / n


def step(state: DoReMiState, excess_sums_K, counts_K, *, eta: float,
         smoothing: float) -> DoReMiState:
  """One DoReMi weight update from the global batch's per-domain excess sums and counts."""
  lam = domain_excess(excess_sums_K, counts_K, state.lambda_K)
  alpha = update_weights(state.alpha_K, lam, eta=eta, smoothing=smoothing)
  t = state.num_updates + 1
  avg = jnp.where(t == 1, alpha, running_average(state.avg_alpha_K, alpha, t))
  return DoReMiState(alpha_K=alpha, avg_alpha_K=avg, lambda_K=lam, num_updates=t)


def token_weights(alpha_K, domain_ids_BxL, mask_BxL, counts_K, objective: str = "domain_mean"):
  """Per-token weights w such that sum(w * loss) is the proxy objective (alpha constant).

  counts_K are the token counts of the *global* batch, so the weights of a microbatch sum,
  over all microbatches, to the global objective.

  "domain_mean" (the paper): sum_i alpha_i * mean loss over domain i's tokens, so
    w_j = alpha[d_j] / count[d_j]; domains absent from the batch contribute nothing.
  "token_weighted" (the authors' code): sum_j alpha[d_j] loss_j / sum_j alpha[d_j].
  """
  num_domains = alpha_K.shape[-1]
  one_hot = domain_one_hot(domain_ids_BxL, mask_BxL, num_domains)
  alpha_K = jax.lax.stop_gradient(alpha_K)
  if objective == "domain_mean":
    return jnp.einsum("blk,k->bl", one_hot, alpha_K / jnp.maximum(counts_K, 1.0))
  if objective == "token_weighted":
    # sum_j alpha[d_j] over the global batch is sum_i alpha_i * count_i: correct for a
    # microbatch too, given the global counts.
    return jnp.einsum("blk,k->bl", one_hot, alpha_K) / jnp.maximum(
        jnp.dot(alpha_K, counts_K), 1e-30)
  raise ValueError(f"objective={objective!r}: use one of {OBJECTIVES}")


def validate(*, eta: float, smoothing: float, objective: str = "domain_mean") -> None:
  """Clear errors for bad hyperparameters, before anything compiles."""
  if not eta > 0:
    raise ValueError(f"DoReMi eta={eta}: the step size must be > 0 (the paper uses 1.0).")
  if not 0.0 <= smoothing < 1.0:
    raise ValueError(f"DoReMi smoothing c={smoothing}: must be in [0, 1) (the paper uses 1e-3).")
  if objective not in OBJECTIVES:
    raise ValueError(f"DoReMi objective={objective!r}: use one of {OBJECTIVES}.")
