"""The science run (``vlcal train --config recipes/tiny_science.yaml``): does training with the method do
what it is for, on held-out items, against a baseline trained the same way?

One warm start (the demo's data and warm start, :mod:`vlcal_verl.demo`), then verl's own GRPO loop
(``python -m vlcal_verl.main``) once per arm and seed from that same warm start and data order — the full
method and the baseline — then ``vlcal eval`` of the warm start and of every result, and one report:

- :mod:`.config`: the recipe's typed ``science:`` block (arms, seeds, the S̃_vis window, the targets);
- :mod:`.pipeline`: the phases, resumable, refusing to mix runs;
- :mod:`.rollouts`: S̃_vis and the exact visual judge's verdict per training rollout (written by the
  trainer beside verl's own ``trainer.rollout_data_dir`` dump);
- :mod:`.report`: ``report.md`` / ``report.html`` / ``science.json`` and the per-step curves.
"""
