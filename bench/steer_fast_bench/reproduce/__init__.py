"""``steer-fast reproduce``: the paper's comparison of post-block steering against full
fine-tuning, LoRA, LoReFT and joint adaptation, on generated reasoning tasks, under one selection
rule for every method (learning-rate sweeps on validation, then seeds at the chosen setting).

``tasks`` builds the data, ``data`` encodes it, ``models`` loads the model, ``methods`` (with
``adapted``, ``loreft``, ``joint``) adapts it, ``train`` and ``evaluate`` train and score every
method the same way; ``settings`` holds the checked options, ``selection`` the rule,
``protocol`` the phases it plans (sweep, positions, joint, seeds), ``plan`` the plan and
estimate printed first, ``runner`` the loop into a resumable results.json (``results``: format
2, format 1 migrated on read); ``summary``, ``published``, ``report`` and ``plots`` write
report.md and the plots; ``cli`` holds the command's options and protocols. Nothing here is
imported by ``import steer_fast``.
"""
