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
