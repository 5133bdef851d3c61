"""Node settings: pydantic-settings, one class per node kind, environment + command-line flags.

Precedence: flags > environment (TIERSERVE_MOBILE_*, _EDGE_*, _CLOUD_*) > defaults.
Defaults run locally: mobile 127.0.0.1:50051 -> edge :50052 -> cloud :50053, metrics 9101..9103.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.manifest import TIERS, Tier

MiB = 1 << 20


class TierSettings(BaseSettings):
    """What every tier needs; subclasses fix the tier, its env prefix and local defaults."""

    model_config = SettingsConfigDict(extra="forbid")
    tier: ClassVar[Tier]
    listen: str = Field(description="host:port to serve gRPC on (port 0: any free port)")
    artifacts: Path = Field(Path("artifacts/default"), description="the built model's folder")
    metrics_port: int = Field(description="Prometheus /metrics HTTP port (0: no metrics server)")
    metrics_addr: str = Field("127.0.0.1", description="address the metrics server binds")
    max_batch: int = Field(256, ge=1, description="samples per request at most")
    max_message_bytes: int = Field(64 * MiB, ge=1024, description="gRPC message size limit")
    onnx_threads: int = Field(1, ge=1, description="onnxruntime intra-op threads")
    grace_seconds: float = Field(5.0, ge=0, description="time to finish in-flight RPCs on SIGTERM")


class ForwardingSettings(TierSettings):
    """A tier with a next tier and an exit that may answer early."""

    next: str = Field(description="host:port of the next tier")
    threshold: float | None = Field(
        None, ge=0, description="override of this tier's exit threshold (above 1: never answer)")
    hop_timeout: float = Field(
        10.0, gt=0, description="deadline, seconds, for the call to the next tier")


class MobileSettings(ForwardingSettings):
    model_config = SettingsConfigDict(env_prefix="TIERSERVE_MOBILE_", extra="forbid")
    tier: ClassVar[Tier] = "mobile"
    listen: str = "127.0.0.1:50051"
    next: str = "127.0.0.1:50052"
    metrics_port: int = 9101
    max_text_chars: int = Field(10_000, ge=1, description="characters per text at most")


class EdgeSettings(ForwardingSettings):
    model_config = SettingsConfigDict(env_prefix="TIERSERVE_EDGE_", extra="forbid")
    tier: ClassVar[Tier] = "edge"
    listen: str = "127.0.0.1:50052"
    next: str = "127.0.0.1:50053"
    metrics_port: int = 9102


class CloudSettings(TierSettings):
    model_config = SettingsConfigDict(env_prefix="TIERSERVE_CLOUD_", extra="forbid")
    tier: ClassVar[Tier] = "cloud"
    listen: str = "127.0.0.1:50053"
    metrics_port: int = 9103


SETTINGS_BY_TIER: dict[str, type[TierSettings]] = {
    "mobile": MobileSettings, "edge": EdgeSettings, "cloud": CloudSettings,
}
assert tuple(SETTINGS_BY_TIER) == TIERS


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type[TierSettings]) -> None:
    """One --flag per settings field; unset flags leave env/defaults alone."""
    for name, field in cls.model_fields.items():
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, default=None, metavar=name.upper(),
            help=f"{_description(cls, name)}; default {field.default} "
                 f"(env {cls.model_config['env_prefix']}{name.upper()})")


def _description(cls: type[TierSettings], name: str) -> str:
    # a subclass that only changes a default drops the base field's description
    for base in cls.__mro__:
        field = getattr(base, "model_fields", {}).get(name)
        if field is not None and field.description:
            return field.description
    return name


def settings_from_args(cls: type[TierSettings], args: argparse.Namespace,
                       parser: argparse.ArgumentParser | None = None) -> TierSettings:
    """Settings from parsed flags over the environment; bad values end in parser.error if given."""
    given: dict[str, Any] = {
        name: value for name in cls.model_fields
        if (value := getattr(args, name, None)) is not None
    }
    try:
        return cls(**given)
    except ValidationError as exc:
        if parser is None:
            raise
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        parser.error(f"invalid settings ({cls.model_config['env_prefix']}* or flags): {problems}")


def parse_settings(tier: str, argv: Sequence[str] | None = None) -> TierSettings:
    """Settings for `tier` from the environment and flags (`python -m edge_node --listen ...`)."""
    cls = SETTINGS_BY_TIER[tier]
    parser = argparse.ArgumentParser(prog=f"{tier}_node", description=f"tierserve {tier} tier")
    add_settings_arguments(parser, cls)
    return settings_from_args(cls, parser.parse_args(argv), parser)
