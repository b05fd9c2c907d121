"""Pure steps: train_step, proxy_step (DoReMi), online_step (online mixing) and eval_step.

Each is a module-level function of (state, [ref_params,] batch) with its static settings
bound by functools.partial; train.py jits them once with explicit shardings and donation.
Batches are dicts of [B, L] arrays: inputs, targets, loss_mask, segment_ids, positions,
domain_ids (1-based, 0 = padding).
"""
import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from doremi_jax import doremi
from doremi_jax import losses
from doremi_jax import mixing
from doremi_jax.doremi import DoReMiConfig
from doremi_jax.model import output_logits
from doremi_jax.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of a step (hashable)."""
  num_domains: int
  accum_steps: int = 1
  z_loss: float = 0.0
  doremi: Optional[DoReMiConfig] = None  # proxy runs: eta, smoothing, objective
  online: Optional[mixing.OnlineConfig] = None  # main runs that update their own weights


def _forward(model: nn.Module, params, batch, z_loss: float):
  """(ce_BxL, loss_BxL, mask_BxL) of the model on a batch."""
  cfg = model.cfg
  args = (batch["inputs"], batch["segment_ids"], batch["positions"])
  if not cfg.logits_chunk:
    logits = model.apply({"params": params}, *args)
    return losses.per_token_loss(logits, batch["targets"], batch["loss_mask"], z_loss=z_loss)
  hidden = model.apply({"params": params}, *args, return_hidden=True)
  return losses.chunked_per_token_loss(lambda h: output_logits(cfg, params, h), hidden,
                                       batch["targets"], batch["loss_mask"], z_loss=z_loss,
                                       chunk=min(cfg.logits_chunk, hidden.shape[1]))


def _microbatches(batch, accum_steps: int):
  """[B, L] -> [k, B/k, L]; microbatch i takes rows i, i+k, ... so each stays spread over
  the batch-sharded devices instead of living on a slice of them."""

  def split(x):
    b = x.shape[0]
    return x.reshape(b // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)

  return jax.tree.map(split, batch)


def _accumulate(fn, batch, accum_steps: int, init):
  """Sum fn(microbatch) over microbatches (a scan; the full batch when accum_steps == 1)."""
  if accum_steps == 1:
    return fn(batch)

  def body(carry, mb):
    return jax.tree.map(jnp.add, carry, fn(mb)), None

  out, _ = jax.lax.scan(body, init, _microbatches(batch, accum_steps))
  return out


def _apply_update(state: TrainState, grads, tx: optax.GradientTransformation, **replace):
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, **replace)


def _zeros_like_params(params):
  return jax.tree.map(jnp.zeros_like, params)


def _main_grads(state: TrainState, batch, *, model, cfg: StepConfig, extra=None):
  """Gradient of the mean token loss of the global batch, with per-domain sums.

  With accumulation the gradient is the sum of microbatch gradients of the summed loss,
  divided by the global token count: exactly the full-batch gradient. extra(mb, ce, mask)
  adds more per-domain sums (a [2, K] array, summed over microbatches).
  """
  num_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
  k = cfg.num_domains

  def micro(mb):

    def loss_fn(params):
      ce, loss, mask = _forward(model, params, mb, cfg.z_loss)
      dom_sums, dom_counts = doremi.per_domain_sums(ce, mb["domain_ids"], mask, k)
      more = jnp.zeros((2, k)) if extra is None else extra(mb, jax.lax.stop_gradient(ce), mask)
      return jnp.sum(loss) / num_tokens, (jnp.sum(ce), dom_sums, dom_counts, more)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return grads, loss, aux

  init = (_zeros_like_params(state.params), 0.0, (0.0, jnp.zeros(k), jnp.zeros(k), jnp.zeros(
      (2, k))))
  grads, loss, aux = _accumulate(micro, batch, cfg.accum_steps, init)
  return grads, loss, num_tokens, aux


def _main_metrics(loss, grads, num_tokens, aux):
  ce_sum, dom_sums, dom_counts, _ = aux
  return {
      "loss": loss,
      "ce_loss": ce_sum / num_tokens,
      "grad_norm": optax.global_norm(grads),
      "num_tokens": num_tokens,
      "domain_loss_sums": dom_sums,
      "domain_token_counts": dom_counts
  }


def train_step(state: TrainState, batch, *, model, tx, cfg: StepConfig):
  """One optimizer step on the mean token loss of the global batch (reference and main runs)."""
  grads, loss, num_tokens, aux = _main_grads(state, batch, model=model, cfg=cfg)
  return _apply_update(state, grads, tx), _main_metrics(loss, grads, num_tokens, aux)


def online_step(state: TrainState, ref_params, batch, *, model, ref_model, tx, cfg: StepConfig):
  """A main-run step that also updates the run's own sampling weights (mixing.py).

  The parameters take exactly train_step's update (the batch, drawn from the weights in
  force, is the objective: resampling). Online DoReMi adds a reference forward for the
  per-domain clipped excess (and the reference's loss, to tell when the main model is below
  it on every domain); ODM needs none (ref_params is None).
  """
  k, online = cfg.num_domains, cfg.online
  extra = None
  if online.needs_reference:

    def extra(mb, ce, mask):
      ref_ce, _, _ = _forward(ref_model, ref_params, mb, 0.0)
      ref_ce = jax.lax.stop_gradient(ref_ce)
      excess = doremi.clipped_excess(ce, ref_ce, mask)
      return jnp.stack(
          [doremi.per_domain_sums(x, mb["domain_ids"], mask, k)[0] for x in (excess, ref_ce)])

  grads, loss, num_tokens, aux = _main_grads(state, batch, model=model, cfg=cfg, extra=extra)
  _, dom_sums, dom_counts, (excess_sums, ref_sums) = aux
  new_mixing = mixing.step(state.mixing, online, loss_sums_K=dom_sums, counts_K=dom_counts,
                           rows_K=mixing.rows_per_domain(batch["domain_ids"],
                                                         k), excess_sums_K=excess_sums)
  metrics = _main_metrics(loss, grads, num_tokens, aux)
  metrics.update(sampling_weights=state.mixing.pending_K, next_sampling_weights=new_mixing.next_K)
  if online.needs_reference:
    present = dom_counts > 0
    metrics.update(domain_excess=new_mixing.method.lambda_K, domain_ref_loss_sums=ref_sums,
                   excess_all_zero=jnp.all(jnp.where(present, excess_sums == 0, True)),
                   reference_beaten=jnp.all(jnp.where(present, dom_sums < ref_sums, True)))
  return _apply_update(state, grads, tx, mixing=new_mixing), metrics


def online_step_without_reference(state: TrainState, batch, *, model, tx, cfg: StepConfig):
  """online_step for methods that need no reference (ODM): (state, batch)."""
  return online_step(state, None, batch, model=model, ref_model=None, tx=tx, cfg=cfg)


def proxy_step(state: TrainState, ref_params, batch, *, model, ref_model, tx, cfg: StepConfig):
  """One DoReMi step: reference forward, excess loss, weight update, weighted proxy update.

  The weights update once per global batch from per-domain excess sums and token counts
  over all microbatches; the proxy gradient then uses the new weights alpha_t (constant).
  Without accumulation this is one proxy forward (kept by jax.vjp) and one backward. With
  accumulation, alpha_t is needed before any microbatch gradient, so a first pass computes
  the losses and a second recomputes the proxy forward for the gradients.
  """
  hp = cfg.doremi or DoReMiConfig()
  _, counts_K = doremi.per_domain_sums(batch["loss_mask"], batch["domain_ids"],
                                       batch["loss_mask"].astype(jnp.float32), cfg.num_domains)
  parts = _ProxyParts(model, ref_model, ref_params, cfg, counts_K)
  if cfg.accum_steps == 1:

    def per_token(params):
      ce, loss, _ = _forward(model, params, batch, cfg.z_loss)
      return ce, loss

    (ce, loss_BxL), vjp_fn = jax.vjp(per_token, state.params)
    ex_sums, ce_sums, ref_sums = parts.excess_sums(batch, jax.lax.stop_gradient(ce))
    dstate = doremi.step(state.doremi, ex_sums, counts_K, eta=hp.eta, smoothing=hp.smoothing)
    w_BxL = parts.weights(dstate, batch)
    (grads,) = vjp_fn((jnp.zeros_like(ce), w_BxL))
    objective = jnp.sum(w_BxL * loss_BxL)
  else:
    grads, objective, dstate, (ce_sums, ref_sums) = parts.accumulated(state)(batch)
  new_state = _apply_update(state, grads, tx, doremi=dstate)
  num_tokens = jnp.maximum(jnp.sum(counts_K), 1.0)
  metrics = {
      "loss": objective,
      "ce_loss": jnp.sum(ce_sums) / num_tokens,
      "ref_loss": jnp.sum(ref_sums) / num_tokens,
      "grad_norm": optax.global_norm(grads),
      "num_tokens": num_tokens,
      "domain_loss_sums": ce_sums,
      "domain_token_counts": counts_K,
      "domain_ref_loss_sums": ref_sums,
      "domain_excess": dstate.lambda_K,
      "domain_weights": dstate.alpha_K,
      "avg_domain_weights": dstate.avg_alpha_K,
  }
  return new_state, metrics


class _ProxyParts:
  """The pieces of proxy_step: per-domain sums against the reference, token weights, and
  the two-pass accumulated variant."""

  def __init__(self, model, ref_model, ref_params, cfg: StepConfig, counts_K):
    self.model, self.ref_model, self.ref_params = model, ref_model, ref_params
    self.cfg, self.counts_K = cfg, counts_K
    self.hp = cfg.doremi or DoReMiConfig()

  def excess_sums(self, mb, proxy_ce):
    """Per-domain sums of clipped excess, proxy loss and reference loss over mb."""
    k = self.cfg.num_domains
    ref_ce, _, mask = _forward(self.ref_model, self.ref_params, mb, 0.0)
    excess = doremi.clipped_excess(proxy_ce, jax.lax.stop_gradient(ref_ce), mask)
    ex_sums, _ = doremi.per_domain_sums(excess, mb["domain_ids"], mask, k)
    ce_sums, _ = doremi.per_domain_sums(proxy_ce, mb["domain_ids"], mask, k)
    ref_sums, _ = doremi.per_domain_sums(ref_ce, mb["domain_ids"], mask, k)
    return ex_sums, ce_sums, ref_sums

  def weights(self, dstate, mb):
    return doremi.token_weights(dstate.alpha_K, mb["domain_ids"],
                                mb["loss_mask"].astype(jnp.float32), self.counts_K,
                                self.hp.objective)

  def accumulated(self, state):
    """batch -> (grads, objective, new DoReMi state, (ce sums, ref sums)) in two passes."""
    cfg, hp, k = self.cfg, self.hp, self.cfg.num_domains

    def first_pass(mb):
      ce, _, _ = _forward(self.model, state.params, mb, 0.0)
      return self.excess_sums(mb, ce)

    def run(batch):
      zeros = (jnp.zeros(k), jnp.zeros(k), jnp.zeros(k))
      ex_sums, ce_sums, ref_sums = _accumulate(first_pass, batch, cfg.accum_steps, zeros)
      dstate = doremi.step(state.doremi, ex_sums, self.counts_K, eta=hp.eta, smoothing=hp.smoothing)

      def second_pass(mb):
        w = self.weights(dstate, mb)

        def obj(params):
          _, loss, _ = _forward(self.model, params, mb, cfg.z_loss)
          return jnp.sum(w * loss)

        value, grads = jax.value_and_grad(obj)(state.params)
        return grads, value

      grads, objective = _accumulate(second_pass, batch, cfg.accum_steps,
                                     (_zeros_like_params(state.params), 0.0))
      return grads, objective, dstate, (ce_sums, ref_sums)

    return run


def eval_step(params, batch, *, model, cfg: StepConfig):
  """Per-domain sums of token cross-entropy and token counts over the global batch."""
  ce, _, mask = _forward(model, params, batch, 0.0)
  sums, counts = doremi.per_domain_sums(ce, batch["domain_ids"], mask, cfg.num_domains)
  return {"domain_loss_sums": sums, "domain_token_counts": counts}


def cast_params(params, dtype: Any):
  """A frozen reference's parameters in the compute dtype (float32 stays float32)."""
  return jax.tree.map(lambda x: x.astype(dtype)
                      if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
