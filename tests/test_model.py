"""The Transformer: packing and causal masks, padding, remat, bfloat16, partitioning, sizes."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doremi_jax import losses
from doremi_jax import sharding
from doremi_jax.model import Transformer
from tests import helpers

CFG = helpers.TINY_CFG
L = 32
# XLA's CPU backend spends most of these tests compiling; a low LLVM optimization level halves
# that, and every side of a comparison is compiled the same way.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
LOGICAL_AXES = {"batch", "length", "embed", "mlp", "heads", "kv", "vocab"}


def _row(segment_lengths, seed=0):
  """One packed row of examples of the given lengths, then padding."""
  return helpers.packed_row(segment_lengths, L, seed=seed, vocab=CFG.vocab_size)


def _cat(*rows):
  return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


@functools.lru_cache(maxsize=None)
def _apply(cfg=CFG):
  return jax.jit(Transformer(cfg).apply, compiler_options=FAST_COMPILE)


@functools.lru_cache(maxsize=None)
def _params(cfg=CFG, seed=0):
  dummy = jnp.zeros((1, L), jnp.int32)
  init = jax.jit(Transformer(cfg).init, compiler_options=FAST_COMPILE)
  return nn.meta.unbox(init(jax.random.key(seed), dummy, dummy, dummy))["params"]


def _logits(batch, cfg=CFG, params=None):
  params = _params(CFG) if params is None else params
  return np.asarray(
      _apply(cfg)({
          "params": params
      }, batch["inputs"], batch["segment_ids"], batch["positions"]))


def _loss_fn(cfg):
  """Masked mean token loss of a batch, and the logits."""
  model = Transformer(cfg)

  def loss(params, batch):
    logits = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                         batch["positions"])
    _, per_tok, mask = losses.per_token_loss(logits, batch["targets"], batch["loss_mask"])
    return losses.masked_mean(per_tok, mask), logits

  return loss


@functools.lru_cache(maxsize=None)
def _value_and_grad(cfg=CFG):
  return jax.jit(jax.value_and_grad(_loss_fn(cfg), has_aux=True), compiler_options=FAST_COMPILE)


def test_packed_examples_do_not_see_each_other():
  base = _row([10, 12, 8])  # segments at [0, 10), [10, 22), [22, 30); 2 padding tokens
  changed = {k: v.copy() for k, v in base.items()}
  changed["inputs"][0, 11:22] = (changed["inputs"][0, 11:22] + 7) % CFG.vocab_size
  a, b = _logits(base), _logits(changed)
  np.testing.assert_allclose(b[0, :10], a[0, :10], atol=1e-6)
  np.testing.assert_allclose(b[0, 22:30], a[0, 22:30], atol=1e-6)
  assert np.abs(b[0, 11:22] - a[0, 11:22]).max() > 1e-2  # the edited example did change


def test_packed_example_equals_the_example_alone():
  packed = _row([10, 12, 8], seed=3)
  alone = {k: np.zeros_like(v) for k, v in packed.items()}
  for k in packed:
    alone[k][0, :8] = packed[k][0, 22:30]
  alone["segment_ids"][0, :8] = 1
  np.testing.assert_allclose(_logits(packed)[0, 22:30], _logits(alone)[0, :8], atol=2e-5)


def test_causal():
  base = _row([L], seed=1)
  changed = {k: v.copy() for k, v in base.items()}
  changed["inputs"][0, 20] = (changed["inputs"][0, 20] + 1) % CFG.vocab_size
  a, b = _logits(base), _logits(changed)
  np.testing.assert_allclose(b[0, :20], a[0, :20], atol=1e-6)
  assert np.abs(b[0, 20:] - a[0, 20:]).max(axis=-1).min() > 1e-3  # every later position moved


def test_padding_row_is_finite_and_changes_nothing():
  real = _row([20, 9], seed=2)
  pad = {k: np.zeros_like(v) for k, v in real.items()}
  batch = _cat(real, pad)
  (loss, logits), grads = _value_and_grad()(_params(), batch)
  logits = np.asarray(logits)
  assert np.all(np.isfinite(logits))
  # Another batch shape compiles differently: float32 rounding, hence 1e-5.
  np.testing.assert_allclose(logits[0], _logits(real)[0], atol=1e-5)
  ce, _, _ = losses.per_token_loss(logits, batch["targets"], batch["loss_mask"])
  assert float(jnp.abs(ce[1]).max()) == 0.0 and float(jnp.abs(ce[0, 29:]).max()) == 0.0
  np.testing.assert_allclose(loss, float(jnp.sum(ce)) / 29, rtol=1e-6)
  # Garbage tokens under padding (segment 0, mask 0) change neither the loss nor the gradients.
  junk = _cat(real, {
      **pad, "inputs": np.full_like(pad["inputs"], 77),
      "targets": np.full_like(pad["targets"], 5)
  })
  (loss2, _), grads2 = _value_and_grad()(_params(), junk)
  assert float(loss2) == float(loss)
  for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
    assert np.all(np.isfinite(x))
    np.testing.assert_array_equal(x, y)


def test_padded_vocab_never_predicted():
  logits = _logits(_row([16, 16], seed=4))
  assert CFG.padded_vocab_size == 384 and logits.shape[-1] == 384
  assert np.all(logits[..., CFG.vocab_size:] <= -1e8)
  assert np.all(logits[..., :CFG.vocab_size] > -1e3)
  probs = jax.nn.softmax(logits, axis=-1)
  assert float(probs[..., CFG.vocab_size:].max()) == 0.0


def test_remat_same_loss_and_gradients():
  batch = _cat(_row([10, 12, 8], seed=5), _row([L], seed=6))
  (loss0, _), g0 = _value_and_grad()(_params(), batch)
  for remat in ("full", "dots"):
    (loss, _), g = _value_and_grad(dataclasses.replace(CFG, remat=remat))(_params(), batch)
    np.testing.assert_allclose(loss, loss0, rtol=1e-6)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g0)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=f"{remat} {path}")
  assert float(jnp.abs(g0["layer_0"]["attn"]["query"]).max()) > 1e-4


def test_unknown_remat_errors():
  with pytest.raises(ValueError, match="remat"):
    cfg = dataclasses.replace(CFG, remat="some")
    jax.eval_shape(
        lambda: Transformer(cfg).init(jax.random.key(0), *[jnp.zeros((1, 8), jnp.int32)] * 3))


def test_bfloat16_compute_float32_params():
  cfg = dataclasses.replace(CFG, dtype="bfloat16")
  params = _params(cfg)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  # Same initial parameters as the float32 model: the loss differs only by rounding.
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(_params())):
    np.testing.assert_array_equal(x, y)
  batch = _cat(_row([10, 12, 8], seed=5), _row([L], seed=6))
  loss16, logits = jax.jit(_loss_fn(cfg), compiler_options=FAST_COMPILE)(params, batch)
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
  (loss32, _), _ = _value_and_grad()(_params(), batch)
  np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
  assert float(loss16) != float(loss32)  # bfloat16 really was used


def _abstract_boxed(cfg):
  dummy = jnp.zeros((1, 8), jnp.int32)
  return jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), dummy, dummy, dummy))


@pytest.mark.parametrize("tie", [True, False])
def test_tied_and_untied_build(tie):
  cfg = dataclasses.replace(CFG, tie_embeddings=tie)
  params = nn.meta.unbox(_abstract_boxed(cfg))["params"]
  assert params["embedding"].shape == (384, 32)
  assert ("output_kernel" in params) == (not tie)
  if not tie:
    assert params["output_kernel"].shape == (32, 384)
  dummy = jnp.zeros((2, L), jnp.int32)
  out = jax.eval_shape(Transformer(cfg).apply, {"params": params}, dummy, dummy, dummy)
  assert out.shape == (2, L, 384) and out.dtype == jnp.float32


@pytest.mark.parametrize("tie", [True, False])
def test_every_parameter_has_a_logical_partition_spec(tie):
  boxed = _abstract_boxed(dataclasses.replace(CFG, tie_embeddings=tie))["params"]
  leaves = jax.tree_util.tree_leaves_with_path(boxed,
                                               is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert len(leaves) == 9 * CFG.num_layers + 2 + (not tie)  # 7 kernels + 2 norms a layer
  for path, leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), f"{path} has no logical axis names"
    assert len(leaf.names) == leaf.value.ndim, path
    assert all(n in LOGICAL_AXES for n in leaf.names), (path, leaf.names)
  specs = nn.get_partition_spec(boxed)
  for path, spec in jax.tree_util.tree_leaves_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec) or x is None):
    assert spec is not None and len(spec) > 0, path
  # And every name maps through the default rules.
  mesh_specs = nn.logical_to_mesh(specs, sharding.DEFAULT_RULES)
  assert len(
      jax.tree.leaves(mesh_specs,
                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))) == len(leaves)


@pytest.mark.parametrize("overrides", [
    {},
    {
        "tie_embeddings": False
    },
    {
        "vocab_size": 300,
        "emb_dim": 48,
        "num_layers": 3
    },
    {
        "vocab_size": 32000,
        "num_heads": 4,
        "head_dim": 8,
        "mlp_dim": 96,
        "tie_embeddings": False
    },
])
def test_num_params_matches_actual_count(overrides):
  cfg = dataclasses.replace(CFG, **overrides)
  params = nn.meta.unbox(_abstract_boxed(cfg))["params"]
  assert cfg.num_params() == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _reference_forward(params, tokens, segments, positions, cfg):
  """The model written out in numpy from its definition (float64): pre-norm RMSNorm, rotary
  (half split), causal attention within segments (padding sees nothing), SwiGLU, tied output
  scaled by 1/sqrt(D). Independent of model.py's code."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)

  def norm(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * scale

  def rope(x):  # [L, H, K]
    half = x.shape[-1] // 2
    angle = positions[:, None, None] * cfg.rope_theta**(-np.arange(half) / half)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate(
        [x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)

  n = len(tokens)
  visible = (
      np.tril(np.ones(
          (n, n), bool)) & (segments[:, None] == segments[None, :]) & (segments[:, None] != 0))
  x = p["embedding"][tokens]
  for i in range(cfg.num_layers):
    layer = p[f"layer_{i}"]
    h = norm(x, layer["attn_norm"]["scale"])
    q, k, v = (np.einsum("ld,dhk->lhk", h, layer["attn"][w]) for w in ("query", "key", "value"))
    scores = np.einsum("qhk,shk->hqs", rope(q), rope(k)) / np.sqrt(cfg.head_dim)
    scores = np.where(visible[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True, initial=-1e300))
    probs = np.where(visible[None], probs, 0.0)
    probs /= np.maximum(probs.sum(-1, keepdims=True), 1e-300)
    x = x + np.einsum("hqs,shk,hkd->qd", probs, v, layer["attn"]["out"])
    h = norm(x, layer["mlp_norm"]["scale"])
    gate, up = h @ layer["mlp"]["wi_gate"]["kernel"], h @ layer["mlp"]["wi_up"]["kernel"]
    x = x + (gate / (1 + np.exp(-gate)) * up) @ layer["mlp"]["wo"]["kernel"]
  x = norm(x, p["final_norm"]["scale"])
  return (x @ p["embedding"].T / np.sqrt(cfg.emb_dim))[:, :cfg.vocab_size]


# Per attention implementation: (sequence length, tolerance against the float64 reference).
# Splash's length is its block size, so its kernel runs (Pallas interpret mode on CPU);
# all compute in float32, so all share the einsum path's tolerance.
FORWARD_IMPLS = {"einsum": (L, 2e-4), "xla": (L, 2e-4), "splash": (128, 2e-4)}


@pytest.mark.parametrize("impl", sorted(FORWARD_IMPLS))
def test_forward_equals_a_numpy_reference(impl):
  """Pins the training forward (decode=False) to the model's definition, for each attention
  implementation that runs on CPU, so a change to the attention or the blocks (such as the
  decoding path sharing them) cannot go unnoticed."""
  length, tol = FORWARD_IMPLS[impl]
  scale = length // L
  batch = helpers.packed_row([5 * scale, 7 * scale, 4 * scale], length, vocab=CFG.vocab_size)
  params = _params()
  cfg = dataclasses.replace(CFG, attention_impl=impl)
  logits = np.asarray(_logits(batch, cfg=cfg, params=params))[0, :, :CFG.vocab_size]
  expected = _reference_forward(params, batch["inputs"][0], batch["segment_ids"][0],
                                batch["positions"][0].astype(np.float64), CFG)
  real = batch["segment_ids"][0] != 0
  np.testing.assert_allclose(logits[real], expected[real], rtol=tol, atol=tol)
