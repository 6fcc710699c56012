"""Server settings: one typed dataclass filled from command-line flags, then ``VLCAL_RS_*`` env vars.

The same flags serve ``python -m reward_server`` and ``vlcal serve``; precedence is flag > env var >
default, so a container can be configured by environment alone. A bad value is an error naming the
flag or variable, never a silent default.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from vlcal_verl.config import RewardConfig, check_value

ENV_PREFIX = "VLCAL_RS_"


@dataclass
class ServerSettings:
    """Everything the reward server needs to start; see ``add_arguments`` for the flags."""

    host: str = "127.0.0.1"
    """Interface to bind (loopback by default; use 0.0.0.0 behind a firewall or in a container)."""
    port: int = 8000
    """TCP port, 1..65535. 0 ("any free port") is refused: clients and probes need a known port."""
    workers: int = field(default_factory=lambda: max(1, os.cpu_count() or 1))
    """Grading processes in the pool (one uvicorn process; grading scales with this)."""
    timeout: float = 5.0
    """Per-item grading timeout in seconds; a timed-out item is graded incorrect, status 'timeout'."""
    max_items: int = 1024
    """Items per request on /v1/score, /get_reward and /v1/visual-labels (more → 413)."""
    max_body_bytes: int = 16 * 1024 * 1024
    """Request body size limit in bytes (more → 413)."""
    max_inflight: int = 8192
    """Items being scored at once across all requests; a request that would exceed it gets 503."""
    max_response_chars: int = 262_144
    """Characters per item's response text (more → 413 naming the item)."""
    retry_after_s: int = 1
    """Seconds in the Retry-After header of a 503."""
    protocol: str = "decoupled"
    """Default output protocol ('decoupled' or 'rlcr'); a request may override it."""
    w_brier: float = RewardConfig.w_brier
    """Default weight of the Brier term."""
    w_fmt: float = RewardConfig.w_fmt
    """Default weight of the format indicator F."""
    w_vis: float = RewardConfig.w_vis
    """Default weight of the visual term (used by /v1/visual-labels' visual_reward)."""
    reference_parity: bool = False
    """Default to the authors' decouple reward (their parsing, mathruler in-process); a request may override."""
    log_level: str = "info"
    """uvicorn log level."""
    shutdown_grace_s: float = 20.0
    """After SIGTERM/SIGINT: seconds in-flight requests get before the process exits (those not done 2 s
    before the end are answered 503 + Retry-After; see reward_server.shutdown)."""

    def validate(self) -> ServerSettings:
        """Raise ValueError naming the field when a value is out of range; return self."""
        for f in fields(self):  # NaN compares False with everything, so it would pass every range check
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        positive = ("workers", "timeout", "max_items", "max_body_bytes", "max_inflight", "shutdown_grace_s")
        for name in (*positive, "max_response_chars", "retry_after_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_inflight < self.max_items:
            raise ValueError(
                f"max_inflight ({self.max_inflight}) must be >= max_items ({self.max_items}), "
                "or a full request could never be admitted"
            )
        if self.protocol not in ("decoupled", "rlcr"):
            raise ValueError(f"protocol must be 'decoupled' or 'rlcr', got {self.protocol!r}")
        for name in ("w_brier", "w_fmt", "w_vis"):  # the valid ranges of training's --check
            check_value(f"reward.{name}", getattr(self, name), name)
        return self

    def reward_config(self) -> RewardConfig:
        """The default RewardConfig of this server (weights, protocol, grading timeout)."""
        return RewardConfig(
            w_brier=self.w_brier,
            w_fmt=self.w_fmt,
            w_vis=self.w_vis,
            protocol=self.protocol,  # type: ignore[arg-type]
            grading_timeout_s=self.timeout,
            reference_parity=self.reference_parity,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_HELP = {
    "host": "interface to bind",
    "port": "TCP port, 1..65535",
    "workers": "grading processes (default: CPU count)",
    "timeout": "per-item grading timeout, seconds",
    "max_items": "items per request (more -> 413)",
    "max_body_bytes": "request body limit in bytes (more -> 413)",
    "max_inflight": "items in flight across requests (more -> 503 + Retry-After)",
    "max_response_chars": "characters per response text (more -> 413)",
    "retry_after_s": "Retry-After seconds on 503",
    "protocol": "default protocol: decoupled | rlcr",
    "w_brier": "default Brier weight (finite)",
    "w_fmt": "default format weight (finite)",
    "w_vis": "default visual-term weight (finite)",
    "reference_parity": "default to the authors' reward (off unless given): --reference-parity [true|false]",
    "log_level": "uvicorn log level",
    "shutdown_grace_s": "seconds in-flight requests get after SIGTERM before exit (unfinished: 503)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per ServerSettings field (default None = take env var or default).

    A bool field's flag alone means true (``--reference-parity``) and also takes a value
    (``--reference-parity false``).
    """
    for f in fields(ServerSettings):
        flag = "--" + f.name.replace("_", "-")
        env = ENV_PREFIX + f.name.upper()
        kind = _field_type(f.name)
        extra: dict[str, Any] = {"nargs": "?", "const": True} if kind is parse_bool else {}
        parser.add_argument(
            flag, dest=f.name, type=kind, default=None, help=f"{_HELP[f.name]} [env {env}]", **extra
        )


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(text: str) -> bool:
    """'1/true/yes/on' → True, '0/false/no/off' → False (any case); anything else is a ValueError.

    ``bool("false")`` is True, which is why bool settings need their own parser.
    """
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (use one of {sorted(_TRUE | _FALSE)})")


def _field_type(name: str):
    default = ServerSettings().__dict__[name]
    return parse_bool if isinstance(default, bool) else type(default)


def from_args(
    args: argparse.Namespace | None = None, environ: dict[str, str] | None = None
) -> ServerSettings:
    """Resolve settings: flag (if given) > ``VLCAL_RS_<FIELD>`` env var > default; then validate."""
    environ = dict(os.environ if environ is None else environ)
    values: dict[str, Any] = {}
    for f in fields(ServerSettings):
        flag_value = getattr(args, f.name, None) if args is not None else None
        if flag_value is not None:
            values[f.name] = flag_value
            continue
        env = ENV_PREFIX + f.name.upper()
        if env in environ:
            kind = _field_type(f.name)
            try:
                values[f.name] = kind(environ[env])
            except ValueError as err:
                name = "bool" if kind is parse_bool else kind.__name__
                raise ValueError(f"{env}={environ[env]!r} is not a valid {name}") from err
    return ServerSettings(**values).validate()
