"""``vlcal train``'s mistakes: one line naming what is wrong, exit code 2, before any data or model work."""

from __future__ import annotations

import pytest

from vlcal_verl.cli import main


def _run(capsys, *argv):
    rc = main(["train", *argv])
    return rc, capsys.readouterr().err


def test_override_without_equals(capsys, tmp_path):
    rc, err = _run(capsys, "--out", str(tmp_path), "steps")
    assert rc == 2 and "KEY=VALUE" in err and "'steps'" in err


def test_unknown_key_names_it(capsys, tmp_path):
    rc, err = _run(capsys, "--out", str(tmp_path), "trainerr.total_training_steps=2")
    assert rc == 2 and "trainerr" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists()  # nothing was prepared


def test_bad_demo_value_names_the_field(capsys, tmp_path):
    rc, err = _run(capsys, "--out", str(tmp_path), "demo.train_size=0")
    assert rc == 2 and "demo.train_size" in err


@pytest.mark.parametrize("resume", [True, False])
def test_runs_are_not_mixed(capsys, tmp_path, resume):
    if not resume:  # a folder that already holds verl's checkpoint
        (tmp_path / "verl").mkdir()
        (tmp_path / "verl" / "latest_checkpointed_iteration.txt").write_text("2")
    rc, err = _run(capsys, "--out", str(tmp_path), *(["--resume"] if resume else []))
    assert rc == 2 and ("--resume" in err)
    assert not (tmp_path / "data").exists()


def test_missing_recipe(capsys, tmp_path):
    rc, err = _run(capsys, "--config", str(tmp_path / "nope.yaml"))
    assert rc == 2 and "no such file" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty; give a recipe with a demo: block"),
        ("# only a comment\n\n", "the file is empty"),
        ("- a\n- b\n", "a recipe is a YAML mapping (key: value), this file holds a list"),
        ("just words\n", "this file holds a str"),
        ("demo: [unclosed\n", "not valid YAML at line"),
        ("trainer:\n  total_training_steps: 2\n", "no demo: block (and no defaults: to inherit one)"),
    ],
)
def test_config_that_is_not_a_recipe_is_refused(capsys, tmp_path, text, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    out = tmp_path / "run"
    rc, err = _run(capsys, "--config", str(recipe), "--out", str(out))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"vlcal train: --config {recipe}: ") and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("exists", [True, False])
def test_resume_with_nothing_to_resume_is_refused(capsys, tmp_path, exists):
    out = tmp_path / "run"
    if exists:
        out.mkdir()
    rc, err = _run(capsys, "--out", str(out), "--resume")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "nothing to resume" in err and "drop --resume" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["run"] if exists else [])
    if exists:
        assert list(out.iterdir()) == []
