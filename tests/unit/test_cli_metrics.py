"""``vlcal metrics``: JSON/table output, key options, null confidences, plots, and malformed input."""

from __future__ import annotations

import json

import pytest

from vlcal_verl.cli import main


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _run_json(capsys, *argv):
    assert main(["metrics", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_output_hand_computed(tmp_path, capsys):
    path = _write(
        tmp_path / "in.jsonl",
        [
            {"confidence": 0.9, "correct": True, "extra": "ignored"},
            {"confidence": 0.8, "correct": False},
            "",
            {"confidence": 0.3, "correct": 1},
            {"confidence": 0.0, "correct": 0},
        ],
    )
    out = _run_json(capsys, path)
    assert out["n"] == 4 and out["accuracy"] == 0.5
    # bins: 9 {0.9 ✓}: 0.1; 8 {0.8 ✗}: 0.8; 3 {0.3 ✓}: 0.7; 0 {0.0 ✗}: 0 → mean 0.4
    assert out["ece"] == pytest.approx(0.4)
    assert out["brier"] == pytest.approx((0.01 + 0.64 + 0.49 + 0) / 4)
    assert out["auroc"] == pytest.approx(0.75)  # pairs (0.9>0.8, 0.9>0, 0.3<0.8, 0.3>0) → 3/4
    # risk–coverage: 0.25 → 0, 0.5 → 1/2, 0.75 → 1/3, 1.0 → 1/2
    assert out["aurc"] == pytest.approx(0.25 * (0 + 0.5 + 1 / 3 + 0.5))
    assert out["parse_rate"] == 1.0


def test_null_confidence_counts_as_zero_and_lowers_parse_rate(tmp_path, capsys):
    path = _write(
        tmp_path / "in.jsonl",
        [
            {"confidence": None, "accuracy": 0.0},
            {"confidence": 1.0, "accuracy": 1.0},
            {"confidence": 0.5, "correct": 1, "parse_ok": False},
        ],
    )
    out = _run_json(capsys, path)
    assert out["n"] == 3 and out["parse_rate"] == pytest.approx(1 / 3)
    assert out["mean_conf"] == pytest.approx(0.5)


def test_custom_keys_table_and_plot(tmp_path, capsys):
    path = _write(tmp_path / "in.jsonl", [{"phi": i / 10, "ok": i % 2 == 0} for i in range(11)])
    plot = tmp_path / "rel.png"
    assert (
        main(["metrics", str(path), "--confidence-key", "phi", "--correct-key", "ok", "--plot", str(plot)])
        == 0
    )
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["n", "11"]
    assert {"accuracy", "ece", "auroc", "brier", "aurc"} <= {line.split()[0] for line in table.splitlines()}
    assert plot.stat().st_size > 10_000


def test_single_class_reports_auroc_as_null(tmp_path, capsys):
    out = _run_json(capsys, _write(tmp_path / "in.jsonl", [{"confidence": 0.7, "correct": True}] * 3))
    assert out["auroc"] is None and "auroc_note" in out


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"confidence": 0.5, "correct": true}', "{not json"], "line 2: not valid JSON"),
        (['{"correct": true}'], "line 1: missing field 'confidence'"),
        (['{"confidence": 0.5}'], "line 1: missing field 'correct'"),
        (['{"confidence": 7, "correct": true}'], "line 1: field 'confidence' = 7 is outside [0, 1]"),
        (['{"confidence": "high", "correct": true}'], "line 1: field 'confidence' must be a number"),
        (['{"confidence": 0.5, "correct": "yes"}'], "line 1: field 'correct' must be true/false or 0/1"),
        (['{"confidence": 0.5, "accuracy": 0.4}'], "line 1: field 'accuracy' must be true/false or 0/1"),
        (["[0.5, true]"], "line 1: expected a JSON object"),
        ([""], "no records"),
    ],
)
def test_malformed_input_exits_2_naming_line_and_field(tmp_path, capsys, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert main(["metrics", str(path), "--json"]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_missing_file_exits_2(tmp_path, capsys):
    assert main(["metrics", str(tmp_path / "nope.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


GOOD_LINES = [{"confidence": 0.9, "correct": True}, {"confidence": 0.2, "correct": False}]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("r.txt", "extension .txt is not an image format matplotlib writes; use one of"),
        ("r", "no extension is not an image format"),
        ("sub", "is a folder; give a file path"),
        ("one.png/sub.png", "one.png is a file, not a folder"),
        ("one.png/deeper/sub.png", "one.png is a file, not a folder"),
    ],
)
def test_unwritable_plot_is_refused_before_any_work(tmp_path, capsys, name, message):
    (tmp_path / "sub").mkdir()
    (tmp_path / "one.png").write_bytes(b"an earlier plot")
    path = _write(tmp_path / "in.jsonl", GOOD_LINES)
    assert main(["metrics", str(path), "--plot", str(tmp_path / name)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert message in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "one.png", "sub"]


def test_latin1_input_is_one_line_naming_the_line_and_a_bom_is_read(tmp_path, capsys):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(
        b'{"confidence": 0.9, "correct": true}\n{"confidence": 0.2, "correct": false, "q": "caf\xe9"}\n'
    )
    assert main(["metrics", str(latin1)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 2: not UTF-8 (byte 0xe9" in err and "iconv" in err, err
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + _write(tmp_path / "plain.jsonl", GOOD_LINES).read_bytes())
    assert _run_json(capsys, bom)["n"] == 2


def test_duplicate_uids_are_counted_and_warned_about(tmp_path, capsys):
    """A file concatenated twice doubles every item: the metrics count each line (GRPO rollouts share a
    prompt uid legitimately) and stderr says how many lines repeat a (benchmark, uid)."""
    rows = [
        {"uid": "a", "benchmark": "b", "confidence": 0.9, "correct": True},
        {"uid": "b", "benchmark": "b", "confidence": 0.2, "correct": False},
        {"uid": "a", "benchmark": "other", "confidence": 0.9, "correct": True},  # another benchmark's a
    ]
    path = _write(tmp_path / "twice.jsonl", rows + rows[:2])
    assert main(["metrics", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n"] == 5
    assert "warning: 2 line(s)" in captured.err and "'a'" in captured.err
    assert main(["metrics", str(_write(tmp_path / "once.jsonl", rows)), "--json"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_plot_format_follows_the_extension(tmp_path, capsys):
    path = _write(tmp_path / "in.jsonl", GOOD_LINES)
    assert main(["metrics", str(path), "--plot", str(tmp_path / "r.SVG")]) == 0
    assert (tmp_path / "r.SVG").read_text().lstrip().startswith("<?xml")
    assert main(["metrics", str(path), "--plot", str(tmp_path / "r.pdf")]) == 0
    assert (tmp_path / "r.pdf").read_bytes().startswith(b"%PDF")


@pytest.mark.parametrize("n_bins", [0, -3, 1001, 1_000_000])
def test_n_bins_outside_1_to_1000_is_refused(tmp_path, capsys, n_bins):
    path = _write(tmp_path / "in.jsonl", GOOD_LINES)
    assert main(["metrics", str(path), "--n-bins", str(n_bins)]) == 2
    assert (
        capsys.readouterr().err.strip() == f"vlcal metrics: error: --n-bins must be in 1..1000, got {n_bins}"
    )


def test_n_bins_1000_is_allowed_and_said_in_help(tmp_path, capsys):
    path = _write(tmp_path / "in.jsonl", GOOD_LINES)
    out = _run_json(capsys, path, "--n-bins", "1000")
    assert out["ece"] == pytest.approx((0.1 + 0.2) / 2)  # each answer alone in its bin
    with pytest.raises(SystemExit):
        main(["metrics", "--help"])
    assert "1..1000" in capsys.readouterr().out
