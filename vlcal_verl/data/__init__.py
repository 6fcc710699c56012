"""Datasets as verl-ready rows: the offline easy-vqa set, ViRL-39K → VL-Calibration-12K, and benchmarks."""
