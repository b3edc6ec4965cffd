"""megatron-dsv3: DeepSeek-V3 architecture and training system as a megatron-core plugin."""
from setuptools import find_packages, setup

setup(
    name="megatron-dsv3",
    version="0.1.0",
    description="DeepSeek-V3 (MLA, DeepSeekMoE, MTP, FP8, DualPipe) for Megatron training stacks",
    packages=find_packages(include=["megatron_dsv3", "megatron_dsv3.*"]),
    python_requires=">=3.12",
    install_requires=[
        "torch>=2.11,<2.15",
        "megatron-core>=0.19,<0.20",
        "numpy",
        "tqdm",
        "psutil",  # megatron-core distributed checkpointing needs it
        "safetensors",  # dsv3-convert reads and writes Hugging Face checkpoints
    ],
    extras_require={
        "test": ["pytest", "transformers>=5", "hypothesis"],
        "wandb": ["wandb"],
        "plot": ["matplotlib"],
        "te": ["transformer-engine[pytorch]>=2.3"],
    },
    entry_points={"console_scripts": [
        "dsv3-pretrain = megatron_dsv3.cli.launch:pretrain",
        "dsv3-convert = megatron_dsv3.cli.launch:convert",
        "dsv3-generate = megatron_dsv3.cli.launch:generate",
        "dsv3-eplb = megatron_dsv3.cli.launch:eplb",
    ]},
)
