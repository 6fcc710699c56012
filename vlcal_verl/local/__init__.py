"""The local engine: VL-Calibration's GRPO step in one CPU process (DESIGN.md §6).

It exists for the first run (``make demo``), for tests and for debugging; scale-out is verl's job.
Same algorithm modules as the verl path (protocol, rewards, VCE, TAR) and verl 0.9.1's ``core_algos``
for GRPO advantages and the PPO-clip loss; only the driver (rollouts with HF ``generate``, AdamW,
checkpoints) is local.
"""
