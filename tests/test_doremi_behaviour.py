"""Behaviour on synthetic domains with a known answer: DoReMi starves a pure-noise domain.

Four domains of token sequences: `noise` (uniform over the whole vocabulary: nothing to
learn, every model's best loss is log V), and three learnable ones (a repeated motif, a
sparse bigram chain, arithmetic sequences). A reference trains on uniform batches, then a
DoReMi proxy against it. Learnable domains keep a positive excess loss while the proxy
catches up; noise offers nothing to catch up on, so its weight must fall toward the floor
c/K and its average must be the smallest.
"""
import dataclasses

import jax
import numpy as np

from doremi_jax import data, doremi, sharding, steps, trainer as trainer_lib
from tests import helpers

L, V, B, STEPS = 64, 259, 16, 150


def synthetic_domains(rng, n_seq: int = 256) -> data.PackedDomains:
  tokens = {"noise": rng.integers(3, V, size=(n_seq, L))}
  motifs = rng.integers(3, V, size=(n_seq, 8))
  tokens["repeat"] = np.tile(motifs, (1, L // 8))
  successors = rng.integers(3, V, size=(V, 4))
  chain = np.zeros((n_seq, L), np.int64)
  chain[:, 0] = rng.integers(3, V, n_seq)
  for j in range(1, L):
    chain[:, j] = successors[chain[:, j - 1], rng.integers(0, 4, n_seq)]
  tokens["markov"] = chain
  start, stride = rng.integers(3, V, n_seq), rng.integers(1, 5, n_seq)
  tokens["count"] = 3 + (start[:, None] - 3 + stride[:, None] * np.arange(L)) % (V - 3)
  names = sorted(tokens)
  return data.PackedDomains(names, {
      n: helpers.whole_rows(tokens[n], domain=i + 1) for i, n in enumerate(names)
  }, split="train", sequence_length=L)


def trained_reference():
  """(synthetic domains, model config, build_trainer arguments, reference parameters): a
  reference of the tiny model trained STEPS steps on uniform batches."""
  packed = synthetic_domains(np.random.default_rng(0))
  k = len(packed.names)
  cfg = dataclasses.replace(helpers.TINY_CFG, vocab_size=V, emb_dim=64, head_dim=32, mlp_dim=256,
                            max_len=L)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  common = dict(model_cfg=cfg, mesh=mesh, global_batch_size=B, seq_len=L, total_steps=STEPS)
  ref = trainer_lib.build_trainer(**common, step_cfg=steps.StepConfig(num_domains=k))
  state = ref.init_fn(jax.random.key(0))
  batches = data.BatchIterator(packed, global_batch_size=B, seed=0, sampling="uniform")
  for _ in range(STEPS):
    state, _ = ref.step_fn(state, ref.make_batch(next(batches)))
  return packed, cfg, common, state.params


def test_noise_domain_ends_near_the_floor():
  packed, cfg, common, ref_params = trained_reference()
  k = len(packed.names)

  smoothing = 1e-3
  proxy = trainer_lib.build_trainer(
      **common, ref_model_cfg=cfg,
      step_cfg=steps.StepConfig(num_domains=k,
                                doremi=doremi.DoReMiConfig(eta=1.0, smoothing=smoothing)))
  state = proxy.init_fn(jax.random.key(1))
  batches = data.BatchIterator(packed, global_batch_size=B, seed=1, sampling="stratified")
  alphas = []
  for _ in range(STEPS):
    state, metrics = proxy.step_fn(state, ref_params, proxy.make_batch(next(batches)))
    alphas.append(np.asarray(metrics["domain_weights"]))
  alphas = np.stack(alphas)
  avg = np.asarray(state.doremi.avg_alpha_K)
  noise = packed.names.index("noise")

  np.testing.assert_allclose(avg, alphas.mean(axis=0), rtol=1e-4)
  assert np.all(alphas >= smoothing / k - 1e-7)
  assert int(np.argmin(avg)) == noise, dict(zip(packed.names, avg))
  # Uniform is 0.25; the floor is c/K = 2.5e-4. Noise spends the second half near the floor.
  assert alphas[STEPS // 2:, noise].mean() < 0.02, alphas[STEPS // 2:, noise]
  assert avg[noise] < 0.05, dict(zip(packed.names, avg))
