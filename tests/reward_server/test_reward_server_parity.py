"""Reference-parity mode on the server grades like the authors (mathruler in-process on the normalised
answer), not with the pool: its scores equal in-process ``compute_score(..., reference_parity=True)``."""

from __future__ import annotations

import asyncio
import dataclasses
import math

from reward_server import schemas
from reward_server.metrics import ServerMetrics
from reward_server.scoring import ScoringService
from reward_server.settings import ServerSettings
from vlcal_verl import rewards


def decoupled(answer: str) -> str:
    return (
        "<think><vision>a chart with bars</vision><reasoning>read the labels</reasoning></think>\n"
        f"\\boxed{{{answer}}}\n<analysis>clear</analysis>\n"
        "<confidence><vision_confidence>8</vision_confidence>"
        "<reasoning_confidence>7</reasoning_confidence></confidence>"
    )


# "B. 12" vs "B": the pool's multiple-choice grading says correct, the authors' mathruler says wrong
CASES = [("B. 12", "B"), ("3", "3"), ("4", "3"), ("\\frac{1}{2}", "0.5"), ("Yes", "yes")]


def test_parity_mode_scores_equal_in_process_reference_parity():
    settings = ServerSettings()
    cfg = dataclasses.replace(settings.reward_config(), reference_parity=True)
    service = ScoringService(
        settings, ServerMetrics.create()
    )  # no pool started: parity mode must not need it
    items = [
        schemas.ScoreItem(uid=str(k), data_source="virl", response=decoupled(a), ground_truth=gt)
        for k, (a, gt) in enumerate(CASES)
    ]
    results = asyncio.run(service.score(items, cfg))
    for (answer, gt), result in zip(CASES, results, strict=True):
        want = rewards.compute_score("virl", decoupled(answer), gt, reference_parity=True)
        assert result.status != "error", result.error
        assert math.isclose(result.score, want["score"], abs_tol=1e-12), (answer, result, want)
        assert result.components["accuracy"] == want["accuracy"]
    pooled = rewards.compute_score("virl", decoupled("B. 12"), "B")
    assert pooled["accuracy"] == 1.0 and results[0].components["accuracy"] == 0.0  # the case differs
