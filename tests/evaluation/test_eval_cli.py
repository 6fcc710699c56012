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


def _bench_rows(benchmark, uids):
    return [{"benchmark": benchmark, "uid": u, "response": GOOD, "ground_truth": "yes"} for u in uids]


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_finished_report_is_refused_unless_overwrite(tmp_path, capsys):
    """--out holding a report: one line, exit 2, nothing touched; --overwrite replaces the report and
    drops the earlier run's per-benchmark figures, keeping files that are not the report's."""
    out = tmp_path / "rep"
    first = _write_rows(tmp_path / "a.jsonl", _bench_rows("x1", "12") + _bench_rows("x2", "34"))
    assert main(["eval", "--generations", str(first), "--out", str(out), "--n-boot", "0"]) == 0
    assert (out / "reliability_x1.png").is_file()
    (out / "visual_judgments.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    second = _write_rows(tmp_path / "b.jsonl", _bench_rows("y1", "56") + _bench_rows("y2", "78"))
    argv = ["eval", "--generations", str(second), "--out", str(out), "--n-boot", "0"]
    assert main(argv) == 2
    err = _one_line_error(capsys, "already holds a report", "metrics.json", "--overwrite")
    assert str(out) in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["eval", "--generations", str(second), "--out", str(other)]) == 2
    _one_line_error(capsys, "is not empty", "--overwrite")
    assert main([*argv, "--overwrite"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"reliability_y1.png", "reliability_y2.png", "visual_judgments.json"} <= names
    assert not {"reliability_x1.png", "reliability_x2.png"} & names
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert {r["benchmark"] for r in rows} == {"y1", "y2"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", "--generations", str(second), "--out", str(empty), "--n-boot", "0"]) == 0


def test_generations_encoding_numbers_and_duplicates(tmp_path, capsys):
    """Latin-1 is one line naming the line; a byte-order mark is read; a numeric ground truth is taken as
    `vlcal score` takes it; repeated uids are counted with a warning naming how many."""
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(
        json.dumps(_bench_rows("b", "1")[0]).encode() + b'\n{"response": "caf\xe9", "ground_truth": "1"}\n'
    )
    assert main(["eval", "--generations", str(latin1), "--out", str(tmp_path / "o1")]) == 2
    _one_line_error(capsys, "line 2: not UTF-8 (byte 0xe9")
    assert not (tmp_path / "o1").exists()
    numeric = [
        {"uid": "n1", "response": GOOD.replace("{yes}", "{12}"), "ground_truth": 12},
        {"uid": "n2", "response": GOOD.replace("{yes}", "{0.5}"), "ground_truth": 0.25},
        {"uid": "n1", "response": GOOD.replace("{yes}", "{12}"), "ground_truth": 12},
    ]
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _write_rows(tmp_path / "n.jsonl", numeric).read_bytes())
    out = tmp_path / "o2"
    assert main(["eval", "--generations", str(path), "--out", str(out), "--n-boot", "0"]) == 0
    assert "vlcal eval: warning: 1 line(s)" in capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [(r["ground_truth"], r["correct"]) for r in rows] == [("12", True), ("0.25", False), ("12", True)]
    for bad in (True, None, [1]):
        _write_rows(tmp_path / "bad.jsonl", [{"response": GOOD, "ground_truth": bad}])
        assert (
            main(["eval", "--generations", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o3")]) == 2
        )
        _one_line_error(capsys, "'ground_truth' missing or not a string or number")


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
    # the gap recomputed from the generations: Φ = 2·c_v·c_r/(c_v + c_r) of each parsed response (0 when
    # either confidence is missing), mean over the answerable rows − mean over the image-removed rows
    from vlcal_verl.protocol import parse_response

    def phi(text: str) -> float:
        p = parse_response(text)
        cv, cr = p.vision_confidence, p.reasoning_confidence
        return 0.0 if cv is None or cr is None or cv + cr == 0 else 2 * cv * cr / (cv + cr)

    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    by_kind = {
        k: [phi(r["response"]) for r in rows if bool(r.get("unanswerable")) is k] for k in (False, True)
    }
    assert len(by_kind[False]) == len(by_kind[True]) == 16
    want = sum(by_kind[False]) / 16 - sum(by_kind[True]) / 16
    assert o["unanswerable_gap"] == pytest.approx(want, abs=1e-9)


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


# ----------------------------------------------------------------------------- mistakes: one line, exit 2


@pytest.fixture
def no_model(monkeypatch):
    """Loading or running a model fails the test: a mistake must be caught before that."""
    from vlcal_verl.evaluation import generate

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the mistake was reported")

    monkeypatch.setattr(generate, "load_hf_model", boom)
    monkeypatch.setattr(generate, "generate_hf", boom)


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("vlcal eval: "), err
    for n in needles:
        assert n in err, err
    return err


def test_missing_model_path_is_one_line(tmp_path, capsys, no_model):
    out = tmp_path / "o"
    assert main(["eval", "--model", "/no/such/model", "--out", str(out)]) == 2
    _one_line_error(capsys, "/no/such/model", "no such path", "vlcal export")
    assert not out.exists()


def test_verl_checkpoint_as_model_points_to_export(tmp_path, capsys, no_model):
    (tmp_path / "ckpt" / "global_step_2" / "actor").mkdir(parents=True)
    assert main(["eval", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "no config.json", "vlcal export")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--judgments", "MISSING.json"], "--judgments"),
        (["--recipe", "MISSING.yaml"], "--recipe"),
        (["--data-dir", "MISSING", "--bench", "x"], "--data-dir"),
        (["--backend", "vllm", "--vce"], "--vce needs --backend hf"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--temperature", "-0.5"], "--temperature must be a finite number >= 0"),
        (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
        (["--top-k", "-1"], "--top-k must be >= 0"),
        (["--bench", "mathvistaa"], "unknown benchmark 'mathvistaa' (did you mean 'mathvista'?)"),
        (["--bench", "easy-vqa,nosuchbench-unanswerable"], "unknown benchmark 'nosuchbench-unanswerable'"),
    ],
)
def test_bad_inputs_are_reported_before_generating(tmp_path, capsys, no_model, extra, needle):
    extra = [str(tmp_path / e) if e.startswith("MISSING") else e for e in extra]
    out = tmp_path / "o"
    assert main(["eval", "--model", "tiny:qwen3-vl", "--out", str(out), *extra]) == 2
    _one_line_error(capsys, needle)
    assert not out.exists()  # nothing half-written


@pytest.mark.slow
def test_eval_tiny_internvl(tmp_path, capsys):
    """An InternVL checkpoint (tiles + thumbnail, <img>…</img> context tokens) generates and is scored
    like a Qwen-VL one; --vce (Qwen-VL patch rows only in the evaluation pass) is refused up front."""
    out = tmp_path / "rep"
    args = [
        "eval",
        "--model",
        "tiny:internvl",
        "--bench",
        "easy-vqa",
        "--limit",
        "3",
        "--max-new-tokens",
        "8",
    ]
    assert main([*args, "--n-boot", "0", "--out", str(out)]) == 0
    assert _check_report(out)["overall"]["n"] == 3
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("<IMG_CONTEXT>" not in r["response"] for r in rows)  # placeholders banned
    capsys.readouterr()
    assert main([*args, "--vce", "--out", str(tmp_path / "v")]) == 2
    _one_line_error(capsys, "InternVL's VCE runs in training")
    assert not (tmp_path / "v").exists()


def test_bad_judgments_content_and_out_mistakes(tmp_path, capsys):
    gens = _gens(tmp_path / "g.jsonl")
    bad = tmp_path / "j.json"
    bad.write_text("[1, 2]")
    assert (
        main(["eval", "--generations", str(gens), "--out", str(tmp_path / "o"), "--judgments", str(bad)]) == 2
    )
    _one_line_error(capsys, "{uid: 0 or 1}")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["eval", "--generations", str(gens), "--out", str(a_file)]) == 2
    _one_line_error(capsys, "not a folder")
    (tmp_path / "same").mkdir()
    same = tmp_path / "same" / "generations.jsonl"
    same.write_text(gens.read_text())
    assert main(["eval", "--generations", str(same), "--out", str(tmp_path / "same")]) == 2
    _one_line_error(capsys, "would overwrite the input")
    assert main(["eval", "--generations", str(gens)]) == 2
    _one_line_error(capsys, "--out is required")
    assert main(["eval", "--model", "tiny:nope", "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "tiny:qwen3-vl")


# ----------------------------------------------------------------------------- generation plumbing (fake model)

TRUNCATED = "<think><vision>a red circle</vision><reasoning>so"  # cut at the token limit


@pytest.fixture
def fake_model(monkeypatch):
    """load_hf_model / generate_hf stand-ins: the first item answers well, the second is cut off at the
    limit, the third ends malformed; records the settings generate_hf got."""
    from vlcal_verl.evaluation import generate

    seen = {}

    def fake_generate(model, processor, items, settings):
        seen["settings"], seen["n"] = settings, len(items)
        pattern = [(GOOD, 30, False), (TRUNCATED, settings.max_new_tokens, True), ("no idea", 4, False)]
        return [generate.Generation(*pattern[i % 3]) for i in range(len(items))]

    monkeypatch.setattr(generate, "load_hf_model", lambda name: (None, None))
    monkeypatch.setattr(generate, "generate_hf", fake_generate)
    return seen


def _hf_folder(tmp_path):
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return model


def test_max_new_tokens_defaults(tmp_path, fake_model):
    from pathlib import Path

    import vlcal_verl

    recipe = Path(vlcal_verl.__file__).parents[1] / "recipes" / "tiny_cpu.yaml"
    base = ["eval", "--bench", "easy-vqa", "--limit", "3", "--n-boot", "0"]
    assert main([*base, "--model", str(_hf_folder(tmp_path)), "--out", str(tmp_path / "a")]) == 0
    assert fake_model["settings"].max_new_tokens == 4096  # a real model: the recipes' response length
    assert (
        main([*base, "--model", "tiny:qwen3-vl", "--out", str(tmp_path / "b"), "--recipe", str(recipe)]) == 0
    )
    import yaml

    stated = yaml.safe_load(recipe.read_text())["data"]["max_response_length"]
    assert fake_model["settings"].max_new_tokens == stated != 4096  # the recipe's data.max_response_length
    assert main([*base, "--model", "tiny:qwen3-vl", "--out", str(tmp_path / "c")]) == 0
    assert fake_model["settings"].max_new_tokens == 48
    assert main([*base, "--model", "tiny:qwen3-vl", "--out", str(tmp_path / "d"), "--top-k", "7"]) == 0
    assert fake_model["settings"].top_k == 7 and fake_model["settings"].max_new_tokens == 48


def test_records_truncation_counts_and_intervals(tmp_path, fake_model):
    from vlcal_verl.evaluation.generate import RECORD_KEYS

    out = tmp_path / "rep"
    args = ["eval", "--model", "tiny:qwen3-vl", "--bench", "easy-vqa,easy-vqa-unanswerable", "--limit", "6"]
    assert main([*args, "--max-new-tokens", "20", "--out", str(out)]) == 0
    recs = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(recs) == 12 and fake_model["n"] == 12  # one generate call for all benchmarks
    for r in recs:
        assert set(RECORD_KEYS) <= set(r)
    assert [(r["truncated"], r["n_tokens"], r["parse_ok"]) for r in recs[:3]] == [
        (False, 30, True),
        (True, 20, False),
        (False, 4, False),
    ]
    assert recs[0]["answer"] == "yes" and recs[0]["confidence"] == pytest.approx(2 * 0.8 * 0.9 / 1.7)
    assert recs[1]["failure"] and recs[2]["failure"] and recs[0]["s_vis"] is None
    m = json.loads((out / "metrics.json").read_text())
    for block in (m["overall"], m["per_benchmark"]["easy-vqa"]):  # 6 answerable: 2 of each pattern
        assert (block["n"], block["n_truncated"]) == (6, 2)
        assert (block["unparsed_truncated"], block["unparsed_malformed"], block["unparsed_unknown"]) == (
            2,
            2,
            0,
        )
        assert set(block["ci95"]) == {"accuracy", "auroc", "ece", "brier", "aurc"}
        for key, (low, high) in ((k, v) for k, v in block["ci95"].items() if v):
            assert low <= block[key] <= high, key
    assert m["overall"]["unanswerable"]["n_truncated"] == 2
    assert m["bootstrap"]["n_boot"] == 1000
    md = (out / "report.md").read_text()
    assert "| trunc |" in md.split("\n")[2]  # the main table's header has the truncation column
    assert "2 of 6 answerable generations hit the token limit" in md and "2 cut off, 2 malformed" in md
    assert "95% bootstrap intervals" in md and "95% bootstrap intervals" in (out / "report.html").read_text()
    # the report's own generations.jsonl scores again to the same numbers
    again = tmp_path / "again"
    assert main(["eval", "--generations", str(out / "generations.jsonl"), "--out", str(again)]) == 0
    m2 = json.loads((again / "metrics.json").read_text())
    assert m2["overall"] == m["overall"]


def test_generations_without_truncation_info_count_unknown(tmp_path):
    out = tmp_path / "rep"
    assert main(["eval", "--generations", str(_gens(tmp_path / "g.jsonl")), "--out", str(out)]) == 0
    o = json.loads((out / "metrics.json").read_text())["overall"]
    assert (o["n_truncated"], o["unparsed_unknown"], o["unparsed_malformed"]) == (0, 1, 0)
    assert (out / "generations.jsonl").read_text().count("\n") == 4  # per-item records in this mode too


# ----------------------------------------------------------------------------- compare and aggregate


def _report(tmp_path, name, rows):
    g = tmp_path / f"{name}.jsonl"
    g.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", "--generations", str(g), "--out", str(tmp_path / name), "--n-boot", "200"]) == 0
    return tmp_path / name


def _rows(correct_mask, uid_prefix=""):
    bad = GOOD.replace("8</vision_confidence>", "3</vision_confidence>")
    return [
        {
            "benchmark": "b",
            "uid": f"{uid_prefix}{i}",
            "response": GOOD if i % 3 else bad,
            "ground_truth": "yes" if c else "no",
            "answer_kind": "yes_no",
        }
        for i, c in enumerate(correct_mask)
    ]


def test_compare_paired_by_uid_and_unpaired_otherwise(tmp_path, capsys):
    a = _report(tmp_path, "A", _rows([1, 0, 1, 1, 0, 1, 0, 1, 1, 0]))
    b = _report(
        tmp_path, "B", list(reversed(_rows([1, 1, 1, 1, 0, 1, 1, 1, 1, 0])))
    )  # same uids, other order
    c = _report(tmp_path, "C", _rows([1, 1, 1, 1, 0, 1, 1, 1, 1, 0], uid_prefix="x"))
    capsys.readouterr()
    assert main(["eval", "--compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    ma, mb = (json.loads((d / "metrics.json").read_text())["overall"] for d in (a, b))
    g = res["groups"]["overall"]
    assert g["paired"] and res["groups"]["b"]["paired"]
    for key in ("accuracy", "ece", "brier", "aurc", "auroc"):
        assert g["metrics"][key]["diff"] == pytest.approx(mb[key] - ma[key]), key
    # two items flip from wrong to right, nothing else changes: every paired draw's ACC gain is ≥ 0
    low, high = g["metrics"]["accuracy"]["ci95"]
    assert low == 0.0 and 0.2 <= high <= 0.5  # draw gain = (copies of the 2 flipped items) / 10
    assert "paired by uid" in printed and "| overall | accuracy |" in printed
    assert main(["eval", "--compare", str(a), str(c), "--out", str(tmp_path / "cmp2")]) == 0
    assert "unpaired (items differ)" in capsys.readouterr().out
    unpaired = json.loads((tmp_path / "cmp2" / "compare.json").read_text())["groups"]["overall"]
    assert not unpaired["paired"] and unpaired["metrics"]["accuracy"]["ci95"][0] < 0  # wider: A, B apart
    assert main(["eval", "--compare", str(a), str(tmp_path / "nope")]) == 2
    _one_line_error(capsys, "no such report folder")


def test_aggregate_mean_and_std_over_runs(tmp_path, capsys):
    import numpy as np

    runs = [
        _report(tmp_path, f"s{i}", _rows(mask))
        for i, mask in enumerate([[1, 0, 1, 1], [1, 1, 1, 0], [0, 0, 1, 1]])
    ]
    assert main(["eval", "--aggregate", *map(str, runs), "--out", str(tmp_path / "agg")]) == 0
    res = json.loads((tmp_path / "agg" / "aggregate.json").read_text())
    accs = [json.loads((r / "metrics.json").read_text())["overall"]["accuracy"] for r in runs]
    assert res["groups"]["overall"]["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert res["groups"]["overall"]["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    assert "mean ± std" in capsys.readouterr().out
    assert main(["eval", "--aggregate", str(runs[0])]) == 2
    _one_line_error(capsys, "at least two")


def test_vce_from_model_mode_feeds_judgments(tmp_path, monkeypatch):
    """--vce on the tiny model: generation is stubbed with protocol responses (random weights never write a
    <vision> span), VCE itself runs on the real model; S̃_vis is normalised per benchmark and --judgments
    then measures its agreement."""
    import torch

    from vlcal_verl.evaluation import generate
    from vlcal_verl.evaluation.vce_eval import vce_scores
    from vlcal_verl.vce import normalize_visual_certainty

    texts = [GOOD, GOOD.replace("a red circle", "a big blue square, top left"), "no idea", TRUNCATED]
    seen = {}

    def fake_generate(model, processor, items, settings):
        eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        out = []
        for i in range(len(items)):
            ids = processor.tokenizer.encode(texts[i % 4]) + ([] if i % 4 == 3 else [eos])
            out.append(generate.Generation(texts[i % 4], len(ids), i % 4 == 3, tuple(ids)))
        seen.update(model=model, processor=processor, items=items, gens=out)
        return out

    monkeypatch.setattr(generate, "generate_hf", fake_generate)
    from vlcal_verl.data.easy_vqa import load_easy_vqa

    uids = [it.uid for it in load_easy_vqa("test", limit=4, seed=2)]  # the items --seed 2 picks
    judgments = tmp_path / "j.json"
    judgments.write_text(json.dumps({uids[0]: 1, uids[1]: 0, uids[3]: 1}))
    out = tmp_path / "rep"
    args = ["eval", "--model", "tiny:qwen3-vl", "--bench", "easy-vqa,easy-vqa-unanswerable", "--limit", "4"]
    assert main([*args, "--vce", "--judgments", str(judgments), "--out", str(out), "--seed", "2"]) == 0
    recs = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    from vlcal_verl.config import VCEConfig

    direct = vce_scores(
        seen["model"],
        seen["processor"],
        seen["items"],
        [g.token_ids for g in seen["gens"]],
        cfg=VCEConfig(seed=2),
    )
    for r, d in zip(recs, direct, strict=True):
        assert (r["k_bar"], r["h_bar"], r["s"]) == (d["k_bar"], d["h_bar"], d["s"])
    assert [r["s_vis"] is None for r in recs[:4]] == [False, False, True, False]  # "no idea": no span
    for bench in ("easy-vqa", "easy-vqa-unanswerable"):  # normalised within each benchmark
        group = [r for r in recs if r["benchmark"] == bench and r["s"] is not None]
        expected = normalize_visual_certainty(torch.tensor([r["s"] for r in group], dtype=torch.float64))
        assert [r["s_vis"] for r in group] == pytest.approx(expected.tolist())
    va = json.loads((out / "metrics.json").read_text())["visual_agreement"]
    assert va["n"] == 3 and va["n_missing"] == 5  # 3 judged items with S̃_vis; the rest lack one or the other
