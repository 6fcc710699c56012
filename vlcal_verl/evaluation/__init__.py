"""Evaluation: score generations and write the calibration report (``vlcal eval`` and the demo)."""
