"""Per-token losses. The caller reduces (mean over tokens, per-domain sums, ...)."""
import jax
import jax.numpy as jnp


def per_token_loss(logits_BxLxV, targets_BxL, loss_mask_BxL, *, z_loss: float = 0.0):
  """Cross-entropy per token and the training loss (cross-entropy + z-loss) per token.

  Returns (ce_BxL, loss_BxL, mask_BxL), zero where the mask is 0. The mask is float32 and
  explicit: a loss of 0 is not padding. Evaluation and DoReMi excess use ce; gradients use loss.
  """
  logits = logits_BxLxV.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  mask = loss_mask_BxL.astype(jnp.float32)
  ce = (log_z - target_logit) * mask
  loss = ce + z_loss * jnp.square(log_z) * mask if z_loss else ce
  return ce, loss, mask


def masked_mean(loss_BxL, mask_BxL):
  return jnp.sum(loss_BxL) / jnp.maximum(jnp.sum(mask_BxL), 1.0)


def chunked_per_token_loss(project, hidden_BxLxD, targets_BxL, loss_mask_BxL, *,
                           z_loss: float = 0.0, chunk: int):
  """per_token_loss over `chunk` positions at a time; the same values, less memory.

  project maps hidden states [B, c, D] to logits [B, c, V]. Each chunk's logits are
  rematerialized in the backward pass, so only one chunk's [B, c, V] is live at a time.
  """
  b, length, d = hidden_BxLxD.shape
  if length % chunk:
    raise ValueError(f"logits_chunk={chunk} must divide the sequence length {length}.")
  n = length // chunk

  def split(x):
    return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def one(args):
    h, t, m = args
    return per_token_loss(project(h), t, m, z_loss=z_loss)

  outs = jax.lax.map(one, (split(hidden_BxLxD), split(targets_BxL), split(loss_mask_BxL)))
  return tuple(x.swapaxes(0, 1).reshape(b, length) for x in outs)
