"""Packaging for steer_fast, the library (the tooling is the steer-fast-bench distribution in
bench/).

The Triton kernels live in ``kernels/`` at the top of the repository and are installed only as
``steer_fast.kernels``, never as a top-level ``kernels``: that name belongs to the Hugging Face
kernel-hub package, which transformers imports. ``kernels/`` has no ``__init__.py``, so that
Python started in the repository root (where it is on sys.path) still imports the installed
hub package: a folder without one loses to a regular package of the same name. The package sees
the folder through the link ``steer_fast/kernels -> ../kernels``, as a namespace subpackage, in
an editable install and in a built wheel alike (tests/test_packaging.py).
"""

from setuptools import find_packages, setup

setup(
    name="steer_fast",
    version="0.1.0",
    description="Fused Triton kernels for post-block activation steering of Hugging Face models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # steer_fast.kernels has no __init__.py: named here, since find_packages skips it.
    packages=[*find_packages(include=["steer_fast", "steer_fast.*"]), "steer_fast.kernels"],
    install_requires=[
        "torch>=2.6",
        "triton>=3.2; platform_system == 'Linux'",
        # Tested on 5.25 (the documented snippets use its argument names: warmup_steps as a
        # ratio, activation_checkpointing); below 6, which drops the gradient-checkpointing names
        # steer_fast.shims reads.
        "transformers>=4.50,<6",
        "safetensors>=0.4",
        # Hub ids, model cards and push_to_hub (steer_fast.hub, model_card, push).
        "huggingface_hub>=1.0",
        "peft>=0.13",  # LoRA for joint adaptation (steer_fast.joint)
        "numpy",
    ],
    extras_require={
        # trl: the tests train with TRL's SFT and GRPO trainers (tests/test_trl.py); gguf and
        # accelerate load the README's real model (tests/test_quickstart.py); the
        # microbenchmarks in bench/dev use pytest-benchmark.
        "dev": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "ruff>=0.6",
            "trl>=1.16",
            "gguf>=0.10",
            "accelerate>=0.26",
            "bitsandbytes>=0.50",  # 4-/8-bit bases on the CPU (tests/test_quantized.py)
        ],
        # TRL's trainers (SFTTrainer, GRPOTrainer, ...) accept steer_fast models as they are.
        "trl": ["trl>=1.16"],
    },
    # The `steer-fast` command (benchmarks, the accuracy reproduction) is the steer-fast-bench
    # distribution in bench/: pip install -e bench
)
