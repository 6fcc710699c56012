"""ViRL-39K preparation: seeded sampling reproducibility on a synthetic 39K index, end to end on a tiny copy."""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vlcal_verl.cli import main
from vlcal_verl.data.schema import MAX_PIXELS, MIN_PIXELS, fit_pixels, read_parquet, validate_rows
from vlcal_verl.data.virl import sample_indices


def _index(n=39_000, seed=123):
    rng = random.Random(seed)
    cats = ["Spatial", "Chart", "GeometryMath", "Science", "Puzzle"]
    return [
        {
            "qid": f"q{i}",
            "category": rng.choices(cats, weights=[5, 4, 3, 2, 1])[0],
            "PassRate_72BTrained": rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]),
        }
        for i in range(n)
    ]


def test_same_seed_same_12k_ids_other_seed_differs():
    idx = _index()
    a, b, c = (sample_indices(idx, 12_000, seed=s) for s in (0, 0, 1))
    assert a == b and len(a) == 12_000 and len(set(a)) == 12_000
    assert set(a) != set(c)


def test_sampling_drops_extremes_and_keeps_category_shares():
    idx = _index()
    chosen = sample_indices(idx, 12_000, seed=0)
    assert all(0.0 < idx[i]["PassRate_72BTrained"] < 1.0 for i in chosen)
    eligible = Counter(r["category"] for r in idx if 0.0 < r["PassRate_72BTrained"] < 1.0)
    got = Counter(idx[i]["category"] for i in chosen)
    total = sum(eligible.values())
    for cat, m in eligible.items():  # largest remainder: within one item of the exact share
        assert abs(got[cat] - 12_000 * m / total) < 1.0
    assert len(sample_indices(idx, 12_000, seed=0, keep_extremes=True)) == 12_000


def test_fit_pixels_bounds():
    small, big, ok = Image.new("RGB", (100, 50)), Image.new("RGB", (4000, 3000)), Image.new("RGB", (600, 600))
    for im in (small, big):
        w, h = fit_pixels(im).size
        assert MIN_PIXELS * 0.98 <= w * h <= MAX_PIXELS and abs(w / h - im.size[0] / im.size[1]) < 0.05
    assert fit_pixels(ok) is ok


def _png(path, size):
    Image.new("RGB", size, (10, 200, 10)).save(path)


def _tiny_virl(src: Path) -> None:
    (src / "images").mkdir(parents=True)
    rows = []
    for i in range(12):
        _png(src / "images" / f"{i}.png", (64, 48))
        rows.append(
            {
                "question": f"<image>How many? ({i})",
                "answer": f"\\boxed{{{i}}}",
                "image": [f"images/{i}.png"],
                "category": "Chart" if i % 2 else "Spatial",
                "source": "x",
                "PassRate_32BTrained": 0.5,
                "PassRate_72BTrained": 1.0 if i == 0 else 0.5,
                "qid": f"q{i}",
            }
        )
    (src / "39Krelease.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_vlcal_data_virl_end_to_end(tmp_path, capsys):
    src = tmp_path / "virl"
    _tiny_virl(src)
    out = tmp_path / "out"
    assert main(["data", "virl", "--source", str(src), "--out", str(out), "--n", "8", "--val-size", "2"]) == 0
    train, val = read_parquet(out / "train.parquet"), read_parquet(out / "val.parquet")
    validate_rows(train + val)
    assert len(train) == 8 and len(val) == 2 and "q0" not in {r["extra_info"]["uid"] for r in train + val}
    r = train[0]
    assert r["prompt"][0]["content"].count("<image>") == 1 and not r["reward_model"][
        "ground_truth"
    ].startswith("\\boxed")
    w, h = Image.open(io.BytesIO(r["images"][0]["bytes"])).size
    assert MIN_PIXELS * 0.98 <= w * h <= MAX_PIXELS
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["train"] == 8 and manifest["val"] == 2 and len(manifest["sha256"]["train.parquet"]) == 64


def test_default_out_is_where_the_recipes_read(tmp_path, capsys, monkeypatch):
    from vlcal_verl.main import compose_recipe

    src = tmp_path / "virl"
    _tiny_virl(src)
    monkeypatch.setenv("VLCAL_DATA_DIR", str(tmp_path / "shared"))
    assert main(["data", "virl", "--source", str(src), "--n", "8", "--val-size", "2"]) == 0
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "qwen3_vl_8b.yaml"
    data = compose_recipe(recipe).data
    for split, n in (("train", 8), ("val", 2)):
        path = tmp_path / "shared" / "vl_calibration_12k" / f"{split}.parquet"
        assert str(data[f"{split}_files"]) == str(path)
        assert len(read_parquet(path)) == n


def test_missing_image_is_a_clear_error(tmp_path, capsys):
    src = tmp_path / "virl"
    src.mkdir()
    rec = {
        "question": "q",
        "answer": "\\boxed{1}",
        "image": ["images/gone.png"],
        "category": "c",
        "qid": "q1",
    }
    (src / "d.jsonl").write_text(json.dumps(rec) + "\n")
    assert (
        main(
            [
                "data",
                "virl",
                "--source",
                str(src),
                "--out",
                str(tmp_path / "o"),
                "--n",
                "1",
                "--val-size",
                "0",
            ]
        )
        == 2
    )
    assert "gone.png" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["./no-such-dir", "/tmp/vlcal-no-such/virl", "typo.jsonl", "a/b/c"])
def test_missing_local_source_is_named_not_sent_to_the_hub(source, tmp_path, capsys):
    argv = ["data", "virl", "--source", source, "--out", str(tmp_path / "o"), "--n", "1", "--val-size", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--source {Path(source)} does not exist" in err


@pytest.mark.parametrize("bad", [{"answer": "1", "image": []}])
def test_missing_field_named(bad, tmp_path):
    from vlcal_verl.data.virl import to_row

    with pytest.raises(ValueError, match="'question'"):
        to_row(bad, 0, tmp_path, "decoupled")
