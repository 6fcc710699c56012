"""``vlcal eval`` writes the exact visual judge's ``visual_correct`` per easy-vqa item and reports it."""

from __future__ import annotations

import json

import pytest

from vlcal_verl.cli import main
from vlcal_verl.evaluation.visual_judge import COLOURS, judge_description, uid_attributes
from vlcal_verl.protocol import parse_response


def _response(vision: str, c_v: int) -> str:
    return (
        f"<think><vision>{vision}</vision><reasoning>so</reasoning></think>\n\\boxed{{yes}}\n"
        f"<analysis>a</analysis>\n<confidence><vision_confidence>{c_v}</vision_confidence>"
        "<reasoning_confidence>6</reasoning_confidence></confidence>"
    )


def _records(out):
    return [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]


def test_generations_file_gets_visual_correct_and_the_report_its_auroc(tmp_path):
    """Hand-made responses about real easy-vqa items: 2 right with high c_v, 2 wrong with low c_v."""
    rows, expected = [], []
    for k, row in enumerate((0, 1, 2, 3, 4, 5)):
        uid = f"easy-vqa/test/{row}"
        colour, shape = uid_attributes(uid)
        other = next(c for c in COLOURS if c != colour)
        vision, cv, want = [
            (f"a {colour} {shape}", 9, 1),
            (f"a {colour} {shape}", 7, 1),
            (f"a {other} {shape}", 3, 0),
            (f"a {colour} {shape} and a {other} one", 2, 0),
            ("something", 8, None),
            (f"not {colour}", 8, None),
        ][k]
        rows.append(
            {"benchmark": "easy-vqa", "uid": uid, "response": _response(vision, cv), "ground_truth": "yes"}
        )
        expected.append(want)
    rows.append(  # its blank twin, and an item of another benchmark
        {
            "benchmark": "easy-vqa-unanswerable",
            "uid": "easy-vqa/test/0#unanswerable",
            "unanswerable": True,
            "response": _response("a red circle", 1),
            "ground_truth": "yes",
        }
    )
    rows.append(
        {"benchmark": "b", "uid": "b/1", "response": _response("a red circle", 5), "ground_truth": "yes"}
    )
    gens = tmp_path / "g.jsonl"
    gens.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rep"
    assert main(["eval", "--generations", str(gens), "--out", str(out), "--n-boot", "200"]) == 0
    recs = _records(out)
    assert [r["visual_correct"] for r in recs[:6]] == expected
    assert recs[6]["visual_correct"] is None and recs[6]["visual_judgment"] == "blank_image"
    assert "visual_correct" not in recs[7]
    m = json.loads((out / "metrics.json").read_text())
    v = m["per_benchmark"]["easy-vqa"]["visual"]
    assert (v["n_items"], v["n_judged"], v["n_correct"], v["n_undescribed"]) == (6, 4, 2, 2)
    assert v["c_v"]["auroc"] == pytest.approx(1.0)  # c_v 0.9, 0.7 vs 0.3, 0.2
    gap = m["per_benchmark"]["easy-vqa"]["no_image_gap"]
    assert not gap["paired"]  # one twin for six items
    assert gap["vision_confidence"]["gap"] == pytest.approx((9 + 7 + 3 + 2 + 8 + 8) / 60 - 0.1)
    assert "AUROC(c_v, visual)" in (out / "report.md").read_text()
    # scoring the written generations again gives the same judgments
    again = tmp_path / "rep2"
    assert (
        main(["eval", "--generations", str(out / "generations.jsonl"), "--out", str(again), "--n-boot", "0"])
        == 0
    )
    assert [r.get("visual_correct", "-") for r in _records(again)] == [
        r.get("visual_correct", "-") for r in recs
    ]


@pytest.mark.slow
def test_tiny_model_eval_writes_visual_correct(tmp_path):
    """The real CLI on the tiny random Qwen3-VL: every easy-vqa record carries the judge's fields and
    they are what the judge says of the record's own vision span."""
    out = tmp_path / "rep"
    bench = "easy-vqa,easy-vqa-unanswerable"
    assert (
        main(["eval", "--model", "tiny:qwen3-vl", "--bench", bench, "--limit", "4", "--out", str(out)]) == 0
    )
    recs = _records(out)
    assert len(recs) == 8
    for r in recs:
        assert "visual_correct" in r and "visual_judgment" in r
        if r["unanswerable"]:
            assert (r["visual_correct"], r["visual_judgment"]) == (None, "blank_image")
            continue
        j = judge_description(parse_response(r["response"]).vision, *uid_attributes(r["uid"]))
        assert (r["visual_correct"], r["visual_judgment"]) == (j.visual_correct, j.status)
    v = json.loads((out / "metrics.json").read_text())["overall"]["visual"]
    assert v["n_items"] == 4 and v["n_judged"] == sum(r["visual_correct"] is not None for r in recs)
