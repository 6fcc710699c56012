"""Typed ``science:`` block of ``recipes/tiny_science.yaml``: what the science run adds to the demo.

The recipe also holds a ``demo:`` block (:class:`vlcal_verl.demo.config.DemoConfig`: model, tokenizer,
data sizes, warm start, evaluation sampling) and verl's settings; this block says which RL runs to make
from the one warm start and what the report measures them against. Overrides use Hydra's syntax
(``science.seeds=3``); unknown keys are errors naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

BASELINES = ("rlcr", "decoupled", "none")
"""Baseline ablations a science run can train from the one warm start. ``rlcr``: the RLCR baseline as the
paper trains it (one ``<confidence>``, Brier + format, no VCE, TAR or visual term), on the same items
prompted in its layout; it needs a warm start that also writes that layout
(``demo.warm_start_rlcr_fraction`` > 0). Its one confidence stands in for c_v in the report's visual
columns. ``decoupled``: RLCR's reward with c_v and c_r still stated (no VCE, TAR or visual term), the
closer ablation: the same protocol, only the method's extra signals removed. ``none``: the full method
alone (comparing its settings on dev, ``evaluate_on: dev``; the baseline target is then not met)."""

EVALUATE_ON = ("heldout", "dev")
"""What a science run evaluates on (:attr:`ScienceConfig.evaluate_on`)."""


@dataclass
class ScienceConfig:
    """The RL arms, their seeds, the S̃_vis agreement window and the targets of the report."""

    seeds: int = 1
    """RL runs per arm (seeds ``demo.seed``, ``demo.seed + 1``, …; the data order, rollout sampling and
    VCE masks follow the seed, both arms of one seed share them). ``vlcal train --seeds N`` sets it."""
    baseline: str = "rlcr"
    """The baseline arm's ablation (see :data:`BASELINES`); the full method is the recipe's default."""
    svis_last_steps: int = 5
    """S̃_vis agreement pools the training rollouts of the last N GRPO steps of each full-method run."""
    evaluate_on: str = "heldout"
    """``heldout``: the report's items are easy-vqa's test split (``demo.eval_size`` items + their
    image-removed twins) — for reporting. ``dev``: as many *training-split* items after the training
    items whose image no training item shows (+ twins), and the test split is never read — for choosing
    RL settings on the training split (``vlcal_verl.demo.data.load_dev_data``)."""
    target_ece_ratio: float = 0.7
    """Target: the full method's ECE ≤ this × the warm start's (and its ci95 upper bound below it)."""
    target_visual_auroc: float = 0.65
    """Target: AUROC(c_v vs visual_correct) of the full method on the held-out items."""
    target_no_image_gap: float = 0.2
    """Target: mean c_v on answerable minus on image-removed held-out items, full method."""
    target_svis_auroc: float = 0.65
    """Target: AUROC(S̃_vis vs visual_correct) over the last steps' training rollouts."""

    def validate(self) -> ScienceConfig:
        """Raise ValueError naming the field when a value is out of range; return self."""
        for name in ("seeds", "svis_last_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"science.{name} must be >= 1, got {getattr(self, name)}")
        if self.baseline not in BASELINES:
            raise ValueError(f"science.baseline must be one of {list(BASELINES)}, got {self.baseline!r}")
        if self.evaluate_on not in EVALUATE_ON:
            raise ValueError(
                f"science.evaluate_on must be one of {list(EVALUATE_ON)}, got {self.evaluate_on!r}"
            )
        if not 0.0 < self.target_ece_ratio <= 1.0:
            raise ValueError(f"science.target_ece_ratio must be in (0, 1], got {self.target_ece_ratio}")
        for name in ("target_visual_auroc", "target_svis_auroc"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"science.{name} must be in [0, 1], got {getattr(self, name)}")
        if not -1.0 <= self.target_no_image_gap <= 1.0:
            raise ValueError(
                f"science.target_no_image_gap must be in [-1, 1], got {self.target_no_image_gap}"
            )
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ScienceConfig:
        """Build from the recipe's ``science:`` block; YAML 1.1 number strings ("7e-1") are cast."""
        d = dict(d or {})
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown key(s) in science: {unknown} (known: {sorted(fields)})")
        out: dict[str, Any] = {}
        for key, value in d.items():
            kind = type(getattr(cls(), key))
            if kind in (int, float) and isinstance(value, bool):
                raise ValueError(f"science.{key} must be of type {kind.__name__}, got {value!r}")
            try:
                out[key] = kind(value) if kind in (int, float) else value
            except (TypeError, ValueError):
                raise ValueError(f"science.{key} must be of type {kind.__name__}, got {value!r}") from None
            if kind is int and float(value) != out[key]:
                raise ValueError(f"science.{key} must be a whole number, got {value!r}")
        return cls(**out).validate()
