"""Typed ``demo:`` block of ``recipes/tiny_cpu.yaml``: what happens around verl's GRPO run.

The recipe is one file: verl's settings (composed over ``vlcal_trainer``, read by ``python -m
vlcal_verl.main``) and this block, read by ``vlcal train`` only. Overrides use Hydra's syntax for both
(``demo.warm_start_steps=20``, ``trainer.total_training_steps=2``). Unknown keys are errors naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vlcal_verl.testing.tiny_models import FAMILIES, check_family_tokenizer


@dataclass
class DemoConfig:
    """Data sizes, the supervised warm start and the evaluation of the demo."""

    dir: str = "runs/demo"
    """Output folder; the recipe derives verl's paths from it (data, warm-started model, checkpoints)."""
    model_family: str = "qwen3-vl"
    """Tiny random model built on the spot by ``vlcal_verl.testing.tiny_models`` ('qwen3-vl' | 'qwen2.5-vl' | 'internvl')."""
    tokenizer: str = "qwen"
    """'qwen' (the real Qwen tokenizer, 151,936 embeddings) or 'small' (a ~660-token byte-level BPE trained
    on the run's own text, ``vlcal_verl.testing.small_tokenizer``: the same special tokens and chat template,
    logits ~230× smaller, the fast setting for long CPU runs; internvl appends its image tokens to either).
    Recipes without the key set it with ``+demo.tokenizer=small``."""
    seed: int = 0
    """Seeds the model init, the data sample and the warm start's batches."""
    train_size: int = 512
    """Training questions drawn from the easy-vqa train split (``data/train.parquet``)."""
    eval_size: int = 48
    """Held-out questions from the easy-vqa test split, plus as many image-removed copies."""
    image_size: int = 128
    """Images are resized (nearest) to this square size: easy-vqa's 64 px give 2×2 merged Qwen3-VL cells,
    128 px give 4×4 (a finer VCE mask). 0 keeps the original size."""
    warm_start_steps: int = 120
    """Supervised steps before RL; 0 skips the warm start (a random model: no vision spans, no signal)."""
    warm_start_batch_size: int = 8
    """Targets per supervised step."""
    warm_start_lr: float = 1e-2
    """AdamW learning rate of the warm start (a tiny model from scratch needs a large one)."""
    warm_start_rlcr_fraction: float = 0.0
    """Share of the warm start's targets written in the RLCR baseline's layout (one ``<confidence>``) under
    the prompt an ``ablation=rlcr`` run gives, the rest in the decoupled one; > 0 lets an RLCR run start
    from the same warm start (the science recipe's ``science.baseline: rlcr`` needs it). 0: decoupled only."""
    eval_temperature: float = 0.6
    """Evaluation sampling temperature (the authors' validation setting; seeded, so reproducible)."""
    eval_batch_size: int = 24
    """Prompts per generate call in ``vlcal eval``."""

    def validate(self) -> DemoConfig:
        """Raise ValueError naming the field when a value is out of range; return self."""
        for name in ("train_size", "warm_start_batch_size", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"demo.{name} must be > 0, got {getattr(self, name)}")
        for name in ("eval_size", "image_size", "warm_start_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"demo.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.warm_start_rlcr_fraction < 1.0:
            raise ValueError(
                f"demo.warm_start_rlcr_fraction must be in [0, 1), got {self.warm_start_rlcr_fraction}"
            )
        if self.eval_temperature < 0:
            raise ValueError(f"demo.eval_temperature must be >= 0, got {self.eval_temperature}")
        if self.model_family not in FAMILIES:
            raise ValueError(f"demo.model_family must be one of {list(FAMILIES)}, got {self.model_family!r}")
        try:
            check_family_tokenizer(self.model_family, self.tokenizer)
        except ValueError as err:
            raise ValueError(f"demo.tokenizer: {err}") from None
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> DemoConfig:
        """Build from the recipe's ``demo:`` block; YAML 1.1 number strings ("1e-2") are cast."""
        d = dict(d or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"unknown key(s) in demo: {unknown} (known: {sorted(fields)})")
        out: dict[str, Any] = {}
        for key, value in d.items():
            kind = type(getattr(cls(), key))
            try:
                out[key] = kind(value) if kind in (int, float) and not isinstance(value, bool) else value
            except (TypeError, ValueError):
                raise ValueError(f"demo.{key} must be of type {kind.__name__}, got {value!r}") from None
        return cls(**out).validate()
