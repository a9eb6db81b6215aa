"""megatron-fusion: fuse heterogeneous LLMs into a pivot model on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron-fusion",
    version="0.1.0",
    description="InfiFusion / InfiGFusion / InfiFPO model fusion on Megatron-Core (TP/PP/DP)",
    packages=find_packages(include=["megatron_fusion", "megatron_fusion.*"]),
    python_requires=">=3.10",
    # Core = everything the training path imports (tokenizers.py, data/, align.py, metrics.py,
    # checkpoint.py); tests/test_packaging.py trains in a venv holding only these.
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1",
        "numpy",
        "packaging",
        "pyyaml",
        "sentencepiece",
        "protobuf",    # sentencepiece's encode(return_type="proto"): the token offsets
        "tokenizers",  # HF tokenizer.json / tokenizer directories (pivots, teachers)
        "jinja2",      # chat templates of `messages` data
        "editdistance",
        "tqdm",
        "psutil",  # megatron-core dist_checkpointing writer needs it
    ],
    extras_require={
        "wandb": ["wandb"],
        "hf": ["transformers>=4.45", "safetensors", "gguf"],
        "gpu": ["transformer-engine[pytorch]"],
        "test": ["pytest", "pytest-timeout", "POT", "transformers>=4.45", "safetensors", "gguf",
                 "mistral-common"],
    },
    entry_points={"console_scripts": ["megatron-fusion=megatron_fusion.cli:main"]},
)
