"""Server settings: flag > VLCAL_RS_* env var > default, and errors that name the flag or variable."""

from __future__ import annotations

import argparse

import pytest

from reward_server import settings as s
from vlcal_verl.cli import build_parser


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    s.add_arguments(parser)
    return parser.parse_args(argv)


def test_flag_beats_env_beats_default():
    env = {"VLCAL_RS_PORT": "9001", "VLCAL_RS_TIMEOUT": "2.5", "VLCAL_RS_MAX_ITEMS": "64"}
    got = s.from_args(parse(["--port", "9002", "--workers", "3"]), environ=env)
    assert (got.port, got.timeout, got.max_items, got.workers) == (9002, 2.5, 64, 3)
    assert got.host == "127.0.0.1" and got.max_inflight == 8192
    assert s.from_args(None, environ={}).port == 8000


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match="VLCAL_RS_PORT='http'"):
        s.from_args(None, environ={"VLCAL_RS_PORT": "http"})
    with pytest.raises(ValueError, match="timeout must be > 0"):
        s.from_args(parse(["--timeout", "0"]), environ={})
    with pytest.raises(ValueError, match=r"max_inflight \(10\) must be >= max_items \(20\)"):
        s.from_args(parse(["--max-items", "20", "--max-inflight", "10"]), environ={})
    with pytest.raises(ValueError, match="protocol must be"):
        s.from_args(parse(["--protocol", "other"]), environ={})


def test_reward_config_carries_weights_and_timeout():
    cfg = s.from_args(
        parse(["--w-brier", "1.5", "--timeout", "3", "--protocol", "rlcr"]), environ={}
    ).reward_config()
    assert (cfg.w_brier, cfg.w_fmt, cfg.grading_timeout_s, cfg.protocol) == (1.5, 0.4, 3.0, "rlcr")


def test_vlcal_serve_alias_has_the_same_flags():
    args = build_parser().parse_args(
        ["serve", "--host", "0.0.0.0", "--port", "7000", "--max-body-bytes", "1024"]
    )
    got = s.from_args(args, environ={})
    assert (got.host, got.port, got.max_body_bytes) == ("0.0.0.0", 7000, 1024)


def test_bool_setting_from_flag_and_env():
    assert s.from_args(parse([]), environ={}).reference_parity is False
    assert s.from_args(parse(["--reference-parity"]), environ={}).reference_parity is True
    assert (
        s.from_args(
            parse(["--reference-parity", "false"]), environ={"VLCAL_RS_REFERENCE_PARITY": "1"}
        ).reference_parity
        is False
    )
    for text, value in [
        ("true", True),
        ("YES", True),
        ("on", True),
        ("0", False),
        ("Off", False),
        ("no", False),
    ]:
        got = s.from_args(None, environ={"VLCAL_RS_REFERENCE_PARITY": text})
        assert got.reference_parity is value and got.reward_config().reference_parity is value
    with pytest.raises(ValueError, match="VLCAL_RS_REFERENCE_PARITY='maybe' is not a valid bool"):
        s.from_args(None, environ={"VLCAL_RS_REFERENCE_PARITY": "maybe"})
    with pytest.raises(SystemExit):  # argparse: "invalid parse_bool value"
        parse(["--reference-parity", "maybe"])
    args = build_parser().parse_args(["serve", "--reference-parity"])
    assert s.from_args(args, environ={}).reference_parity is True


@pytest.mark.parametrize("name", ["w_brier", "w_fmt", "w_vis", "timeout"])
@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_floats_are_refused(name, text):
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ValueError, match=f"^{name} must be a finite number, got"):
        s.from_args(parse([f"{flag}={text}"]), environ={})
    with pytest.raises(ValueError, match=f"^{name} must be a finite number, got"):
        s.from_args(None, environ={"VLCAL_RS_" + name.upper(): text})


def test_port_range():
    for port in (1, 8000, 65535):
        assert s.from_args(parse(["--port", str(port)]), environ={}).port == port
    for port in (0, -1, 65536, 99999):
        with pytest.raises(ValueError, match=rf"^port must be in 1\.\.65535, got {port}$"):
            s.from_args(parse(["--port", str(port)]), environ={})


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["--port", "99999"], "reward_server: port must be in 1..65535, got 99999"),
        (["--w-brier", "nan"], "reward_server: w_brier must be a finite number, got nan"),
    ],
)
def test_cli_refuses_bad_settings_in_one_line(argv, want):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "reward_server", *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [want]
    assert proc.stdout == ""
