"""Chunked output projection + loss equals the full-logits loss (values and gradients)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doremi_jax import steps
from doremi_jax.model import Transformer
from tests import helpers

CFG = helpers.TINY_CFG


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("z_loss", [0.0, 1e-4])
def test_chunked_loss_matches_full(tie, z_loss):
  batch = jax.tree.map(jnp.asarray, helpers.packed_batch(np.random.default_rng(0), 4, 32))
  full_cfg = dataclasses.replace(CFG, tie_embeddings=tie)
  chunk_cfg = dataclasses.replace(full_cfg, logits_chunk=8)
  params = Transformer(full_cfg).init(
      jax.random.key(0), batch["inputs"], batch["segment_ids"], batch["positions"])["params"]
  params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                        is_leaf=lambda x: hasattr(x, "value"))

  def total(cfg):

    def f(p):
      ce, loss, mask = steps._forward(Transformer(cfg), p, batch, z_loss)  # pylint: disable=protected-access
      return jnp.sum(loss) / jnp.sum(mask), ce

    return jax.value_and_grad(f, has_aux=True)(params)

  (loss_a, ce_a), grads_a = total(full_cfg)
  (loss_b, ce_b), grads_b = total(chunk_cfg)
  assert float(loss_a) > 1.0
  np.testing.assert_allclose(ce_b, ce_a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_chunk_must_divide_length():
  from doremi_jax import sharding, trainer  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="logits_chunk"):
    trainer.build_trainer(
        model_cfg=dataclasses.replace(CFG, logits_chunk=5),  # 32 % 5 != 0
        mesh=sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]),
        global_batch_size=8,
        seq_len=32,
        total_steps=10,
        step_cfg=steps.StepConfig(num_domains=3))
