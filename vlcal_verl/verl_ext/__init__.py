"""verl 0.9.1 extension: the only package that imports verl workers and trainers.

- :mod:`.batch`   — the trainer's new steps as pure tensor functions (CPU-testable);
- :mod:`.vce_engine` — VCE through verl's FSDP engine (masked forward inside its micro-batching);
- :mod:`.worker`  — ``VLCalActorRolloutRefWorker``: ``ActorRolloutRefWorker`` + ``compute_vce``;
- :mod:`.trainer` — ``VLCalTrainer``: verl's V1 sync ``PPOTrainer`` + VCE reward and TAR steps;
- :mod:`.plugin`  — ``register()``, loaded through the ``verl.plugins`` entry point.

Nothing is imported here eagerly: importing verl takes seconds.
"""
