"""Each benchmark adapter on a few rows written in its source's real (hub) format, small generated PNGs."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from vlcal_verl.data.benchmarks import NAMES, REGISTRY, benchmark_rows
from vlcal_verl.data.schema import ANSWER_KINDS, read_parquet, validate_rows, write_parquet


def _png(color=(200, 30, 30), size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _img():
    return {"bytes": _png(), "path": None}


# name -> (raw records in the hub's field names, expected [(answer, kind)])
FIXTURES = {
    "mathvista": (
        [
            {
                "pid": "1",
                "question": "Which is bigger?",
                "choices": ["3", "5"],
                "answer": "5",
                "question_type": "multi_choice",
                "decoded_image": _img(),
                "metadata": {"category": "math-targeted-vqa"},
            },
            {
                "pid": "2",
                "question": "Length?",
                "choices": None,
                "answer": "1.5",
                "question_type": "free_form",
                "image": "images/2.png",
            },
        ],
        [("B", "multiple_choice"), ("1.5", "math")],
    ),
    "mathverse": (
        [
            {
                "sample_index": "1",
                "question": "q",
                "query_cot": "Find x. Choices: A:1 B:2",
                "answer": "B",
                "question_type": "multi-choice",
                "problem_version": "Vision Intensive",
                "image": _img(),
            },
            {
                "sample_index": "2",
                "question": "t",
                "answer": "3",
                "question_type": "free-form",
                "problem_version": "Text Only",
                "image": _img(),
            },
        ],
        [("B", "multiple_choice")],
    ),
    "mathvision": (
        [
            {
                "id": "1",
                "question": "Which?",
                "options": ["1", "2", "3"],
                "answer": "C",
                "decoded_image": _img(),
                "subject": "arithmetic",
            },
            {"id": "2", "question": "How many?", "options": [], "answer": "7", "decoded_image": _img()},
        ],
        [("C", "multiple_choice"), ("7", "math")],
    ),
    "wemath": (
        [
            {
                "ID": "1",
                "question": "Area?",
                "option": "A. 1; B. 2",
                "answer": "A",
                "image_path": _img(),
                "knowledge concept": "area",
            }
        ],
        [("A", "multiple_choice")],
    ),
    "dynamath": (
        [
            {
                "id": "1",
                "question": "Value?",
                "ground_truth": "2.5",
                "answer_type": "float",
                "decoded_image": _img(),
            },
            {
                "id": "2",
                "question": "Pick",
                "ground_truth": "D",
                "answer_type": "multiple choice",
                "decoded_image": _img(),
            },
        ],
        [("2.5", "math"), ("D", "multiple_choice")],
    ),
    "logicvista": (
        [{"question": "Which?", "answer": "A", "image": _img(), "skill": "inductive"}],
        [("A", "multiple_choice")],
    ),
    "mmmu": (
        [
            {
                "id": "v_1",
                "question": "See <image 1> and <image 2>.",
                "options": "['x', 'y']",
                "answer": "B",
                "question_type": "multiple-choice",
                "image_1": _img(),
                "image_2": _img(),
                "image_3": None,
                "subfield": "s",
            },
            {
                "id": "v_2",
                "question": "Value?",
                "options": "[]",
                "answer": "12",
                "question_type": "open",
                "image_1": _img(),
            },
        ],
        [("B", "multiple_choice"), ("12", "math")],
    ),
    "mmmu-pro": (
        [
            {
                "id": "p_1",
                "question": "<image 1> which?",
                "options": str([f"o{i}" for i in range(10)]),
                "answer": "J",
                "image_1": _img(),
                "subject": "Art",
            }
        ],
        [("J", "multiple_choice")],
    ),
    "mmstar": (
        [
            {
                "index": 0,
                "question": "What? Options: A: x, B: y",
                "answer": "A",
                "image": _img(),
                "category": "coarse perception",
            }
        ],
        [("A", "multiple_choice")],
    ),
    "a-okvqa": (
        [
            {
                "question_id": "q1",
                "question": "What is it?",
                "choices": ["cat", "dog", "cow", "pig"],
                "correct_choice_idx": 2,
                "direct_answers": ["cow"] * 10,
                "image": _img(),
            }
        ],
        [("C", "multiple_choice")],
    ),
    "scienceqa-img": (
        [
            {
                "question": "Which?",
                "choices": ["a", "b"],
                "answer": 1,
                "hint": "h",
                "image": _img(),
                "subject": "natural science",
            },
            {"question": "No image", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None},
        ],
        [("B", "multiple_choice")],
    ),
    "hallusionbench": (
        [
            {
                "question_id": "1",
                "question": "Is it red?",
                "gt_answer": "1",
                "image": _img(),
                "category": "VS",
            },
            {
                "question_id": "2",
                "question": "Is it blue?",
                "gt_answer": "0",
                "image": _img(),
                "category": "VS",
            },
            {"question_id": "3", "question": "Text only?", "gt_answer": "0", "image": None, "filename": None},
        ],
        [("yes", "yes_no"), ("no", "yes_no")],
    ),
}


def test_every_registered_benchmark_has_a_fixture():
    assert set(FIXTURES) == set(REGISTRY)
    assert {"easy-vqa", "easy-vqa-unanswerable"} <= set(NAMES)


def _write_source(tmp_path, records):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "2.png").write_bytes(_png((0, 0, 255)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = sorted({k for r in records for k in r})  # from_pylist takes the first row's keys only
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in records]), path)
    return tmp_path


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_adapter_rows_follow_schema(tmp_path, name):
    records, expected = FIXTURES[name]
    rows = benchmark_rows(name, _write_source(tmp_path, records))
    validate_rows(rows)
    assert [(r["reward_model"]["ground_truth"], r["extra_info"]["answer_kind"]) for r in rows] == expected
    for r in rows:
        assert r["data_source"] == name and r["extra_info"]["answer_kind"] in ANSWER_KINDS
        assert r["prompt"][0]["content"].count("<image>") == len(r["images"]) >= 1
    sha = write_parquet(rows, tmp_path / "out.parquet")
    assert len(sha) == 64 and len(read_parquet(tmp_path / "out.parquet")) == len(rows)


def test_mmmu_keeps_every_image_and_mc_options(tmp_path):
    rows = benchmark_rows("mmmu", _write_source(tmp_path, FIXTURES["mmmu"][0]))
    assert len(rows[0]["images"]) == 2
    assert "A. x\nB. y" in rows[0]["extra_info"]["question"]


def test_unanswerable_variant_blanks_images_keeps_size(tmp_path):
    src = _write_source(tmp_path, FIXTURES["hallusionbench"][0])
    rows = benchmark_rows("hallusionbench", src, unanswerable=True)
    assert rows[0]["data_source"] == "hallusionbench-unanswerable" and rows[0]["extra_info"]["unanswerable"]
    im = Image.open(io.BytesIO(rows[0]["images"][0]["bytes"]))
    assert im.size == (24, 16) and im.getextrema() == ((255, 255), (255, 255), (255, 255))


def test_missing_image_file_names_field_and_path(tmp_path):
    rec = [
        {"pid": "9", "question": "q", "answer": "1", "question_type": "free_form", "image": "images/nope.png"}
    ]
    (tmp_path / "d.jsonl").write_text(json.dumps(rec[0]) + "\n")
    with pytest.raises(ValueError, match=r"mathvista record 0: .*'image'.*nope.png"):
        benchmark_rows("mathvista", tmp_path)


def test_unknown_benchmark_lists_names():
    with pytest.raises(ValueError, match="available: mathvista"):
        benchmark_rows("nope")


def test_easy_vqa_offline_rows():
    rows = benchmark_rows("easy-vqa-unanswerable", limit=4, seed=1)
    validate_rows(rows)
    assert all(r["extra_info"]["unanswerable"] for r in rows)
    answerable = [r["extra_info"]["uid"] for r in benchmark_rows("easy-vqa", limit=4, seed=1)]
    # same items in the same order, told apart by the uid suffix (judgments and reports key on uids)
    assert [r["extra_info"]["uid"] for r in rows] == [u + "#unanswerable" for u in answerable]
    assert not set(answerable) & {r["extra_info"]["uid"] for r in rows}


def test_cli_bench_easy_vqa_writes_parquet_and_manifest(tmp_path):
    from vlcal_verl.cli import main

    assert main(["data", "bench", "easy-vqa", "--limit", "3", "--unanswerable", "--out", str(tmp_path)]) == 0
    rows = read_parquet(tmp_path / "easy-vqa-unanswerable.parquet")
    validate_rows(rows)
    m = json.loads((tmp_path / "easy-vqa-unanswerable.manifest.json").read_text())
    assert m["rows"] == 3 == sum(m["answer_kinds"].values())


@pytest.mark.parametrize(
    ("query_cot", "question"),
    [
        (
            "Please first conduct reasoning, and then answer the question and provide the correct option "
            "letter, e.g., A, B, C, D, at the end.\nQuestion: Find x.\nChoices:\nA:1\nB:2",
            "Find x.\nChoices:\nA:1\nB:2",
        ),
        (
            "Please first conduct reasoning, and then answer the question and provide the final value, "
            "e.g., 1, 2.5, 300, at the end.\nQuestion: How long is AB?",
            "How long is AB?",
        ),
        (
            "According to the question shown in the image, please first conduct reasoning, and then answer "
            "the question and provide the final value, e.g., The answer is xxx",
            "Answer the question shown in the image.",
        ),
        ("Find x without any instruction.", "Find x without any instruction."),
    ],
)
def test_mathverse_drops_its_answer_format_instruction(query_cot, question):
    """MathVerse's query_cot asks for 'the final value at the end'; the protocol asks for \\boxed{} and
    confidences, so the dataset's instruction is removed and only the question is kept."""
    from vlcal_verl.data.benchmarks import REGISTRY

    rec = {"query_cot": query_cot, "question": "q", "answer": "1", "image": _img()}
    got, *_ = REGISTRY["mathverse"].convert(rec, None)
    assert got == question
    assert "conduct reasoning" not in build_prompt_text(got)


def build_prompt_text(question: str) -> str:
    from vlcal_verl.protocol import build_prompt

    return build_prompt(question).split("\n\nFirst think")[0]
