"""``vlcal eval``: scoring existing generations (fast), and generating with the tiny offline model (slow)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlcal_verl.cli import main

GOOD = (
    "<think><vision>a red circle</vision><reasoning>so yes</reasoning></think>\n\\boxed{yes}\n"
    "<analysis>clear</analysis>\n<confidence><vision_confidence>8</vision_confidence>"
    "<reasoning_confidence>9</reasoning_confidence></confidence>"
)


def _gens(path):
    rows = [
        {"benchmark": "b", "uid": "1", "response": GOOD, "ground_truth": "yes", "answer_kind": "yes_no"},
        {"benchmark": "b", "uid": "2", "response": GOOD, "ground_truth": "no", "answer_kind": "yes_no"},
        {"benchmark": "b", "uid": "3", "response": "no idea", "ground_truth": "no", "answer_kind": "yes_no"},
        {
            "benchmark": "b-unanswerable",
            "uid": "1u",
            "response": GOOD,
            "ground_truth": "yes",
            "unanswerable": True,
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _check_report(out):
    for name in ("metrics.json", "report.md", "report.html"):
        assert (out / name).stat().st_size > 100
    pngs = sorted(out.glob("*.png"))
    assert pngs
    for p in pngs:
        with Image.open(p) as im:
            assert im.size[0] > 200 and len(set(im.convert("L").getdata())) > 8  # not a blank canvas
    return json.loads((out / "metrics.json").read_text())


def test_eval_generations_file(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["eval", "--generations", str(_gens(tmp_path / "g.jsonl")), "--out", str(out)]) == 0
    m = _check_report(out)
    o = m["overall"]
    # Φ = 2·0.8·0.9/1.7 for the two parsed rows, unparsed counts 0; one of three correct
    assert o["n"] == 3 and o["accuracy"] == pytest.approx(1 / 3)
    assert o["parse_rate"] == pytest.approx(2 / 3)
    phi = 2 * 0.8 * 0.9 / 1.7
    assert o["mean_conf"] == pytest.approx(2 * phi / 3)
    assert o["unanswerable_gap"] == pytest.approx(2 * phi / 3 - phi)  # mean Φ answerable − unanswerable
    assert "b" in (out / "report.md").read_text()


def test_eval_generations_bad_row_names_field(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"response": "x"}) + "\n")
    assert main(["eval", "--generations", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "'ground_truth'" in capsys.readouterr().err


def test_eval_unknown_bench_says_how_to_prepare(tmp_path, capsys):
    rc = main(
        [
            "eval",
            "--model",
            "tiny:qwen3-vl",
            "--bench",
            "mathvista",
            "--data-dir",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "vlcal data bench" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_tiny_model_easy_vqa_with_gap(tmp_path):
    out = tmp_path / "rep"
    args = [
        "eval",
        "--model",
        "tiny:qwen3-vl",
        "--bench",
        "easy-vqa,easy-vqa-unanswerable",
        "--limit",
        "16",
        "--max-new-tokens",
        "16",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    m = _check_report(out)
    assert m["overall"]["n"] == 16
    assert (out / "generations.jsonl").read_text().count("\n") == 32
    o = m["overall"]
    assert o["unanswerable"]["n"] == 16
    assert o["unanswerable_gap"] == pytest.approx(o["mean_conf"] - o["unanswerable"]["mean_conf"])


def test_eval_bench_all_needs_prepared_files(tmp_path, capsys):
    rc = main(
        [
            "eval",
            "--model",
            "tiny:qwen3-vl",
            "--bench",
            "all",
            "--data-dir",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "no NAME.parquet" in capsys.readouterr().err


def test_load_bench_items_round_trip(tmp_path):
    from vlcal_verl.data.benchmarks import benchmark_rows
    from vlcal_verl.data.schema import write_parquet
    from vlcal_verl.evaluation.generate import load_bench_items

    write_parquet(benchmark_rows("easy-vqa-unanswerable", limit=3), tmp_path / "x.parquet")
    items = load_bench_items(tmp_path / "x.parquet", limit=2)
    assert len(items) == 2 and items[0].unanswerable and items[0].images[0].size == (64, 64)
    assert "\\boxed" not in items[0].question  # the bare question; instructions are added at generation
