"""The embedded demo (``make demo`` = ``vlcal train``): the steps around verl's own GRPO run.

There is one RL loop in the project, verl's. The demo prepares what a tiny random model needs before that
loop can teach it anything, and reads the result afterwards:

1. data (:mod:`.data`): easy-vqa as verl parquet — train, held-out and its image-removed copy;
2. warm start (:mod:`.warm_start`): supervised steps on protocol-formatted targets, saved as an HF folder;
3. GRPO: ``python -m vlcal_verl.main --recipe recipes/tiny_cpu.yaml`` — verl 0.9.1's loop on the CPU
   backend (Ray, TransferQueue, FSDP engine, HF rollout), VCE and TAR on;
4. evaluation (:mod:`.evaluate`): ``vlcal eval`` on the warm-started and on the trained checkpoint, a
   before/after table and the training curves.

:mod:`.pipeline` runs the four steps; ``vlcal train`` is its command line.
"""
