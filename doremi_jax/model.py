"""Decoder-only Transformer (Flax Linen) with logical axis names on every parameter.

Pre-norm RMSNorm, rotary positions, gated (SwiGLU) MLP, no biases, causal attention that
never crosses packed examples (segment ids). Parameters are float32; `dtype` sets the compute
dtype. Logical axis names: batch, length, embed, mlp, heads, kv, vocab.

Shape key: B batch, L length, D model dim, H heads, K head dim (kv), F mlp dim, V vocab.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from doremi_jax import attention
from doremi_jax.attention import attention_mask

Dtype = Any


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Model hyperparameters; the gin model files in gin/models/ bind these."""
  vocab_size: int = 259  # seqio.ByteVocabulary: 256 bytes + pad, eos, unk.
  emb_dim: int = 64
  num_heads: int = 2
  head_dim: int = 32
  num_layers: int = 2
  mlp_dim: int = 256
  max_len: int = 2048
  tie_embeddings: bool = True
  dtype: str = "float32"  # compute dtype: "float32" or "bfloat16"
  remat: str = "none"  # "none" | "full" | "dots" (save matmul outputs)
  # Compute the output logits and loss this many positions at a time (0: all at once).
  # With a large vocabulary the [B, L, V] logits dominate memory; chunks are rematerialized.
  logits_chunk: int = 0
  # Self-attention kernel (doremi_jax/attention.py): "einsum" (the reference), "xla" or
  # "cudnn" (jax.nn.dot_product_attention), "splash" (Pallas TPU kernel).
  attention_impl: str = "einsum"
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6

  def __post_init__(self):
    if self.attention_impl not in attention.IMPLEMENTATIONS:
      raise ValueError(f"attention_impl={self.attention_impl!r}: use one of "
                       f"{', '.join(attention.IMPLEMENTATIONS)}.")

  @property
  def padded_vocab_size(self) -> int:
    """Embedding rows rounded up to a multiple of 128 so the vocab axis shards evenly."""
    return -(-self.vocab_size // 128) * 128

  @property
  def compute_dtype(self) -> Dtype:
    return jnp.dtype(self.dtype)

  def num_params(self) -> int:
    """Parameter count (embeddings included)."""
    attn = 4 * self.emb_dim * self.num_heads * self.head_dim
    mlp = 3 * self.emb_dim * self.mlp_dim
    per_layer = attn + mlp + 2 * self.emb_dim
    emb = self.padded_vocab_size * self.emb_dim * (1 if self.tie_embeddings else 2)
    return self.num_layers * per_layer + emb + self.emb_dim

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), with attention."""
    # Every parameter but the input embedding (a lookup is free); a tied table still does
    # the output projection.
    emb = self.padded_vocab_size * self.emb_dim
    n = self.num_params() - emb + (emb if self.tie_embeddings else 0)
    attn = 2 * self.num_layers * seq_len * self.num_heads * self.head_dim
    return 6.0 * n + 6.0 * attn


# How the model is computed on the hardware at hand, not what it is: a run may resume, or be
# the reference or evaluated, on another accelerator with another kernel. Configs rebuilt
# from a saved run's info (config_from_info) take these from the current gin bindings.
PLATFORM_FIELDS = ("attention_impl",)


def config_from_info(model_info: dict) -> TransformerConfig:
  """A saved run's model ("model" in its run_info.json), with PLATFORM_FIELDS left to gin or
  their defaults (older run infos may lack them)."""
  return TransformerConfig(**{k: v for k, v in model_info.items() if k not in PLATFORM_FIELDS})


def _dense_init():
  # DenseGeneral hands the initializer a kernel flattened to 2D [fan_in, fan_out].
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class RMSNorm(nn.Module):
  eps: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


def rotary(x_BxLxHxK, positions_BxL, theta: float):
  """Rotary position embedding (half-split convention)."""
  half = x_BxLxHxK.shape[-1] // 2
  freq = theta**(-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions_BxL[:, :, None, None].astype(jnp.float32) * freq  # B, L, 1, K/2
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


class KVCache(nn.Module):
  """One attention layer's decode-time cache, in the "cache" variable collection.

  Holds S slots (S: the length of the input that created the cache, e.g. prompt buffer +
  decode length): rotated keys and values [B, S, H, K], the segment id of each slot [B, S]
  (0: padding or not written yet, so never attended) and the next slot to write (a scalar).
  A call writes its L new keys/values at that slot and returns the whole cache with the mask
  of the new queries over it: the training mask (causal by slot, same segment, padding queries
  see nothing) of the sequence written so far.

  The first call (model.init, or apply with the "cache" collection empty) only creates the
  zeroed cache, sized by its input, and returns the input's own keys, values and mask.
  """

  @nn.compact
  def __call__(self, k_BxLxHxK, v_BxLxHxK, segment_ids_BxL):
    kv_axes = ("batch", "length", "heads", "kv")
    initialized = self.has_variable("cache", "key")

    def var(name, axes, shape, dtype):
      init = nn.with_logical_partitioning(jnp.zeros, axes)
      return self.variable("cache", name, init, shape, dtype)

    key = var("key", kv_axes, k_BxLxHxK.shape, k_BxLxHxK.dtype)
    value = var("value", kv_axes, v_BxLxHxK.shape, v_BxLxHxK.dtype)
    segs = var("segment_ids", ("batch", "length"), segment_ids_BxL.shape, jnp.int32)
    index = var("index", (), (), jnp.int32)
    if not initialized:
      return k_BxLxHxK, v_BxLxHxK, attention_mask(segment_ids_BxL)

    start = index.value
    write = lambda cur, new, axes: nn.with_logical_constraint(
        jax.lax.dynamic_update_slice_in_dim(cur, new.astype(cur.dtype), start, axis=1), axes)
    key.value = write(key.value, k_BxLxHxK, kv_axes)
    value.value = write(value.value, v_BxLxHxK, kv_axes)
    segs.value = write(segs.value, segment_ids_BxL, ("batch", "length"))
    index.value = start + segment_ids_BxL.shape[1]

    query_slot_L = start + jnp.arange(segment_ids_BxL.shape[1])
    key_slot_S = jnp.arange(segs.value.shape[1])
    causal_LxS = key_slot_S[None, :] <= query_slot_L[:, None]
    same = segment_ids_BxL[:, :, None] == segs.value[:, None, :]
    valid = (segment_ids_BxL != 0)[:, :, None]
    return key.value, value.value, causal_LxS[None] & same & valid


class Attention(nn.Module):
  """Multi-head self-attention. With decode=True keys and values go through a KVCache: a call
  sees every key written so far (the prompt, then one new token a call)."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL, decode: bool = False):
    cfg = self.cfg
    dt = cfg.compute_dtype

    def proj(name):
      w = self.param(
          name,
          nn.with_logical_partitioning(
              nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0,
                                               out_axis=(1, 2)), ("embed", "heads", "kv")),
          (cfg.emb_dim, cfg.num_heads, cfg.head_dim), jnp.float32)
      return jnp.einsum("bld,dhk->blhk", x_BxLxD, w.astype(dt))

    q, k, v = proj("query"), proj("key"), proj("value")
    q = rotary(q, positions_BxL, cfg.rope_theta)
    k = rotary(k, positions_BxL, cfg.rope_theta)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    k = nn.with_logical_constraint(k, ("batch", "length", "heads", "kv"))
    v = nn.with_logical_constraint(v, ("batch", "length", "heads", "kv"))
    if decode:
      k, v, mask = KVCache(name="kv_cache")(k, v, segment_ids_BxL)
      out = attention.cached_attention(q, k, v, mask, impl=cfg.attention_impl, dtype=dt)
    else:
      out = attention.self_attention(q, k, v, segment_ids_BxL, impl=cfg.attention_impl, dtype=dt)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    w_out = self.param(
        "out",
        nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1),
                                             out_axis=2), ("heads", "kv", "embed")),
        (cfg.num_heads, cfg.head_dim, cfg.emb_dim), jnp.float32)
    return jnp.einsum("blhk,hkd->bld", out, w_out.astype(dt))


class GatedMLP(nn.Module):
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    dt = cfg.compute_dtype

    def dense(features, axes, name):
      return nn.Dense(features, use_bias=False, dtype=dt, param_dtype=jnp.float32,
                      kernel_init=nn.with_logical_partitioning(_dense_init(), axes), name=name)

    gate = dense(cfg.mlp_dim, ("embed", "mlp"), "wi_gate")(x_BxLxD)
    up = dense(cfg.mlp_dim, ("embed", "mlp"), "wi_up")(x_BxLxD)
    h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
    return dense(cfg.emb_dim, ("mlp", "embed"), "wo")(h)


class Block(nn.Module):
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL, decode: bool = False):
    cfg = self.cfg
    h = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="attn_norm")(x_BxLxD)
    x_BxLxD = x_BxLxD + Attention(cfg, name="attn")(h, segment_ids_BxL, positions_BxL, decode)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
    h = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="mlp_norm")(x_BxLxD)
    x_BxLxD = x_BxLxD + GatedMLP(cfg, name="mlp")(h)
    return nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Transformer(nn.Module):
  """Float32 logits [B, L, V_padded] for decoder inputs (already shifted right), or with
  return_hidden the final normalized hidden states [B, L, D] (see output_logits).

  decode=True runs incrementally against each layer's KVCache (the mutable "cache"
  collection; see doremi_jax.decoding): model.init with decode=True sizes the cache by its
  input [B, S]; each later apply appends its L tokens. Remat is off when decoding, and the
  parameters are the same either way.
  """
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, inputs_BxL, segment_ids_BxL, positions_BxL, return_hidden: bool = False,
               decode: bool = False):
    cfg = self.cfg
    embed = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
        (cfg.padded_vocab_size, cfg.emb_dim), jnp.float32)
    x = jnp.take(embed, inputs_BxL, axis=0).astype(cfg.compute_dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    block = Block
    if cfg.remat != "none":
      if cfg.remat not in _REMAT_POLICIES:
        raise ValueError(f"remat={cfg.remat!r}: use one of 'none', {sorted(_REMAT_POLICIES)}")
      if not decode:  # nothing to save for a backward pass when decoding
        block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat])
    for i in range(cfg.num_layers):
      layer = block(cfg, name=f"layer_{i}")
      if decode:
        x = layer(x, segment_ids_BxL, positions_BxL, decode=True)
      else:
        x = layer(x, segment_ids_BxL, positions_BxL)
    x = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="final_norm")(x)
    if not cfg.tie_embeddings:
      self.param("output_kernel", nn.with_logical_partitioning(_dense_init(), ("embed", "vocab")),
                 (cfg.emb_dim, cfg.padded_vocab_size), jnp.float32)
    if return_hidden:
      return x
    return output_logits(cfg, self.variables["params"], x)


def output_logits(cfg: TransformerConfig, params, x_BxLxD):
  """Float32 logits [B, L, V_padded] from final hidden states and the model's parameters.

  A function of the parameter dict (not a submodule) so that losses.chunked_per_token_loss
  can project one slice of the sequence at a time.
  """
  dt = cfg.compute_dtype
  params = nn.meta.unbox(params)
  if cfg.tie_embeddings:
    logits = jnp.einsum("bld,vd->blv", x_BxLxD, params["embedding"].astype(dt))
    logits = logits / jnp.sqrt(cfg.emb_dim).astype(dt)
  else:
    logits = jnp.einsum("bld,dv->blv", x_BxLxD, params["output_kernel"].astype(dt))
  logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
  # Padding rows of the vocabulary are never predicted.
  real = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
  return jnp.where(real, logits.astype(jnp.float32), -1e9)
