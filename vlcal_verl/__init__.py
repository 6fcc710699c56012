"""vlcal-verl: VL-Calibration (decoupled visual / reasoning confidence) on verl 0.9.1.

The algorithm modules (``protocol``, ``spans``, ``grading``, ``rewards``, ``metrics``, ``vce``, ``tar``)
are pure and engine-agnostic; ``vlcal_verl.verl_ext`` is the only package that imports verl's workers
and trainers (and registers verl's CPU backend); ``vlcal_verl.demo`` holds the steps around verl's GRPO run
in the embedded demo. There is one RL loop: verl's.
"""

__version__ = "0.1.0"
