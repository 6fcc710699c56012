"""One schema: the ``vlcal:`` block of ``vlcal_trainer.yaml`` is the dataclasses' defaults, field for field,
and every field can be overridden on the command line without ``+``; valid ranges are refused by name in
the config, ``vlcal score`` and the reward server alike, and README states them."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from vlcal_verl.config import RANGES, Range, VLCalConfig, check_value

ROOT = Path(__file__).resolve().parents[2]
TRAINER_YAML = ROOT / "vlcal_verl" / "hydra_conf" / "vlcal_trainer.yaml"


def _leaves(obj, prefix: str = "") -> dict[str, tuple[object, object]]:
    """{dotted field path: (default, type hint)} for every leaf field of a dataclass, walked recursively."""
    out: dict[str, tuple[object, object]] = {}
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out |= _leaves(value, f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = (value, hints[f.name])
    return out


def _yaml_leaves(block: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in block.items():
        if isinstance(value, dict):
            out |= _yaml_leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_yaml_block_is_every_dataclass_field_with_its_default():
    block = yaml.safe_load(TRAINER_YAML.read_text())["vlcal"]
    fields = _leaves(VLCalConfig())
    # 6 reward + 11 vce + 7 tar + 2 perception + variant, ablation, server url, node watchdog
    assert len(fields) == 30
    yaml_fields = _yaml_leaves(block)
    assert sorted(yaml_fields) == sorted(fields)  # none missing, none extra
    for path, (default, _) in fields.items():
        assert yaml_fields[path] == default and type(yaml_fields[path]) is type(default), path


def _other_value(default: object, hint: object) -> object:
    """A value different from the default, of the field's type (composition only: not validated)."""
    if typing.get_origin(hint) is typing.Literal:
        return next(c for c in typing.get_args(hint) if c != default)
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 3
    if isinstance(default, float):
        return default / 4
    return "http://rm:8000" if default is None else f"{default}x"


def _override_text(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def test_every_field_is_overridable_without_plus():
    """Hydra's struct mode refuses ``key=value`` for a key the YAML lacks ("not in struct"): each leaf
    field of the dataclasses, given a non-default value, must reach the composed config."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vlcal_verl.main import CONFIG_DIR, verl_config_dir

    search = f"hydra.searchpath=[file://{CONFIG_DIR},file://{verl_config_dir()}]"
    wanted = {path: _other_value(d, h) for path, (d, h) in _leaves(VLCalConfig()).items()}
    overrides = [f"vlcal.{path}={_override_text(v)}" for path, v in wanted.items()]
    assert "vlcal.vce.mask_cell_px=3" in overrides and "vlcal.vce.fused=false" in overrides
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="vlcal_trainer", overrides=[*overrides, search])
    got = _yaml_leaves(OmegaConf.to_container(cfg.vlcal, resolve=True))
    for path, value in wanted.items():
        assert got[path] == pytest.approx(value) if isinstance(value, float) else got[path] == value, path


@pytest.mark.parametrize(
    ("bounds", "inside", "outside", "text"),
    [
        (Range(0.0), [0.0, 2.0, 1e9], [-1e-9, -1.0], ">= 0"),
        (Range(0.0, low_open=True), [1e-12, 5.0], [0.0, -3.0], "> 0"),
        (Range(0.0, 1.0, low_open=True), [1e-6, 0.5, 1.0], [0.0, 1.0000001, -0.2], "in (0, 1]"),
        (Range(1.0), [1, 256], [0, -1], ">= 1"),
        (Range(None, 2.0, high_open=True), [-5.0, 1.99], [2.0, 3.0], "< 2"),
    ],
)
def test_range_membership_and_text(bounds, inside, outside, text):
    assert all(v in bounds for v in inside) and not any(v in bounds for v in outside)
    assert str(bounds) == text


@pytest.mark.parametrize(
    ("section", "override", "message"),
    [
        ("reward", {"w_brier": -1}, "vlcal.reward.w_brier=-1 is out of range: must be >= 0"),
        ("reward", {"w_vis": -0.4}, "vlcal.reward.w_vis=-0.4 is out of range: must be >= 0"),
        ("reward", {"w_fmt": -0.1}, "vlcal.reward.w_fmt=-0.1 is out of range: must be >= 0"),
        ("reward", {"grading_timeout_s": 0}, "vlcal.reward.grading_timeout_s=0 is out of range: must be > 0"),
        ("tar", {"w_min": -1}, "vlcal.tar.w_min=-1 is out of range: must be >= 0"),
        ("tar", {"w_min": 1.2, "w_max": 1.1}, "vlcal.tar.w_min=1.2 is out of range: must be <= vlcal.tar.w_max=1.1"),
        ("vce", {"mask_prob": 0}, r"vlcal.vce.mask_prob=0 is out of range: must be in \(0, 1\]"),
        ("vce", {"mask_prob": 1.5}, r"vlcal.vce.mask_prob=1.5 is out of range: must be in \(0, 1\]"),
        ("vce", {"eps": 0.0}, "vlcal.vce.eps=0.0 is out of range: must be > 0"),
        ("vce", {"vocab_chunk_tokens": 0}, "vlcal.vce.vocab_chunk_tokens=0 is out of range: must be >= 1"),
        ("perception", {"top_fraction": 0}, r"vlcal.perception.top_fraction=0 is out of range: must be in \(0, 1\]"),
    ],
)  # fmt: skip
def test_values_out_of_range_are_refused_by_name(section, override, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        VLCalConfig.from_dict({section: override})


@pytest.mark.parametrize(
    "d",
    [
        {"reward": {"w_brier": 0.0, "w_fmt": 0.0, "w_vis": 0.0}},  # 0 turns a term off: allowed
        {"vce": {"mask_prob": 1.0, "mask_cell_px": 0}},
        {"tar": {"w_min": 0.0, "w_max": 0.0}},
        {"tar": {"w_min": 1.0, "w_max": 1.0}},
        {"perception": {"top_fraction": 1.0}},
    ],
)
def test_range_edges_are_accepted(d):
    VLCalConfig.from_dict(d)


def test_check_value_names_the_label_and_ignores_unbounded_keys():
    with pytest.raises(ValueError, match=r"^weights.w_brier=-2.0 is out of range: must be >= 0 \("):
        check_value("reward.w_brier", -2.0, "weights.w_brier")
    check_value("vce.seed", -7)  # no range: any integer seeds the masks


def test_score_cli_refuses_negative_weights(tmp_path, capsys):
    from vlcal_verl.cli import main

    src = tmp_path / "in.jsonl"
    src.write_text('{"response": "\\\\boxed{4}", "ground_truth": "4"}\n')
    for flag, value in (("--w-brier", "-1"), ("--w-fmt", "-0.4")):
        assert main(["score", str(src), "-o", str(tmp_path / "o.jsonl"), flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"vlcal score: {flag}={float(value)} is out of range: must be >= 0 ("), err
        assert "\n" not in err and not (tmp_path / "o.jsonl").exists()


def test_reward_server_refuses_negative_weights_per_request_and_at_start():
    from fastapi.testclient import TestClient

    from reward_server.app import create_app
    from reward_server.settings import ServerSettings

    item = {"uid": "a", "data_source": "virl", "response": "\\boxed{3}", "ground_truth": "3"}
    client = TestClient(create_app(ServerSettings(workers=1)))  # no lifespan: nothing is graded
    r = client.post("/v1/score", json={"items": [item], "weights": {"w_vis": -0.4}})
    assert r.status_code == 422
    (detail,) = r.json()["detail"]
    assert detail["loc"][:2] == ["body", "weights"]
    assert "weights.w_vis=-0.4 is out of range: must be >= 0" in detail["msg"]
    with pytest.raises(ValueError, match=r"^w_brier=-1.0 is out of range: must be >= 0"):
        ServerSettings(w_brier=-1.0).validate()


def test_readme_states_every_range():
    readme = (ROOT / "README.md").read_text()
    for key, bounds in RANGES.items():
        assert f"| `vlcal.{key}` | {bounds} |" in readme, key
