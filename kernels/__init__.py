"""Triton kernels of steer_fast, installed as ``steer_fast.kernels`` (setup.py ``package_dir``).

This folder is never installed as a top-level ``kernels``: that name belongs to the Hugging Face
kernel-hub package, which transformers probes for. Nothing here runs on import.
"""
