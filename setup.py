"""pmp_megatron: Private Mask Pre-Training of non-fine-tunable foundation models on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="pmp_megatron",
    version="0.1.0",
    description="Private Mask Pre-Training (PMP) of non-fine-tunable foundation models on Megatron-Core",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["pmp_megatron", "pmp_megatron.*"]),
    install_requires=[
        "torch==2.14.1",
        "megatron-core==0.19.2",
        "psutil",  # undeclared runtime dependency of dist_checkpointing's writer
        "numpy",
        "pyyaml",
        "sentencepiece",
        "safetensors",
        "submitit",
        "tqdm",
    ],
    extras_require={
        # Transformer Engine needs CUDA to build/import. apex is NOT on PyPI (the registry's `apex` is an
        # unrelated project): install it from NVIDIA's source, see README "GPU notes".
        "gpu": ["transformer-engine[pytorch]"],
        "release": ["transformers", "protobuf"],
        "attack": ["transformers", "protobuf", "peft", "matplotlib"],
        "test": ["pytest", "ruff", "transformers", "protobuf", "peft", "matplotlib", "tensorboard"],
    },
    entry_points={
        "console_scripts": [
            "pmp-quickstart=pmp_megatron.cli:quickstart",
            "pmp-pretrain=pmp_megatron.cli:pretrain",
            "pmp-export-mask=pmp_megatron.cli:export_mask",
            "pmp-release=pmp_megatron.cli:release",
            "pmp-attack=pmp_megatron.attack.cli:main",
            "pmp-launch=pmp_megatron.launch.cli:main",
        ]
    },
)
