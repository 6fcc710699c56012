"""vlcal-verl: VL-Calibration (decoupled visual / reasoning confidence) on verl 0.9.1.

The algorithm modules (``protocol``, ``spans``, ``grading``, ``rewards``, ``metrics``, ``vce``, ``tar``)
are pure and engine-agnostic; ``vlcal_verl.verl_ext`` is the only package that imports verl's workers
and trainers, and ``vlcal_verl.local`` is the single-process CPU engine over the same modules.
"""

__version__ = "0.1.0"
