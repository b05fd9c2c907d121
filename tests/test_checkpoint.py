"""Checkpointer: relative MODEL_DIRs, save/restore round trip of state and input position."""
import jax
import jax.numpy as jnp
import numpy as np

from doremi_jax import checkpoint


def test_relative_model_dir_round_trip(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.int32(7)}
  data_state = {"step": np.array(7), "draws": np.array([3, 4, 0])}
  ckpt = checkpoint.Checkpointer("runs/rel", save_every=1, keep=2)
  ckpt.save(7, state, data_state, force=True)
  ckpt.close()
  assert (tmp_path / "runs" / "rel" / "checkpoints" / "7").is_dir()

  again = checkpoint.Checkpointer("runs/rel", save_every=1, keep=2)
  assert again.latest_step() == 7
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  restored, restored_data = again.restore(7, abstract)
  again.close()
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
  assert int(restored["step"]) == 7
  np.testing.assert_array_equal(restored_data["draws"], [3, 4, 0])

  params, step = checkpoint.restore_params("runs/rel", {"w": abstract["params"]["w"]})
  assert step == 7
  np.testing.assert_array_equal(params["w"], state["params"]["w"])
