"""vlcal reward server: VL-Calibration rewards over HTTP for any verl (or OpenRLHF) trainer.

``python -m reward_server --host 0.0.0.0 --port 8000`` (or ``vlcal serve``) starts it;
:mod:`reward_server.client` is the verl ``custom_reward_function`` that calls it. Routes, limits and
design notes are in :mod:`reward_server.app`.
"""

from vlcal_verl import __version__

REWARD_NAME = "vl-calibration"
"""The reward this server computes: R = I + w_brier·(−(Φ − I)²) + w_fmt·F (docs/design.md §3)."""
REWARD_VERSION = __version__
"""Reward version = the vlcal-verl version whose rewards module is served."""

__all__ = ["REWARD_NAME", "REWARD_VERSION", "__version__"]
