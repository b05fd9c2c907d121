"""Greedy decoding: KV cache against a plain argmax loop, uncached mode, sharding, batching,
truncation, stop ids, clear errors, and the training forward left as it was."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from doremi_jax import decoding
from doremi_jax import sharding
from doremi_jax import steps
from doremi_jax import trainer as trainer_lib
from doremi_jax.model import Transformer
from tests import helpers

# Untied output projection: a random tied model mostly repeats its input token, which would
# make the comparisons below trivial.
CFG = dataclasses.replace(helpers.TINY_CFG, tie_embeddings=False)
P, D = 16, 8  # prompt buffer, decode length
REF_LEN = 32  # the reference forward's buffer (>= the longest prompt + D)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.lru_cache(maxsize=None)
def _params(seed=0):
  dummy = jnp.zeros((1, 8), jnp.int32)
  return nn.meta.unbox(Transformer(CFG).init(jax.random.key(seed), dummy, dummy, dummy))["params"]


@functools.lru_cache(maxsize=None)
def _decoder(mesh_shape=(1, 1, 1), batch_size=4):
  n = int(np.prod(mesh_shape))
  mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:n])
  return decoding.Decoder(CFG, mesh, batch_size=batch_size, max_prompt_len=P, max_decode_len=D)


def _prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, CFG.vocab_size, n).tolist() for n in lengths]


@functools.lru_cache(maxsize=None)
def _ref_logits_fn():
  return jax.jit(Transformer(CFG).apply, compiler_options=FAST_COMPILE)


def _reference(prompt, stop_ids=()):
  """The test's own greedy loop, one row at a time: the training forward over prompt +
  generated (tokens from position 0, then padding that the causal mask hides from them), the
  argmax at the last real position; stop at a stop id (kept), zeros after."""
  seq, out = list(prompt[-P:]), []
  for _ in range(D):
    n = len(seq)
    tokens, segs = np.zeros((1, REF_LEN), np.int32), np.zeros((1, REF_LEN), np.int32)
    tokens[0, :n], segs[0, :n] = seq, 1
    positions = np.arange(REF_LEN, dtype=np.int32)[None] * segs
    logits = _ref_logits_fn()({"params": _params()}, tokens, segs, positions)
    tok = int(np.argmax(np.asarray(logits)[0, n - 1]))
    out.append(tok)
    seq.append(tok)
    if tok in stop_ids:
      break
  return np.pad(out, (0, D - len(out))).astype(np.int32)


def test_cached_decoding_equals_a_plain_argmax_loop_with_stop_ids():
  prompts = _prompts([1, 3, 7, 12])
  dec = _decoder()
  free = dec.decode(_params(), prompts)
  assert free.shape == (4, D) and free.dtype == np.int32
  np.testing.assert_array_equal(free, [_reference(p) for p in prompts])
  assert len(set(free.ravel().tolist())) > D  # not a degenerate model
  # A stop id that first appears as row r's third token: kept there, then zeros; every other
  # row stops at its own first occurrence of it (or never), like the reference loop.
  r = next(r for r in range(4) if free[r, 2] not in free[r, :2])
  stop = int(free[r, 2])
  got = dec.decode(_params(), prompts, stop_ids=[stop, CFG.vocab_size - 1])
  np.testing.assert_array_equal(got[r], np.pad(free[r, :3], (0, D - 3)))
  np.testing.assert_array_equal(got, [_reference(p, (stop, CFG.vocab_size - 1)) for p in prompts])


def test_uncached_equals_cached():
  prompts = _prompts([2, 16, 5, 9, 1], seed=1)
  dec = _decoder()
  cached = dec.decode(_params(), prompts)
  np.testing.assert_array_equal(dec.decode(_params(), prompts, use_cache=False), cached)
  stop = [int(cached[1, 3]), int(cached[0, 1])]
  np.testing.assert_array_equal(
      dec.decode(_params(), prompts, stop_ids=stop, use_cache=False),
      dec.decode(_params(), prompts, stop_ids=stop))


def test_sharded_equals_one_device():
  prompts = _prompts([1, 3, 7, 12, 16, 4], seed=2)
  one = _decoder((1, 1, 1), 4).decode(_params(), prompts)
  sharded = _decoder((2, 2, 2), 4)
  np.testing.assert_array_equal(sharded.decode(_params(), prompts), one)
  np.testing.assert_array_equal(sharded.decode(_params(), prompts, use_cache=False), one)
  query_sharding = sharded.param_shardings["layer_0"]["attn"]["query"]
  assert query_sharding.mesh.devices.size == 8
  assert query_sharding.spec == PartitionSpec("fsdp", "model", None)


def test_param_shardings_equal_the_trainers():
  mesh = sharding.make_mesh((2, 2, 2))
  tr = trainer_lib.build_trainer(model_cfg=CFG, mesh=mesh, global_batch_size=4, seq_len=16,
                                 total_steps=1, step_cfg=steps.StepConfig(num_domains=1))
  ours = decoding.Decoder(CFG, mesh, batch_size=4, max_prompt_len=P,
                          max_decode_len=D).param_shardings
  assert jax.tree.structure(ours) == jax.tree.structure(tr.state_shardings.params)
  assert jax.tree.leaves(ours) == jax.tree.leaves(tr.state_shardings.params)


def test_batches_of_any_size_and_prompt_truncation():
  dec = _decoder()
  prompts = _prompts([5, 1, 20, 3, 11], seed=3)  # 5 prompts: batches of 4 and 1 (+3 filler)
  got = dec.decode(_params(), prompts)
  for i, p in enumerate(prompts):
    np.testing.assert_array_equal(got[i], dec.decode(_params(), [p])[0])
  np.testing.assert_array_equal(got[2], dec.decode(_params(), [prompts[2][-P:]])[0])
  assert dec.decode(_params(), []).shape == (0, D)


def test_compiles_once_per_decoder():
  dec = _decoder()
  for stop in ([], [5], [1, 2, 3, 4, 5, 6, 7, 8]):
    for use_cache in (True, False):
      dec.decode(_params(), _prompts([4, 9]), stop_ids=stop, use_cache=use_cache)
  assert [f._cache_size() for f in dec._fns.values()] == [1, 1]  # pylint: disable=protected-access


@pytest.mark.parametrize("kwargs, match", [
    (dict(mesh_shape=(2, 2, 2), batch_size=6), "data-parallel size 4"),
    (dict(max_prompt_len=60, max_decode_len=6), "max_len=64"),
    (dict(max_decode_len=0), "at least 1"),
])
def test_decoder_config_errors(kwargs, match):
  mesh_shape = kwargs.pop("mesh_shape", (1, 1, 1))
  mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
  args = dict(batch_size=4, max_prompt_len=P, max_decode_len=D) | kwargs
  with pytest.raises(ValueError, match=match):
    decoding.Decoder(CFG, mesh, **args)


@pytest.mark.parametrize("prompts, stop_ids, match", [
    ([[3, 4], []], (), "prompt 1 is empty"),
    ([[3, 4]], tuple(range(3, 12)), "at most 8"),
    ([[3, CFG.vocab_size]], (), "outside the vocabulary"),
    ([[-1, 3]], (), "outside the vocabulary"),
    ([[3]], (CFG.vocab_size,), "stop ids .* outside the vocabulary"),
])
def test_request_errors_before_compiling(prompts, stop_ids, match):
  dec = decoding.Decoder(CFG, sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]),
                         batch_size=4, max_prompt_len=P, max_decode_len=D)
  with pytest.raises(ValueError, match=match):
    dec.decode(_params(), prompts, stop_ids=stop_ids)
  assert [f._cache_size() for f in dec._fns.values()] == [0, 0]  # pylint: disable=protected-access


def test_training_forward_unchanged_and_cache_layout():
  model = Transformer(CFG)
  batch = helpers.packed_batch(np.random.default_rng(0), 2, 24)
  args = (batch["inputs"], batch["segment_ids"], batch["positions"])
  plain = model.init(jax.random.key(0), *args)
  with_cache = model.init(jax.random.key(0), *args, decode=True)
  assert set(plain) == {"params"} and set(with_cache) == {"params", "cache"}
  assert jax.tree.structure(plain["params"]) == jax.tree.structure(with_cache["params"])
  specs = nn.get_partition_spec(with_cache)["cache"]["layer_1"]["attn"]["kv_cache"]
  assert specs["key"] == PartitionSpec("batch", "length", "heads", "kv")
  assert specs["segment_ids"] == PartitionSpec("batch", "length")
  assert specs["index"] == PartitionSpec()
  assert nn.meta.unbox(with_cache)["cache"]["layer_0"]["attn"]["kv_cache"]["value"].shape == (
      2, 24, CFG.num_heads, CFG.head_dim)
  params = {"params": _params()}
  train = np.asarray(model.apply(params, *args))
  np.testing.assert_array_equal(np.asarray(model.apply(params, *args, decode=False)), train)
  # The cache written in one call (a prefill of the whole packed batch) gives the same logits.
  cache = jax.tree.map(jnp.zeros_like, nn.meta.unbox(with_cache)["cache"])
  prefill, _ = model.apply(params | {"cache": cache}, *args, decode=True, mutable=["cache"])
  real = batch["segment_ids"] != 0
  np.testing.assert_allclose(np.asarray(prefill)[real], train[real], atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_each_attention_impl_decodes_like_the_reference(impl):
  """Cached and uncached decoding with each CPU-runnable attention implementation equal the
  einsum decoder's (itself pinned to a plain argmax loop above). "xla" runs its own path in
  the cached step too; splash's uncached forward over P + D - 1 = 128 slots runs the kernel
  (its cached step is the einsum reference). Catches a cache mask or a kernel that drifts
  from the training forward's."""
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  ref_cfg = dataclasses.replace(CFG, max_len=128)
  make = lambda cfg: decoding.Decoder(cfg, mesh, batch_size=4, max_prompt_len=121, max_decode_len=D)
  prompts = _prompts([1, 30, 77, 121], seed=4)
  want = make(ref_cfg).decode(_params(), prompts)
  dec = make(dataclasses.replace(ref_cfg, attention_impl=impl))
  np.testing.assert_array_equal(dec.decode(_params(), prompts), want)
  np.testing.assert_array_equal(dec.decode(_params(), prompts, use_cache=False), want)
