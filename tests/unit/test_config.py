"""VLCalConfig: authors' defaults, unknown keys and invalid combinations rejected by name, YAML casts."""

from __future__ import annotations

import pytest

from vlcal_verl.config import VLCalConfig


def test_defaults_are_the_authors():
    """What ``python -m vlcal_verl.main`` runs when no variant is chosen (Hydra's composed ``vlcal:`` block):
    the authors' released run, with the values read from their code — reward weights 2 / 0.4 / 0.4,
    mask 80 % of the image, sampled-token VCE (p·log-ratio KL, −log p entropy) on a full masked forward,
    TAR z-scored over the response with the clamped k3 KL, the top-20 % perception filter."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vlcal_verl.main import CONFIG_DIR, verl_config_dir

    search = f"hydra.searchpath=[file://{CONFIG_DIR},file://{verl_config_dir()}]"
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="vlcal_trainer", overrides=[search])
    c = VLCalConfig.from_dict(OmegaConf.to_container(cfg.vlcal, resolve=True))
    assert c.variant == "authors" and c.reward.reference_parity
    assert (c.reward.w_brier, c.reward.w_fmt, c.reward.w_vis) == (2.0, 0.4, 0.4)
    assert (c.vce.mask_prob, c.vce.estimator, c.vce.entropy, c.vce.scope) == (0.8, "reference", "nll", "full")
    assert (c.tar.w_min, c.tar.w_max, c.tar.scope) == (0.9, 1.1, "response")
    assert (c.tar.kl, c.tar.entropy) == ("k3_clamped", "nll")
    assert c.perception.enabled and c.perception.top_fraction == 0.2


def test_dataclass_defaults_are_the_exact_variant():
    """``VLCalConfig()`` alone (Python callers, no Hydra) is this project's exact variant."""
    c = VLCalConfig().validate()
    assert (c.reward.w_brier, c.reward.w_fmt, c.reward.w_vis) == (2.0, 0.4, 0.4)
    assert (c.vce.mask_prob, c.vce.estimator, c.vce.entropy, c.vce.scope) == (
        0.8,
        "exact",
        "distribution",
        "truncated",
    )
    assert (c.tar.w_min, c.tar.w_max, c.tar.scope, c.tar.kl) == (0.9, 1.1, "vision_span", "vce")
    assert not c.perception.enabled


def test_round_trip_and_yaml_number_strings():
    c = VLCalConfig.from_dict({"reward": {"w_brier": "1e-3"}, "vce": {"vocab_chunk_tokens": "128"}})
    assert c.reward.w_brier == pytest.approx(0.001) and c.vce.vocab_chunk_tokens == 128
    assert VLCalConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    ("d", "message"),
    [
        ({"reward": {"w_brierr": 1.0}}, r"unknown key\(s\) in vlcal.reward: \['w_brierr'\]"),
        ({"vcee": {}}, "unknown key in vlcal: 'vcee'"),
        ({"reward": {"w_fmt": "lots"}}, "vlcal.reward.w_fmt must be a number"),
        ({"vce": {"mask_prob": 1.5}}, "vlcal.vce.mask_prob"),
        ({"tar": {"w_min": 1.2, "w_max": 1.1}}, "vlcal.tar.w_min"),
        ({"vce": {"enabled": False}}, "vlcal.tar.enabled needs vlcal.vce.enabled"),
        ({"tar": {"scope": "response"}}, "vlcal.vce.scope='full'"),
        ({"reward": {"protocol": "rlcr"}}, "protocol='rlcr'"),
    ],
)
def test_invalid_configs_name_the_field(d, message):
    with pytest.raises(ValueError, match=message):
        VLCalConfig.from_dict(d)


def test_rlcr_and_response_scope_valid_when_consistent():
    c = VLCalConfig.from_dict(
        {"reward": {"protocol": "rlcr", "w_vis": 0.0}, "vce": {"enabled": False}, "tar": {"enabled": False}}
    )
    assert c.reward.protocol == "rlcr"
    c = VLCalConfig.from_dict({"vce": {"scope": "full"}, "tar": {"scope": "response"}})
    assert c.tar.scope == "response"
