"""Install ddpo under one import name, `ddpo`: the top-level folders `models/` and `data/` become
`ddpo.models` and `ddpo.data` (ddpo/models and ddpo/data are links to them), so a wheel holds `ddpo/` only
and never shadows a user's own `data` or `models` package.

Lower bounds only: cluster users bring their own CUDA build of torch. The versions known to work
together on a CPU machine are pinned in requirements.txt.
"""

from setuptools import find_packages, setup

setup(
    name="ddpo",
    version="0.1.0",
    description="Dense Direct Preference Optimization (RLHF-V) for multimodal LLMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ddpo", "ddpo.*"]),
    package_data={"ddpo": ["eval/assets/*"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "sentencepiece>=0.2",  # SentencePiece-only tokenizers (RLHF-V / Muffin, LLaMA-1)
        "protobuf>=4.0",
        "datasets>=3.0",
        "deepspeed>=0.16",
        "wandb>=0.19",
        "numpy>=1.26",
        "pillow>=10.0",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "lemminflect>=0.2.3",
    ],
    extras_require={
        "dev": ["pytest>=8.0"],
        "lora": ["peft>=0.13"],
        "experiments": ["matplotlib>=3.7"],
        "bench": ["trl>=1.0"],
    },
    entry_points={"console_scripts": ["ddpo=ddpo.commands:main"]},
)
