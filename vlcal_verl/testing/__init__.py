"""Offline stand-ins for hub assets: the real Qwen tokenizer and tiny random VLMs.

Tests and the CPU demo cannot reach a model hub; these build real `transformers` objects from files
that PyPI packages ship, so every code path (processor, chat template, generate, forward) is the real one.
"""
