"""All mutable run state in one pytree, checkpointed together."""
from typing import Any, Optional

from flax import struct
import jax.numpy as jnp

from doremi_jax import doremi as doremi_lib
from doremi_jax import mixing as mixing_lib


@struct.dataclass
class TrainState:
  step: jnp.ndarray  # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any
  doremi: Optional[doremi_lib.DoReMiState] = None  # only in DoReMi (proxy) runs
  mixing: Optional[mixing_lib.MixingState] = None  # only in online-mixing main runs
