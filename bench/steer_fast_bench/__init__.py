"""steer-fast-bench: the tooling around steer_fast, a client of its public API.

- ``cli``: the ``steer-fast`` command (``steer-fast bench``, ``steer-fast reproduce``; also
  ``python -m steer_fast_bench``);
- ``benchmark``: the suites of ``steer-fast bench`` (kernel, training, inference, mixed);
- ``reproduce``: ``steer-fast reproduce``, the paper's accuracy comparison on generated tasks;
- ``baselines``: PEFT LoRA, pyreft LoReFT and the joint model, built one way for both;
- ``traffic``: the Triton interpreter's byte counter (the CPU stand-in for HBM traffic).

Developer tools that are scripts, not modules (the sm_90 compile check, block-shape tuning, the
multi-adapter switch point, the GPU checklist) live in ``bench/dev``; committed results in
``bench/results``.
"""
