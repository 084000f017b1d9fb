"""``steer-fast reproduce``: the paper's comparison of post-block steering against full
fine-tuning, LoRA, LoReFT and joint adaptation, on generated reasoning tasks.

``tasks`` builds the data, ``data`` encodes it, ``models`` loads the model, ``methods`` adapts
it, ``train`` and ``evaluate`` train and score every method the same way, ``runner`` loops over
tasks, methods, seeds and learning rates into a resumable results.json, ``report`` writes
report.md and the plots, and ``cli`` holds the command's options. Nothing here is imported by
``import steer_fast``.
"""
