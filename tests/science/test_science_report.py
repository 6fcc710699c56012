"""The science report on a stub run folder: hand-made eval reports, verl metrics and S̃_vis rows.

Every expectation is computed by hand in the comments; the thresholds are the config's defaults applied
to made-up numbers (never to a real run's results).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vlcal_verl.science.config import ScienceConfig
from vlcal_verl.science.report import COLUMNS, attribute_accuracy, build, wilson_ci, write_report
from vlcal_verl.science.rollouts import judged_rows, per_step_agreement, read_rows


def metrics(acc, ece, auroc, brier, parse, vis_auroc, gap, *, n=100, ece_ci=None, vis_ci=None, gap_ci=None):
    """A ``vlcal eval`` metrics.json with only what the science report reads."""
    return {
        "overall": {
            "n": n,
            "accuracy": acc,
            "ece": ece,
            "auroc": auroc,
            "brier": brier,
            "parse_rate": parse,
            "ci95": {
                "accuracy": [acc - 0.1, acc + 0.1],
                "ece": ece_ci or [ece - 0.05, ece + 0.05],
                "auroc": [auroc - 0.1, auroc + 0.1],
                "brier": [brier - 0.02, brier + 0.02],
            },
            "visual": {"c_v": {"n": 80, "auroc": vis_auroc, "ci95": vis_ci}},
            "no_image_gap": {"vision_confidence": {"gap": gap, "ci95": gap_ci}},
        }
    }


GENERATIONS = [
    {"question": "What color is the shape?", "ground_truth": "red", "correct": True},
    {"question": "What shape is in the image?", "ground_truth": "circle", "correct": False},
    {"question": "Is there a blue shape?", "ground_truth": "no", "correct": True},
    {"question": "Is there not a triangle?", "ground_truth": "yes", "correct": False},
    {"question": "Does the image contain a circle?", "ground_truth": "yes", "correct": True},
    {"question": "What color is the shape?", "ground_truth": "red", "correct": False, "unanswerable": True},
]

# S̃_vis rows of the full run: steps 2-3 pooled (svis_last_steps=2) give positives {0.9, 0.8, 0.3} and
# negatives {0.1, 0.2, 0.5}: 8 of 9 pairs ordered → AUROC 8/9. Step 1 (0.95 wrong, 0.05 right) would
# lower it; the undescribed and the non-easy-vqa rows carry no verdict.
SVIS = {
    1: [(0.95, 0, "wrong"), (0.05, 1, "correct")],
    2: [(0.9, 1, "correct"), (0.1, 0, "wrong"), (0.7, None, "undescribed")],
    3: [
        (0.8, 1, "correct"),
        (0.2, 0, "incomplete"),
        (0.3, 1, "correct"),
        (0.5, 0, "wrong"),
        (0.6, None, None),
    ],
}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def stub_run(root: Path, full: dict, baseline: dict, seed: int = 0) -> Path:
    """A run folder as the pipeline leaves it (warm start, one seed of each arm)."""
    _write(root / "eval/warm_start/metrics.json", metrics(0.5, 0.30, 0.50, 0.30, 0.9, 0.50, 0.05))
    lines = "".join(json.dumps(g) + "\n" for g in GENERATIONS)
    (root / "eval/warm_start/generations.jsonl").write_text(lines, encoding="utf-8")
    _write(root / f"eval/full-seed{seed}/metrics.json", full)
    _write(root / f"eval/baseline-seed{seed}/metrics.json", baseline)
    for arm in ("full", "baseline"):
        steps = [
            {"step": k, "data": {"critic/score/mean": 0.1 * k, "calib/parse_rate": 0.9, "calib/ece": 0.3}}
            for k in (1, 2, 3)
        ]
        (root / f"rl/{arm}-seed{seed}/metrics").mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(s) + "\n" for s in steps)
        (root / f"rl/{arm}-seed{seed}/metrics/verl-1.jsonl").write_text(text, encoding="utf-8")
    for step, rows in SVIS.items():
        recs = [
            {
                "step": step,
                "key": f"k{i}",
                "uid": "easy-vqa/train/1",
                "s_vis": s,
                "vision_confidence": 0.5,
                "visual_correct": vc,
                "visual_judgment": st,
            }
            for i, (s, vc, st) in enumerate(rows)
        ]
        path = root / f"rl/full-seed{seed}/rollouts/vlcal-svis-{step}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return root


GOOD_FULL = metrics(
    0.6, 0.20, 0.70, 0.20, 0.95, 0.70, 0.25, ece_ci=[0.15, 0.25], vis_ci=[0.6, 0.8], gap_ci=[0.2, 0.3]
)
BASELINE = metrics(0.6, 0.22, 0.65, 0.21, 0.93, 0.55, 0.02)


def test_table_columns_cells_and_targets_met(tmp_path):
    run = stub_run(tmp_path, GOOD_FULL, BASELINE)
    (run / "run.json").write_text(json.dumps({"recipe": "r.yaml", "overrides": ["a=1"]}), encoding="utf-8")
    s = write_report(run, ScienceConfig(baseline="decoupled", svis_last_steps=2), [0])
    assert s["columns"] == list(COLUMNS)
    md = (run / "report.md").read_text(encoding="utf-8")
    assert "UTC: `r.yaml` a=1" in md
    assert md.splitlines()[2].startswith("Held-out easy-vqa items (the test split)")
    assert "| | ACC | ECE | AUROC(Φ) | Brier | parse rate | AUROC(c_v, visual) | no-image gap c_v |" in md
    full_row = next(line for line in md.splitlines() if line.startswith("| full method |"))
    # ECE with its interval, parse 0.95 of 100 with Wilson's [0.8883, 0.9785], no-image gap with its own
    assert "0.200 [0.150, 0.250]" in full_row and "0.950 [0.888, 0.978]" in full_row
    assert "0.700 [0.600, 0.800]" in full_row and "0.250 [0.200, 0.300]" in full_row
    assert [t["met"] for t in s["targets"]] == [True, True, True, True, True]  # 0.20 ≤ 0.21, 0.25 < 0.30, …
    assert s["svis_agreement"]["auroc_mean"] == pytest.approx(8 / 9)
    assert (
        s["svis_agreement"]["per_seed"][0]["n_judged"] == 6
        and s["svis_agreement"]["per_seed"][0]["n_items"] == 7
    )
    assert md.count("**met**") == 5 and "not met" not in md
    for name in ("reward", "parse_rate", "batch_ece", "svis_agreement"):
        assert (run / f"curves_{name}.png").stat().st_size > 1000
    assert json.loads((run / "science.json").read_text())["rows"]["full"]["ECE"]["value"] == 0.20
    assert "<h1>VL-Calibration science run</h1>" in (run / "report.html").read_text(encoding="utf-8")


def test_a_dev_run_says_on_its_first_line_that_its_items_are_not_held_out(tmp_path):
    run = stub_run(tmp_path, GOOD_FULL, BASELINE)
    s = write_report(run, ScienceConfig(baseline="decoupled", svis_last_steps=2, evaluate_on="dev"), [0])
    assert s["evaluate_on"] == "dev"
    first = (run / "report.md").read_text(encoding="utf-8").splitlines()[2]
    assert first.startswith("**Dev items, not held-out ones**") and "test split was not read" in first


@pytest.mark.parametrize(
    ("change", "failed"),
    [
        ({"ece": 0.22}, 0),  # 0.22 > 0.7 × 0.30 = 0.21
        ({"ece_ci": [0.15, 0.31]}, 0),  # ratio met, upper bound 0.31 not below 0.30
        ({"vis_auroc": 0.60}, 1),  # below 0.65, and still above the baseline's 0.55
        ({"gap": 0.19}, 2),
        ({"vis_auroc": 0.55}, 1),  # 0.55: below 0.65 and not above the baseline's 0.55 (index 4 too)
        ({"vis_ci": [0.54, 0.86]}, 4),  # 0.70 ≥ 0.65, but its ci95 reaches below the baseline's 0.55
    ],
)
def test_each_target_reports_not_met_with_its_numbers(tmp_path, change, failed):
    args = {"ece": 0.20, "ece_ci": [0.15, 0.25], "vis_auroc": 0.70, "gap": 0.25, "vis_ci": None}
    args.update(change)
    full = metrics(
        0.6,
        args["ece"],
        0.7,
        0.2,
        0.95,
        args["vis_auroc"],
        args["gap"],
        ece_ci=args["ece_ci"],
        vis_ci=args["vis_ci"],
    )
    s = build(stub_run(tmp_path, full, BASELINE), ScienceConfig(baseline="decoupled", svis_last_steps=2), [0])
    met = [t["met"] for t in s["targets"]]
    expected_failed = {failed} | ({4} if change.get("vis_auroc") == 0.55 else set())
    assert {i for i, m in enumerate(met) if not m} == expected_failed
    assert "full " in s["targets"][failed]["detail"]


def test_svis_window_and_missing_numbers_are_not_met(tmp_path):
    full = metrics(0.6, 0.2, 0.7, 0.2, 0.95, None, None, ece_ci=[0.15, 0.25])
    run = stub_run(tmp_path, full, BASELINE)
    s = build(run, ScienceConfig(baseline="decoupled", svis_last_steps=2, target_svis_auroc=0.9), [0])
    assert [t["met"] for t in s["targets"]] == [True, False, False, False, False]  # 8/9 < 0.9; n/a ≠ met
    assert "full n/a" in s["targets"][1]["detail"]
    rows = read_rows(run / "rl/full-seed0/rollouts")  # all three steps
    assert per_step_agreement(rows) == {1: 0.0, 2: 1.0, 3: 0.75}


def test_several_seeds_give_mean_and_sample_std(tmp_path):
    stub_run(tmp_path, GOOD_FULL, BASELINE, seed=0)
    other = metrics(0.6, 0.30, 0.70, 0.20, 0.95, 0.60, 0.25, ece_ci=[0.25, 0.35])
    stub_run(tmp_path, other, BASELINE, seed=1)
    s = build(tmp_path, ScienceConfig(baseline="decoupled", svis_last_steps=2), [0, 1])
    ece = s["rows"]["full"]["ECE"]
    assert ece["value"] == pytest.approx(0.25) and ece["std"] == pytest.approx(math.sqrt(0.005))
    assert s["targets"][0]["met"] is False  # seed 1's upper bound 0.35 is not below 0.30
    # seed 1's AUROC(c_v) 0.60 (no interval drawn) is above the baseline's 0.55, seed 0's ci95 [0.6, 0.8] too
    assert s["targets"][4]["met"] is True and "0.600 vs 0.550, 0.600 vs 0.550" in s["targets"][4]["detail"]


def test_without_a_baseline_arm_the_table_has_no_baseline_row_and_its_target_is_not_met(tmp_path):
    run = stub_run(tmp_path, GOOD_FULL, BASELINE)
    s = write_report(run, ScienceConfig(baseline="none", svis_last_steps=2), [0])
    assert set(s["rows"]) == {"warm_start", "full"} and set(s["per_seed"]) == {"full"}
    assert [t["met"] for t in s["targets"]] == [True, True, True, True, False]
    assert s["targets"][4]["detail"] == "no baseline arm (science.baseline: none)"
    assert not any(ln.startswith("| baseline") for ln in (run / "report.md").read_text().splitlines())


def test_above_the_baseline_needs_every_seed(tmp_path):
    """The mean may be above the baseline's while one seed is below it: not met (the fourth science run's
    case: 0.497 vs 0.496 on average, seed 0 below)."""
    stub_run(tmp_path, metrics(0.6, 0.2, 0.7, 0.2, 0.95, 0.56, 0.25, vis_ci=[0.555, 0.6]), BASELINE, seed=0)
    stub_run(tmp_path, metrics(0.6, 0.2, 0.7, 0.2, 0.95, 0.50, 0.25, vis_ci=[0.45, 0.55]), BASELINE, seed=1)
    stub_run(tmp_path, metrics(0.6, 0.2, 0.7, 0.2, 0.95, 0.60, 0.25, vis_ci=[0.56, 0.64]), BASELINE, seed=2)
    s = build(tmp_path, ScienceConfig(baseline="decoupled", svis_last_steps=2), [0, 1, 2])
    assert s["rows"]["full"]["AUROC(c_v, visual)"]["value"] == pytest.approx(0.5533, abs=1e-4)  # > 0.55
    assert s["targets"][4]["met"] is False
    assert s["rows"]["baseline"]["ECE"]["std"] == pytest.approx(0.0)


def test_warm_start_accuracy_per_attribute_and_question_type():
    acc = attribute_accuracy(GENERATIONS)
    assert {k: (v["n"], v["accuracy"]) for k, v in acc.items()} == {
        "attribute: colour": (2, 1.0),
        "attribute: shape": (3, pytest.approx(1 / 3)),
        "question: colour": (1, 1.0),
        "question: shape": (1, 0.0),
        "question: yes/no (colour)": (1, 1.0),
        "question: yes/no (shape)": (2, 0.5),
    }
    assert acc["question: colour"]["chance"] == 1 / 8 and acc["question: yes/no (shape)"]["chance"] == 0.5


def test_wilson_interval_matches_the_textbook_values():
    lo, hi = wilson_ci(0.9, 100)  # 90 of 100: [0.8256, 0.9448] (Wilson 1927; Newcombe 1998, table I)
    assert (round(lo, 4), round(hi, 4)) == (0.8256, 0.9448)
    assert wilson_ci(0.5, 0) is None


def test_rollout_rows_are_judged_from_the_vision_span():
    uid = "easy-vqa/test/0"
    from vlcal_verl.evaluation.visual_judge import uid_attributes

    colour, shape = uid_attributes(uid)
    wrong = "green" if colour != "green" else "red"
    texts = [
        f"<think><vision>A {colour} {shape}.</vision><reasoning>r</reasoning></think>",
        f"<think><vision>A {wrong} {shape}.</vision><reasoning>r</reasoning></think>",
        "<think><vision>Something.</vision><reasoning>r</reasoning></think>",
        "no protocol at all",
    ]
    rows = judged_rows(
        ["a", "b", "c", "d"],
        [uid, uid, uid, None],
        texts,
        [0.5, float("nan"), 0.1, 0.2],
        [0.9, None, 0.3, 0.1],
        7,
    )
    assert [r["visual_correct"] for r in rows] == [1, 0, None, None]
    assert [r["visual_judgment"] for r in rows] == ["correct", "wrong", "undescribed", None]
    assert [r["s_vis"] for r in rows] == [0.5, None, 0.1, 0.2] and rows[0]["step"] == 7


def _rlcr_generations() -> tuple[list[dict], float]:
    """An RLCR evaluation's records and the hand-computed AUROC of c for its judged think descriptions."""
    from vlcal_verl.evaluation.visual_judge import uid_attributes

    uids = [f"easy-vqa/test/{i}" for i in range(7)]
    truth = [uid_attributes(u) for u in uids]

    def other(c):
        return "green" if c != "green" else "red"

    def think(i, first, rest="So the answer is yes."):
        return f"<think>{first} {rest}</think>\n\\boxed{{yes}}\n<analysis>a</analysis>\n<confidence>5</confidence>"

    (c0, s0), (c1, s1), (c2, s2), (c3, s3), (c5, s5) = (truth[i] for i in (0, 1, 2, 3, 5))
    recs = [
        (uids[0], think(0, f"The image shows a {c0} {s0}."), 0.9),  # correct
        (uids[1], think(1, f"The image shows a {c1} {s1}."), 0.4),  # correct
        (uids[2], think(2, f"The image shows a {other(c2)} {s2}."), 0.6),  # wrong colour
        (uids[3], think(3, f"The image shows a {other(c3)} {s3}."), 0.2),  # wrong colour
        (uids[4], think(4, "The image shows something."), 0.99),  # undescribed: not judged
        # only the first sentence is z_vis: the second names a colour that is not there → still correct
        (uids[5], think(5, f"The image shows a {c5} {s5}.", f"A {other(c5)} shape is not there."), 0.7),
        (uids[6], "\\boxed{yes}<confidence>9</confidence>", 0.1),  # no <think>: not judged
    ]
    out = [{"uid": u, "response": r, "confidence": c, "unanswerable": False} for u, r, c in recs]
    out.append(
        {"uid": uids[0] + "#unanswerable", "response": recs[0][1], "confidence": 0.0, "unanswerable": True}
    )
    # positives {0.9, 0.4, 0.7}, negatives {0.6, 0.2}: 5 of 6 pairs ordered
    return out, 5 / 6


def test_rlcr_baseline_one_confidence_stands_in_for_c_v(tmp_path):
    """science.baseline=rlcr: the baseline's visual AUROC is its c against the judged first sentence of
    <think>, its no-image gap is c's; the warm start's RLCR-layout evaluation adds a row."""
    gens, auroc = _rlcr_generations()
    base = metrics(0.6, 0.22, 0.65, 0.21, 0.93, None, None)
    base["overall"]["no_image_gap"]["confidence"] = {"gap": 0.03, "ci95": [0.0, 0.06]}
    run = stub_run(tmp_path, GOOD_FULL, base)
    text = "".join(json.dumps(g) + "\n" for g in gens)
    (run / "eval/baseline-seed0/generations.jsonl").write_text(text, encoding="utf-8")
    _write(run / "eval/warm_start-rlcr/metrics.json", base)
    (run / "eval/warm_start-rlcr/generations.jsonl").write_text(text, encoding="utf-8")
    s = write_report(run, ScienceConfig(baseline="rlcr", svis_last_steps=2), [0])
    cells = s["rows"]["baseline"]
    assert cells["AUROC(c_v, visual)"]["value"] == pytest.approx(auroc)
    assert cells["no-image gap c_v"] == {"value": 0.03, "ci95": [0.0, 0.06]}
    assert s["rows"]["warm_start-rlcr"]["AUROC(c_v, visual)"]["value"] == pytest.approx(auroc)
    # full 0.70 is not above the baseline's 5/6
    assert s["targets"][-1]["met"] is False and "baseline 0.833" in s["targets"][-1]["detail"]
    md = (run / "report.md").read_text(encoding="utf-8")
    assert "| RLCR baseline (one confidence c for c_v) |" in md and "| warm start, RLCR layout" in md
