"""``vlcal export`` through verl's own model merger on a one-rank FSDP-layout checkpoint of the tiny model
(no Ray): the exported folder holds the same weights (in verl's bfloat16), the processor files, and
loads in ``vlcal eval``. The export of a checkpoint verl's real loop wrote is in
``tests/verl_ext/test_verl_cpu_loop.py``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from vlcal_verl.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from vlcal_verl.testing.tiny_models import build_tiny_vlm, load_tiny_vlm

    root = tmp_path_factory.mktemp("ckpt")
    actor = root / "global_step_3" / "actor"
    actor.mkdir(parents=True)
    model, _ = load_tiny_vlm("qwen3-vl")
    torch.save(model.state_dict(), actor / "model_world_size_1_rank_0.pt")
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 1}))
    shutil.copytree(build_tiny_vlm("qwen3-vl"), actor / "huggingface")
    for f in (actor / "huggingface").glob("*.safetensors"):
        f.unlink()  # only the config and processor files, as verl writes them without hf_model
    (root / "latest_checkpointed_iteration.txt").write_text("3")
    return root, model.state_dict()


def test_export_weights_processor_and_eval(checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file

    root, reference = checkpoint
    out = tmp_path / "hf"
    assert main(["export", str(root), str(out)]) == 0  # the run folder: its latest step
    assert "no preprocessor_config.json" not in capsys.readouterr().out  # the processor is written
    saved = {}
    for f in out.glob("*.safetensors"):
        saved.update(load_file(f))
    tied = set(reference) - set(saved)
    assert tied <= {"lm_head.weight"}  # a tied head is saved once
    for key, value in saved.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, reference[key].bfloat16()), key
    for name in ("config.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    assert (out / "processor_config.json").is_file() or (out / "preprocessor_config.json").is_file()
    assert not list(tmp_path.glob(".*exporting"))
    rc = main(
        ["eval", "--model", str(out), "--bench", "easy-vqa", "--limit", "2", "--max-new-tokens", "4",
         "--n-boot", "0", "--out", str(tmp_path / "rep")]
    )  # fmt: skip
    assert rc == 0 and json.loads((tmp_path / "rep" / "metrics.json").read_text())["overall"]["n"] == 2


def test_step_and_actor_paths_resolve_to_the_same_actor(checkpoint):
    from vlcal_verl.commands.export import actor_dir

    root, _ = checkpoint
    actor = root / "global_step_3" / "actor"
    assert actor_dir(root) == actor_dir(root / "global_step_3") == actor_dir(actor) == actor


def test_mistakes_are_one_line_and_write_nothing(checkpoint, tmp_path, capsys):
    root, _ = checkpoint
    cases = [
        ([str(tmp_path / "none"), str(tmp_path / "o1")], "no such folder"),
        ([str(tmp_path), str(tmp_path / "o2")], "not a verl FSDP checkpoint"),
        ([str(root / "latest_checkpointed_iteration.txt"), str(tmp_path / "o3")], "is a file; give the"),
    ]
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    cases.append(([str(root), str(full)], "not an empty folder"))
    cases.append(([str(root), str(tmp_path / "no" / "parent")], "does not exist"))
    for argv, needle in cases:
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("vlcal export: ") and needle in err and "\n" not in err, err
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))
