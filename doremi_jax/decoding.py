"""Greedy autoregressive decoding, jitted and sharded like training.

A Decoder compiles, once, two greedy loops over a fixed batch of left-padded prompts:

  * cached (the default): one prefill call writes the whole prompt buffer into each layer's
    KVCache (model.Transformer with decode=True), then one token a step;
  * uncached (reference and benchmark): every step recomputes the training forward over
    [prompt buffer + generated so far] and takes the argmax at the current position.

Layout of a batch row (P = max_prompt_len, D = max_decode_len, n = the prompt's length):
slots [0, P - n) are padding (segment 0, never attended), slots [P - n, P) the prompt
(segment 1, positions 0..n-1), then slot P + i - 1 holds generated token i - 1 (position
n + i - 1) when token i is predicted. Both loops run inside jit as a lax.while_loop that ends
once every row has produced a stop id, or after D tokens.

Prompts are fed as given: the training inputs are targets shifted right (each example starts
with input id 0), so a caller that wants the training format prepends 0 to each prompt.

Shape key: B batch, P prompt buffer, D decode length, T = P + D - 1 slots, S stop ids,
V padded vocab.
"""
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from doremi_jax import sharding as sharding_lib
from doremi_jax import trainer as trainer_lib
from doremi_jax.model import Transformer, TransformerConfig, output_logits

MAX_STOP_IDS = 8  # the stop-id array's fixed size: any set of up to 8 ids, one compile


def param_shardings(model_cfg: TransformerConfig, mesh: Mesh, rules=sharding_lib.DEFAULT_RULES):
  """NamedShardings of the model's params tree: those of a Trainer for the same model, mesh
  and rules (trainer.state_shardings.params)."""
  _, shardings, _ = trainer_lib.abstract_params_and_shardings(
      Transformer(model_cfg), mesh, rules, 1)
  return shardings


def _validate_config(cfg: TransformerConfig, mesh: Mesh, batch_size: int, max_prompt_len: int,
                     max_decode_len: int) -> None:
  """Clear errors for a Decoder that cannot work, before anything compiles."""
  dp = sharding_lib.data_parallel_size(mesh)
  if batch_size <= 0 or batch_size % dp:
    raise ValueError(f"batch_size={batch_size} is not a positive multiple of the mesh's "
                     f"data-parallel size {dp} (data x fsdp = {mesh.shape['data']} x "
                     f"{mesh.shape['fsdp']}); use a multiple of {dp}.")
  if max_prompt_len < 1 or max_decode_len < 1:
    raise ValueError(f"max_prompt_len={max_prompt_len} and max_decode_len={max_decode_len} "
                     f"must both be at least 1.")
  if max_prompt_len + max_decode_len - 1 > cfg.max_len:  # the last token is never an input
    raise ValueError(f"max_prompt_len + max_decode_len - 1 = {max_prompt_len} + "
                     f"{max_decode_len} - 1 is over the model's max_len={cfg.max_len}; shorten "
                     f"one of them.")
  for name, size, axis in (("num_heads", cfg.num_heads, "model"), ("mlp_dim", cfg.mlp_dim, "model"),
                           ("emb_dim", cfg.emb_dim, "fsdp")):
    if size % mesh.shape[axis]:
      raise ValueError(f"{name}={size} is not divisible by the mesh's {axis} axis "
                       f"({mesh.shape[axis]}); change the mesh or the model size.")


def _validate_request(prompts, stop_ids, vocab_size: int) -> None:
  """Clear errors for prompts and stop ids, before anything runs."""
  if len(stop_ids) > MAX_STOP_IDS:
    raise ValueError(f"{len(stop_ids)} stop ids {list(stop_ids)}: at most {MAX_STOP_IDS}; "
                     f"keep the ones that matter (e.g. EOS and newline).")
  bad = [int(s) for s in stop_ids if not 0 <= int(s) < vocab_size]
  if bad:
    raise ValueError(f"stop ids {bad} are outside the vocabulary [0, {vocab_size}); "
                     f"use ids of the model's vocabulary.")
  for i, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise ValueError(f"prompt {i} is empty; give every prompt at least one token "
                       f"(e.g. the id 0 that starts every training example).")
    ids = np.asarray(prompt)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"prompt {i} is not a flat sequence of integer token ids.")
    if ids.min() < 0 or ids.max() >= vocab_size:
      raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab_size}) "
                       f"(min {ids.min()}, max {ids.max()}); tokenize with the model's "
                       f"vocabulary.")


def left_padded(prompts: Sequence[Sequence[int]], batch_size: int, max_prompt_len: int):
  """Host arrays of one batch: tokens_BxP, segment_ids_BxP, positions_BxP (int32) and
  active_B (bool; False for the rows that only fill the batch). A prompt keeps its last
  max_prompt_len tokens, right-aligned; padding has token 0, segment 0, position 0."""
  shape = (batch_size, max_prompt_len)
  tokens, segs, pos = (np.zeros(shape, np.int32) for _ in range(3))
  for row, prompt in enumerate(prompts):
    ids = np.asarray(prompt, np.int32)[-max_prompt_len:]
    n = len(ids)
    tokens[row, max_prompt_len - n:] = ids
    segs[row, max_prompt_len - n:] = 1
    pos[row, max_prompt_len - n:] = np.arange(n)
  active = np.arange(batch_size) < len(prompts)
  return tokens, segs, pos, active


def _is_stop(tok_B, stop_ids_S):
  """Whether each token is one of the stop ids (padding entries -1 never match)."""
  return jnp.any(tok_B[:, None] == stop_ids_S[None, :], axis=1)


def _greedy_loop(first_B, step_fn, carry, active_B, stop_ids_S, max_decode_len: int):
  """Tokens [B, D]: first_B, then step_fn(i, previous token_B, carry) -> (token_B, carry) for
  i = 1.. until every row has stopped or D tokens. After a row's first stop id (kept) and on
  inactive rows, tokens are 0 (and 0 is what the next step is fed)."""
  first_B = jnp.where(active_B, first_B, 0)
  out_BxD = jnp.zeros((first_B.shape[0], max_decode_len), jnp.int32).at[:, 0].set(first_B)
  out_BxD = nn.with_logical_constraint(out_BxD, ("batch", "length"))
  done_B = ~active_B | _is_stop(first_B, stop_ids_S)

  def cond(state):
    i, _, done_B, _, _ = state
    return (i < max_decode_len) & ~jnp.all(done_B)

  def body(state):
    i, prev_B, done_B, out_BxD, carry = state
    tok_B, carry = step_fn(i, prev_B, carry)
    tok_B = jnp.where(done_B, 0, tok_B.astype(jnp.int32))
    out_BxD = jax.lax.dynamic_update_slice_in_dim(out_BxD, tok_B[:, None], i, axis=1)
    return i + 1, tok_B, done_B | _is_stop(tok_B, stop_ids_S), out_BxD, carry

  state = (jnp.array(1, jnp.int32), first_B, done_B, out_BxD, carry)
  return jax.lax.while_loop(cond, body, state)[3]


def _argmax_at(cfg: TransformerConfig, params, hidden_BxLxD, slot) -> jax.Array:
  """Greedy token [B] from the hidden state at one slot (the logits of that slot only)."""
  h_Bx1xD = jax.lax.dynamic_slice_in_dim(hidden_BxLxD, slot, 1, axis=1)
  return jnp.argmax(output_logits(cfg, params, h_Bx1xD)[:, 0], axis=-1).astype(jnp.int32)


def _apply_cached(model: Transformer, params, cache, tokens_BxL, segment_ids_BxL, positions_BxL):
  """(hidden [B, L, D], updated cache): L more tokens through the model's KV caches."""
  variables = {"params": params, "cache": cache}
  hidden, mutated = model.apply(variables, tokens_BxL, segment_ids_BxL, positions_BxL,
                                return_hidden=True, decode=True, mutable=["cache"])
  return hidden, mutated["cache"]


def greedy_cached(params, tokens_BxP, segment_ids_BxP, positions_BxP, active_B, stop_ids_S, *,
                  model: Transformer, cache_specs, max_decode_len: int):
  """Tokens [B, D]: prefill the prompt buffer into a zeroed KVCache of T slots, then one token
  a step. cache_specs: (abstract cache tree, its logical PartitionSpecs)."""
  cfg = model.cfg
  abstract, logical = cache_specs
  cache = jax.tree.map(lambda a, s: nn.with_logical_constraint(jnp.zeros(a.shape, a.dtype), s),
                       abstract, logical)
  hidden, cache = _apply_cached(model, params, cache, tokens_BxP, segment_ids_BxP, positions_BxP)
  first_B = _argmax_at(cfg, params, hidden, tokens_BxP.shape[1] - 1)
  lengths_B = jnp.sum(segment_ids_BxP != 0, axis=1).astype(jnp.int32)

  def step(i, prev_B, cache):
    pos_Bx1 = (lengths_B + i - 1)[:, None]
    hidden, cache = _apply_cached(model, params, cache, prev_B[:, None], jnp.ones_like(pos_Bx1),
                                  pos_Bx1)
    return _argmax_at(cfg, params, hidden, 0), cache

  return _greedy_loop(first_B, step, cache, active_B, stop_ids_S, max_decode_len)


def greedy_uncached(params, tokens_BxP, segment_ids_BxP, positions_BxP, active_B, stop_ids_S, *,
                    model: Transformer, max_decode_len: int):
  """Tokens [B, D]: every step runs the training forward over all T slots (slots not yet
  generated are padding) and takes the argmax at the newest one."""
  cfg = model.cfg
  p = tokens_BxP.shape[1]
  grow = lambda x_BxP: jnp.pad(x_BxP, ((0, 0), (0, max_decode_len - 1)))
  seq = (grow(tokens_BxP), grow(segment_ids_BxP), grow(positions_BxP))  # each [B, T]
  lengths_B = jnp.sum(segment_ids_BxP != 0, axis=1).astype(jnp.int32)

  def forward(seq, slot):
    seq = tuple(nn.with_logical_constraint(x, ("batch", "length")) for x in seq)
    hidden = model.apply({"params": params}, *seq, return_hidden=True)
    return _argmax_at(cfg, params, hidden, slot)

  def step(i, prev_B, seq):
    slot = p + i - 1
    put = lambda x_BxT, v_B: jax.lax.dynamic_update_slice_in_dim(x_BxT, v_B[:, None], slot, 1)
    tokens, segs, pos = seq
    seq = (put(tokens, prev_B), put(segs, jnp.ones_like(prev_B)), put(pos, lengths_B + i - 1))
    return forward(seq, slot), seq

  first_B = forward(seq, p - 1)
  return _greedy_loop(first_B, step, seq, active_B, stop_ids_S, max_decode_len)


class Decoder:
  """Greedy decoding of a Transformer's params on a mesh; see the module docstring."""

  def __init__(self, model_cfg: TransformerConfig, mesh: Mesh, *, batch_size: int,
               max_prompt_len: int, max_decode_len: int, rules=sharding_lib.DEFAULT_RULES):
    _validate_config(model_cfg, mesh, batch_size, max_prompt_len, max_decode_len)
    self.model_cfg, self.mesh, self.rules = model_cfg, mesh, rules
    self.batch_size, self.max_prompt_len = batch_size, max_prompt_len
    self.max_decode_len = max_decode_len
    self.model = Transformer(model_cfg)
    self.param_shardings = param_shardings(model_cfg, mesh, rules)
    self._batch_sharding = sharding_lib.batch_sharding(mesh, rules)  # [B, P]
    self._row_sharding = NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), rules))
    self._replicated = sharding_lib.replicated(mesh)
    common = dict(model=self.model, max_decode_len=max_decode_len)
    self._fns = {
        True:
            self._jit(functools.partial(greedy_cached, cache_specs=self._cache_specs(), **common)),
        False:
            self._jit(functools.partial(greedy_uncached, **common)),
    }

  def _cache_specs(self):
    """(abstract cache tree, logical PartitionSpecs) of a KVCache of P + D - 1 slots."""
    dummy = jnp.zeros((self.batch_size, self.max_prompt_len + self.max_decode_len - 1), jnp.int32)
    boxed = jax.eval_shape(lambda r: self.model.init(r, dummy, dummy, dummy, decode=True),
                           jax.random.key(0))
    return nn.meta.unbox(boxed)["cache"], nn.get_partition_spec(boxed)["cache"]

  def _jit(self, fn):
    batch, row, repl = self._batch_sharding, self._row_sharding, self._replicated
    return jax.jit(
        trainer_lib.in_mesh(fn, self.mesh, self.rules),
        in_shardings=(self.param_shardings, batch, batch, batch, row, repl), out_shardings=repl)

  def lowered(self, params, *, use_cache: bool = True):
    """The decode function lowered for a batch (compile checks); params may be abstract."""
    shape = (self.batch_size, self.max_prompt_len)
    prompt = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self._batch_sharding)
    active = jax.ShapeDtypeStruct(shape[:1], jnp.bool_, sharding=self._row_sharding)
    stop = jax.ShapeDtypeStruct((MAX_STOP_IDS,), jnp.int32, sharding=self._replicated)
    return self._fns[bool(use_cache)].lower(params, prompt, prompt, prompt, active, stop)

  def _global(self, host_array, sharding):
    """A global array from host data that every process holds in full."""
    return jax.make_array_from_callback(host_array.shape, sharding, lambda idx: host_array[idx])

  def decode(self, params, prompts: Sequence[Sequence[int]], *, stop_ids: Sequence[int] = (),
             use_cache: bool = True) -> np.ndarray:
    """[N, max_decode_len] int32 greedy continuations of N prompts (any N >= 0), run in batches
    of batch_size. Tokens after the first stop id (which is kept) are 0. A prompt longer than
    max_prompt_len keeps its last max_prompt_len tokens. Every process passes the same prompts
    and gets the same full result."""
    prompts, stop_ids = list(prompts), [int(s) for s in stop_ids]
    _validate_request(prompts, stop_ids, self.model_cfg.vocab_size)
    out = np.zeros((len(prompts), self.max_decode_len), np.int32)
    if not prompts:
      return out
    params = jax.device_put(nn.meta.unbox(params), self.param_shardings)
    stop_S = np.full((MAX_STOP_IDS,), -1, np.int32)
    stop_S[:len(stop_ids)] = stop_ids
    stop_S = self._global(stop_S, self._replicated)
    fn = self._fns[bool(use_cache)]
    for start in range(0, len(prompts), self.batch_size):
      chunk = prompts[start:start + self.batch_size]
      tokens, segs, pos, active = left_padded(chunk, self.batch_size, self.max_prompt_len)
      args = [self._global(x, self._batch_sharding) for x in (tokens, segs, pos)]
      result = fn(params, *args, self._global(active, self._row_sharding), stop_S)
      out[start:start + len(chunk)] = np.asarray(result.addressable_data(0))[:len(chunk)]
    return out
