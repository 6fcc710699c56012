"""`vlcal score`: output keys and values, carried fields, and clear errors on malformed input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vlcal_verl.cli import main
from vlcal_verl.rewards import REWARD_COMPONENT_KEYS

GOOD = (
    "<think><vision>a</vision><reasoning>b</reasoning></think>\\boxed{{{ans}}}<analysis>c</analysis>"
    "<confidence><vision_confidence>{v}</vision_confidence><reasoning_confidence>{r}"
    "</reasoning_confidence></confidence>"
)


def write_jsonl(path, rows):
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_scores_and_carries_fields(tmp_path):
    rows = [
        {"response": GOOD.format(ans="4", v=10, r=10), "ground_truth": "4", "data_source": "toy", "uid": "a"},
        {"response": GOOD.format(ans="3", v=8, r=6), "ground_truth": 4, "data_source": "toy", "extra": [1]},
        {"response": "I think it is 4.", "ground_truth": "4", "data_source": "toy"},
        {
            "response": GOOD.format(ans="B", v=5, r=5),
            "ground_truth": "B",
            "data_source": "mc",
            "answer_kind": "multiple_choice",
        },
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, rows)
    assert main(["score", str(src), "-o", str(dst), "--workers", "2"]) == 0
    out = read_jsonl(dst)
    assert len(out) == 4
    for row, res in zip(rows, out, strict=True):
        assert all(k in res for k in REWARD_COMPONENT_KEYS)
        assert {k: res[k] for k in row} == row  # carried through unchanged
    # Φ=1, I=1: 1 + 0 + 0.4
    assert out[0]["score"] == pytest.approx(1.4) and out[0]["vision_confidence"] == 1.0
    # Φ=0.685714, I=0: −2·0.470204 + 0.4 = −0.540408
    assert out[1]["score"] == pytest.approx(-2 * (0.96 / 1.4) ** 2 + 0.4)
    assert out[1]["accuracy"] == 0.0 and out[1]["reasoning_confidence"] == 0.6
    # unparsed: nulls, brier −1, no boxed answer
    assert out[2]["vision_confidence"] is None and out[2]["reasoning_confidence"] is None
    assert out[2]["confidence"] is None and out[2]["parse_ok"] is False
    assert out[2]["grading_status"] == "no_answer" and out[2]["score"] == pytest.approx(-2.0)
    assert out[3]["accuracy"] == 1.0 and out[3]["confidence"] == pytest.approx(0.5)


def test_rlcr_and_parity_flags(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(
        src,
        [
            {
                "response": "<think>x</think>\\boxed{2}<analysis>y</analysis><confidence>7</confidence>",
                "ground_truth": "2",
                "data_source": "t",
            }
        ],
    )
    assert main(["score", str(src), "-o", str(dst), "--protocol", "rlcr"]) == 0
    assert read_jsonl(dst)[0]["score"] == pytest.approx(1.22)  # 1 − 2·0.09 + 0.4
    write_jsonl(
        src, [{"response": GOOD.format(ans="1 / 2", v="٨", r=6), "ground_truth": "1/2", "data_source": "t"}]
    )
    assert main(["score", str(src), "-o", str(dst), "--reference-parity"]) == 0
    res = read_jsonl(dst)[0]
    assert res["vision_confidence"] == 0.8 and res["accuracy"] == 1.0 and res["format"] == 1.0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: not valid JSON"),
        ('{"ground_truth": "1", "data_source": "x"}', "line 2: missing field 'response'"),
        ('{"response": "r", "data_source": "x"}', "line 2: missing field 'ground_truth'"),
        ('{"response": 5, "ground_truth": "1"}', "line 2: field 'response' must be a string, got int"),
        (
            '{"response": "r", "ground_truth": null}',
            "line 2: field 'ground_truth' must be a string or number",
        ),
        ('{"response": "r", "ground_truth": "1", "data_source": 3}', "line 2: field 'data_source' must be"),
        ('["a", "b"]', "line 2: expected a JSON object, got list"),
        (
            '{"response": "r", "ground_truth": "1", "answer_kind": "essay"}',
            "line 2: field 'answer_kind' must be",
        ),
    ],
)
def test_malformed_input_names_line_and_field(tmp_path, capsys, line, message):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"response": "r", "ground_truth": "1", "data_source": "x"}, line])
    assert main(["score", str(src), "-o", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o.jsonl").exists()


def test_missing_file_and_bad_options(tmp_path, capsys):
    assert main(["score", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"response": "r", "ground_truth": "1"}])
    assert main(["score", str(src), "-o", str(tmp_path / "o.jsonl"), "--timeout", "0"]) == 2
    assert "--timeout" in capsys.readouterr().err


def test_console_script_exit_code(tmp_path):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, ['{"response": 1, "ground_truth": "1"}'])
    proc = subprocess.run(
        [sys.executable, "-m", "vlcal_verl.cli", "score", str(src), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "line 1: field 'response'" in proc.stderr and "Traceback" not in proc.stderr


def one_good_row(tmp_path):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"response": GOOD.format(ans="4", v=10, r=10), "ground_truth": "4"}])
    return src


@pytest.mark.parametrize("flag", ["--w-brier", "--w-fmt", "--timeout"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_options_are_refused(tmp_path, capsys, flag, value):
    src, dst = one_good_row(tmp_path), tmp_path / "o.jsonl"
    assert main(["score", str(src), "-o", str(dst), f"{flag}={value}"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"vlcal score: {flag} must be a finite number, got {float(value)}"
    assert not dst.exists()


def test_nan_in_the_input_is_refused_with_its_line(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, ['{"response": "r", "ground_truth": "1", "extra": NaN}'])
    assert main(["score", str(src), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "line 1: NaN is not valid JSON" in capsys.readouterr().err


def test_bad_output_paths_are_refused_before_grading(tmp_path, capsys, monkeypatch):
    import vlcal_verl.rewards

    def no_grading(*args, **kwargs):
        raise AssertionError("graded although the output path is unusable")

    monkeypatch.setattr(vlcal_verl.rewards, "score_many", no_grading)
    src = one_good_row(tmp_path)
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    cases = [
        (tmp_path / "no" / "such" / "o.jsonl", "does not exist (create it: mkdir -p"),
        (tmp_path, "is a folder; give a file path"),
        (a_file / "o.jsonl", "is not a folder"),
    ]
    for dst, message in cases:
        assert main(["score", str(src), "-o", str(dst)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "plain.txt"]


def test_output_is_written_atomically(tmp_path):
    from vlcal_verl.commands.score import write_jsonl_atomic

    dst = tmp_path / "o.jsonl"
    dst.write_text("previous run\n")

    def rows():
        yield {"a": 1}
        raise KeyboardInterrupt  # interrupted midway

    with pytest.raises(KeyboardInterrupt):
        write_jsonl_atomic(dst, rows())
    assert dst.read_text() == "previous run\n"
    assert [p.name for p in tmp_path.iterdir()] == ["o.jsonl"]  # no temporary file left behind
    write_jsonl_atomic(dst, [{"a": 1}, {"b": "é"}])
    assert read_jsonl(dst) == [{"a": 1}, {"b": "é"}]
    assert dst.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


RLCR = "<think>x</think>\\boxed{{{ans}}}<analysis>y</analysis><confidence>{c}</confidence>"


def test_authors_rlcr_reward_is_scored_as_training_scores_it(tmp_path):
    """--protocol rlcr --reference-parity: the authors' RLCR rule that training's ablation=rlcr uses in
    parity mode (its w_brier is 0.8), through the same function (compute_score → score_response)."""
    from vlcal_verl.rewards import compute_score

    rows = [
        {"response": RLCR.format(ans="2", c="7"), "ground_truth": "2", "data_source": "t"},
        {"response": RLCR.format(ans="3", c="10"), "ground_truth": "2", "data_source": "t"},
        {"response": "\\boxed{2}", "ground_truth": 2, "data_source": "t"},  # no confidence: c = 0.5
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, rows)
    argv = ["score", str(src), "-o", str(dst), "--protocol", "rlcr", "--reference-parity", "--w-brier", "0.8"]
    assert main(argv) == 0
    out = read_jsonl(dst)
    c = 0.7**1.3  # their (c/10)^1.3
    assert out[0]["confidence"] == pytest.approx(c) and out[0]["format"] == 1.0
    assert out[0]["score"] == pytest.approx(1 - 0.8 * (1 - c) ** 2 + 0.4)
    assert out[1]["score"] == pytest.approx(0 - 0.8 * 1.0 + 0.4)  # c = 1, wrong
    assert out[2]["confidence"] == 0.5 and out[2]["parse_ok"] is False and out[2]["format"] == 0.0
    assert out[2]["score"] == pytest.approx(1 - 0.8 * 0.25)
    kwargs = {"protocol": "rlcr", "reference_parity": True, "w_brier": 0.8}
    for row, res in zip(rows, out, strict=True):
        want = compute_score(row["data_source"], row["response"], str(row["ground_truth"]), **kwargs)
        assert {k: res[k] for k in REWARD_COMPONENT_KEYS} == pytest.approx(want)
    assert main(["score", str(src), "-o", str(dst), "--protocol", "rlcr", "--w-brier", "0.8"]) == 0
    assert read_jsonl(dst)[0]["confidence"] == pytest.approx(0.7)  # ours: linear, not their power


def test_latin1_input_is_one_line_and_a_bom_is_read(tmp_path, capsys):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = json.dumps({"response": GOOD.format(ans="4", v=10, r=10), "ground_truth": "4"}).encode()
    src.write_bytes(good + b"\n" + b'{"response": "caf\xe9", "ground_truth": "4"}\n')
    assert main(["score", str(src), "-o", str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 2: not UTF-8 (byte 0xe9" in err and "Traceback" not in err
    assert not dst.exists()
    src.write_bytes(b"\xef\xbb\xbf" + good + b"\n")
    assert main(["score", str(src), "-o", str(dst)]) == 0
    assert read_jsonl(dst)[0]["score"] == pytest.approx(1.4)


def test_duplicate_uids_are_scored_and_warned_about(tmp_path, capsys):
    row = {"response": GOOD.format(ans="4", v=10, r=10), "ground_truth": "4", "uid": "u7"}
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [row, {**row, "uid": "u8"}, row, row])
    assert main(["score", str(src), "-o", str(dst)]) == 0
    assert len(read_jsonl(dst)) == 4
    err = capsys.readouterr().err
    assert "vlcal score: warning: 2 line(s)" in err and "'u7'" in err
