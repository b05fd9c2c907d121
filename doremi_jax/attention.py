"""Causal self-attention within packed segments, four ways (TransformerConfig.attention_impl).

- "einsum": the reference. Logits [B, H, Q, S] in float32, masked softmax, probabilities in the
  compute dtype. XLA cannot turn it into a flash kernel: the logits are materialized.
- "xla": jax.nn.dot_product_attention(implementation="xla") with the same boolean mask: the
  same arithmetic through JAX's own entry point (what `None` picks on every backend today).
- "cudnn": jax.nn.dot_product_attention(implementation="cudnn"), cuDNN's flash attention
  (GPU only, bf16/fp16). The causal part goes in as is_causal (cuDNN skips the masked
  blocks); segments and padding as a mask, which JAX turns into an additive bias.
- "splash": the Pallas TPU splash-attention kernel (jax.experimental.pallas.ops.tpu), causal
  mask and segment ids handled inside the kernel, never a [L, L] mask in HBM. It runs under
  shard_map over the mesh in context (batch and heads sharded as the logical rules say). On
  CPU it runs in Pallas interpret mode (for tests; slow); GPUs have no splash kernel. It
  needs L to be a multiple of 128 (its block size); other lengths (decoding's short buffers)
  take the einsum path.

Every implementation gives a padding query (segment 0) zeros, as the reference does.
Decoding with the KV cache (decode=True) runs `cached_attention`: "xla" passes the cache's
mask to jax.nn.dot_product_attention; the others use the einsum reference there (a one-token
query over the cache is a matrix-vector product; a flash kernel gains nothing on it).

Shape key: B batch, Q query length, S key length, L both (self-attention), H heads, K head dim.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

Dtype = Any
IMPLEMENTATIONS = ("einsum", "xla", "cudnn", "splash")
SPLASH_BLOCK = 128  # splash's lane width: its blocks, and so L, are multiples of it
_QKV_AXES = ("batch", "length", "heads", "kv")


def attention_mask(segment_ids_BxL):
  """Causal mask that never crosses packed examples; padding (segment 0) sees nothing."""
  length = segment_ids_BxL.shape[1]
  causal = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
  return causal[None] & segment_mask(segment_ids_BxL)  # B, Lq, Lk


def segment_mask(segment_ids_BxL):
  """Same packed example, and the query is not padding (no causal part) [B, Lq, Lk]."""
  same = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return same & (segment_ids_BxL != 0)[:, :, None]


def dot_product_attention(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, mask_BxQxS, dtype: Dtype):
  """Masked softmax attention [B, Q, H, K]; a query with no visible key gets zeros."""
  head_dim = q_BxQxHxK.shape[-1]
  logits = jnp.einsum("bqhk,bshk->bhqs", q_BxQxHxK, k_BxSxHxK).astype(jnp.float32)
  logits = logits / jnp.sqrt(head_dim)
  mask = mask_BxQxS[:, None]
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  # Rows with no visible key (padding) would be uniform; zero them so they carry nothing.
  probs = jnp.where(mask, probs, 0.0).astype(dtype)
  return jnp.einsum("bhqs,bshk->bqhk", probs, v_BxSxHxK)


def _zero_padding_queries(out_BxLxHxK, segment_ids_BxL):
  real = (segment_ids_BxL != 0)[:, :, None, None]
  return jnp.where(real, out_BxLxHxK, 0).astype(out_BxLxHxK.dtype)


def _platform() -> str:
  """The platform of the mesh being traced for (a TPU topology in compile_check), else JAX's
  default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    return mesh.abstract_device.platform
  return jax.default_backend()


def _fused(q, k, v, segment_ids_BxL, dtype, *, implementation: str):
  del dtype  # the kernels compute in the inputs' dtype, softmax in float32
  if implementation == "cudnn":
    if q.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"attention_impl='cudnn' computes in bfloat16 or float16, not {q.dtype}: "
                       "set TransformerConfig.dtype = 'bfloat16' or use attention_impl='xla'.")
    if _platform() != "gpu":
      raise ValueError(f"attention_impl='cudnn' needs a GPU; JAX is compiling for "
                       f"{_platform()!r}. Use attention_impl='xla' (or 'splash' on TPU).")
    out = jax.nn.dot_product_attention(q, k, v, mask=segment_mask(segment_ids_BxL)[:, None],
                                       is_causal=True, implementation="cudnn")
  else:
    out = jax.nn.dot_product_attention(q, k, v, mask=attention_mask(segment_ids_BxL)[:, None],
                                       implementation="xla")
  return _zero_padding_queries(out, segment_ids_BxL)


def _splash_kernel(num_heads: int, length: int, interpret: bool):
  # Built per trace, not cached: the kernel holds its mask info as arrays of the trace.
  # Imported here: the Pallas TPU package is only needed when splash is chosen.
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=g-import-not-at-top
  block = next(b for b in (512, 256, SPLASH_BLOCK) if length % b == 0)
  sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                        block_kv_dq=block)
  mask = sa.MultiHeadMask([sa.CausalMask((length, length)) for _ in range(num_heads)])
  kernel = sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)
  return kernel, sa.SegmentIds


def _splash_local(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segment_ids_BxL, *, interpret: bool):
  """Splash on one device's shard: the kernel takes [H, L, K] per example."""
  _, length, heads, head_dim = q_BxLxHxK.shape
  kernel, segment_ids = _splash_kernel(heads, length, interpret)
  # The kernel does not scale the logits.
  q = (q_BxLxHxK * (1.0 / np.sqrt(head_dim))).astype(q_BxLxHxK.dtype)
  to_hlk = lambda x: jnp.swapaxes(x, 1, 2)  # B, H, L, K

  def one(q_HxLxK, k_HxLxK, v_HxLxK, seg_L):
    return kernel(q_HxLxK, k_HxLxK, v_HxLxK, segment_ids=segment_ids(seg_L, seg_L))

  out = jax.vmap(one)(to_hlk(q), to_hlk(k_BxLxHxK), to_hlk(v_BxLxHxK), segment_ids_BxL)
  return _zero_padding_queries(jnp.swapaxes(out, 1, 2), segment_ids_BxL)


def _splash(q, k, v, segment_ids_BxL, dtype):
  platform = _platform()
  if platform == "gpu":
    raise ValueError("attention_impl='splash' is a TPU kernel; on a GPU use 'cudnn' or 'xla'.")
  if q.shape[1] % SPLASH_BLOCK:
    return dot_product_attention(q, k, v, attention_mask(segment_ids_BxL), dtype)
  local = functools.partial(_splash_local, interpret=platform != "tpu")
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q, k, v, segment_ids_BxL)
  qkv = nn.logical_to_mesh_axes(_QKV_AXES)
  seg = PartitionSpec(qkv[0], None)
  return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, seg), out_specs=qkv,
                       check_vma=False)(q, k, v, segment_ids_BxL)


def _einsum(q, k, v, segment_ids_BxL, dtype):
  return dot_product_attention(q, k, v, attention_mask(segment_ids_BxL), dtype)


_SELF_ATTENTION = {
    "einsum": _einsum,
    "xla": functools.partial(_fused, implementation="xla"),
    "cudnn": functools.partial(_fused, implementation="cudnn"),
    "splash": _splash,
}


def self_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segment_ids_BxL, *, impl: str, dtype: Dtype):
  """Causal attention within segments [B, L, H, K] by the named implementation."""
  return _SELF_ATTENTION[impl](q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segment_ids_BxL, dtype)


def cached_attention(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, mask_BxQxS, *, impl: str, dtype: Dtype):
  """Attention of new queries over a KV cache, with the cache's mask (see the module doc)."""
  if impl == "xla":
    out = jax.nn.dot_product_attention(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask_BxQxS[:, None],
                                       implementation="xla")
    real = jnp.any(mask_BxQxS, axis=-1)[:, :, None, None]
    return jnp.where(real, out, 0).astype(out.dtype)
  return dot_product_attention(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, mask_BxQxS, dtype)
