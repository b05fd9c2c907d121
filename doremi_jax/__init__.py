"""doremi_jax: DoReMi domain reweighting (Xie et al., 2023) on a sharded JAX/Flax trainer."""
import os

__version__ = "0.2.0"

# TensorFlow (used by SeqIO for data only) is chatty at import; keep its C++ logs to errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
