"""Score model responses with the VL-Calibration reward and compute calibration metrics, from Python.

    python examples/score_and_metrics.py [--plot reliability.png]

The same functions ``vlcal score`` and ``vlcal metrics`` use: :func:`vlcal_verl.rewards.score_many`
(R = I + w_brier·(−(Φ − I)²) + w_fmt·F, graded in a killable process pool) and
:func:`vlcal_verl.metrics.calibration_metrics` (accuracy, ECE, AUROC, Brier, AURC). Prints one JSON
object: the per-response scores and the metrics of the overall confidence Φ.
"""

from __future__ import annotations

import argparse
import json

from vlcal_verl.config import RewardConfig
from vlcal_verl.metrics import calibration_metrics, plot_reliability
from vlcal_verl.rewards import score_many


def decoupled(answer: str, c_v: int, c_r: int) -> str:
    """A response in the decoupled protocol (docs/design.md §2) with confidences c_v, c_r on 0..10."""
    return (
        "<think><vision>Three red apples on a wooden table.</vision>"
        "<reasoning>Counting them one by one.</reasoning></think>\n"
        f"\\boxed{{{answer}}}\n<analysis>The apples are clearly visible.</analysis>\n"
        f"<confidence><vision_confidence>{c_v}</vision_confidence>"
        f"<reasoning_confidence>{c_r}</reasoning_confidence></confidence>"
    )


# (response, ground truth, answer kind): right and sure, wrong and sure, right and unsure, a fraction,
# a multiple-choice letter, and a response without the confidence tags (unparsed)
ITEMS = [
    (decoupled("3", 10, 10), "3", None),
    (decoupled("4", 9, 9), "3", None),
    (decoupled("3", 4, 5), "3", None),
    (decoupled("\\frac{1}{2}", 8, 6), "0.5", None),
    (decoupled("B", 7, 7), "B", "multiple_choice"),
    ("It is probably 3. \\boxed{3}", "3", None),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--plot", default=None, help="also write the reliability diagram here (.png, .pdf, ...)"
    )
    args = parser.parse_args()

    config = RewardConfig()  # the authors' weights: w_brier 2.0, w_fmt 0.4
    results = score_many(ITEMS, config)  # one dict per item: score + the component keys
    # an unparsed confidence counts as 0 in the metrics, and lowers the parse rate
    confidence = [r["confidence"] if r["confidence"] is not None else 0.0 for r in results]
    correct = [r["accuracy"] for r in results]
    parsed = [bool(r["parse_ok"]) for r in results]
    metrics = calibration_metrics(confidence, correct, n_bins=10, parsed=parsed)
    if args.plot:
        metrics["plot"] = str(plot_reliability(confidence, correct, args.plot, title="example"))
    print(
        json.dumps(
            {"scores": [r["score"] for r in results], "results": results, "metrics": metrics}, indent=2
        )
    )


if __name__ == "__main__":  # the grading pool's worker processes re-import this file
    main()
