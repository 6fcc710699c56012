"""``vlcal train``: recipes with a ``science:`` block go to the science pipeline; ``--seeds`` checks."""

from __future__ import annotations

from pathlib import Path

import pytest

import vlcal_verl.demo.pipeline as demo_pipeline
import vlcal_verl.science.pipeline as science_pipeline
from vlcal_verl.cli import main

ROOT = Path(__file__).resolve().parents[2]
SCIENCE = ROOT / "recipes" / "tiny_science.yaml"
DEMO = ROOT / "recipes" / "tiny_cpu.yaml"


@pytest.fixture
def calls(monkeypatch):
    """Record which pipeline ``vlcal train`` calls, without running it."""
    seen = []

    def fake(name):
        def run(recipe, out, overrides, **kw):
            seen.append((name, Path(recipe), Path(out), list(overrides), kw))
            return {"timings": {"total_s": 1.0}}

        return run

    monkeypatch.setattr(science_pipeline, "run_science", fake("science"))
    monkeypatch.setattr(demo_pipeline, "run_demo", fake("demo"))
    return seen


def test_science_recipe_goes_to_the_science_pipeline_with_seeds(calls, tmp_path):
    out = tmp_path / "s"
    assert main(["train", "--config", str(SCIENCE), "--out", str(out), "--seeds", "3", "a.b=1"]) == 0
    assert calls == [("science", SCIENCE, out, ["a.b=1"], {"seeds": 3, "resume": False})]


def test_default_out_follows_the_recipe(calls, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(SCIENCE)]) == 0
    assert main(["train", "--config", str(DEMO)]) == 0
    assert [(c[0], c[2]) for c in calls] == [("science", Path("runs/science")), ("demo", Path("runs/demo"))]


def test_demo_recipe_still_goes_to_the_demo(calls, tmp_path):
    assert main(["train", "--config", str(DEMO), "--out", str(tmp_path / "d")]) == 0
    assert [c[0] for c in calls] == ["demo"]


@pytest.mark.parametrize(
    ("recipe", "seeds", "message"),
    [
        (DEMO, "3", "--seeds 3: needs a recipe with a science: block"),
        (SCIENCE, "0", "--seeds 0: must be >= 1"),
    ],
)
def test_bad_seeds_are_one_line_and_exit_2(calls, capsys, tmp_path, recipe, seeds, message):
    assert main(["train", "--config", str(recipe), "--out", str(tmp_path / "o"), "--seeds", seeds]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert calls == []


def test_bad_science_value_fails_before_any_work(capsys, tmp_path):
    out = tmp_path / "never"
    rc = main(["train", "--config", str(SCIENCE), "--out", str(out), "science.svis_last_steps=0"])
    assert rc == 2
    assert "science.svis_last_steps must be >= 1, got 0" in capsys.readouterr().err
    assert not out.exists()


def test_a_second_fresh_run_into_the_same_folder_is_refused(capsys, tmp_path):
    (tmp_path / "run.json").write_text("{}")
    assert main(["train", "--config", str(SCIENCE), "--out", str(tmp_path)]) == 2
    assert "already holds a science run" in capsys.readouterr().err


def test_train_help_names_the_demo_and_the_science_recipe(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "embedded demo" in text and "recipes/tiny_science.yaml" in text
    assert "default recipes/tiny_cpu.yaml" in text and "--seeds" in text


def test_readme_dev_line_dispatches_as_written_and_composes(calls, monkeypatch):
    """The README's ``science.evaluate_on=dev`` command: parsed by ``vlcal``, sent to the science pipeline
    with its override, and the override composes into a dev run."""
    import shlex

    from vlcal_verl.main_args import compose_recipe
    from vlcal_verl.science.pipeline import science_config_of

    readme = (ROOT / "README.md").read_text().splitlines()
    lines = [ln for ln in readme if ln.startswith("vlcal train ") and "science.evaluate_on=dev" in ln]
    assert len(lines) == 1, lines
    monkeypatch.chdir(ROOT)
    assert main(shlex.split(lines[0])[1:]) == 0
    ((name, recipe, out, overrides, _),) = calls
    assert (name, (ROOT / recipe).resolve(), out, overrides) == (
        "science",
        SCIENCE,
        Path("runs/science-dev"),
        ["science.evaluate_on=dev"],
    )
    assert science_config_of(compose_recipe(recipe, overrides)).evaluate_on == "dev"
