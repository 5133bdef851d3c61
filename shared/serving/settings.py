"""Node settings: pydantic-settings, one class per node kind, environment + command-line flags.

Precedence: flags > environment (TIERSERVE_MOBILE_*, _EDGE_*, _CLOUD_*) > defaults.
Defaults run locally: mobile 127.0.0.1:50051 -> edge :50052 -> cloud :50053, metrics 9101..9103.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.contract.manifest import TIERS, Tier
from shared.serving.placement import format_cpu_list, parse_cpu_list
from shared.wire.targets import check_listen, grpc_target
from shared.wire.tls import ClientTLS

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
    slice_workers: int = Field(
        1, ge=1, description="slice runs at once, each on its own worker thread with onnx_threads threads "
        "(batches of concurrent requests run side by side)")
    onnx_spinning: bool = Field(
        False, description="let idle onnxruntime threads spin: lower latency on a dedicated machine, wasted "
        "cores where tiers share one (with onnx_threads > 1)")
    max_batch_size: int = Field(
        32, ge=1, description="dynamic batching: samples of concurrent requests merged into one slice run "
        "at most (1: no batching)")
    max_queue_delay_ms: float = Field(
        0.0, ge=0, description="dynamic batching: how long a request may wait for others while the slice "
        "is idle (0: none; requests queued while it runs are merged anyway)")
    inline_max_samples: int = Field(
        4, ge=0, description="a request of at most this many samples runs on the event loop's thread when the "
        "tier is idle (no hand-off to the worker thread and back; 0: always the worker thread)")
    cpus: str | None = Field(
        None, description="the CPUs this tier runs on, a Linux CPU list such as 0 or 2-3 (every thread, the "
        "slice's included; Linux only); unset: any. Where the tiers share a machine, the entry tier does best on "
        "cores of its own (shared.serving.placement.spread)")
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto", description="the tier's event loop: uvloop (libuv, in C: each hop's hand-offs and task "
        "switches cost less), asyncio (the standard library's), auto: uvloop where it is installed")
    grace_seconds: float = Field(5.0, ge=0, description="time to finish in-flight RPCs on SIGTERM")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="the least severe log level shown")
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines as plain text, or one JSON object per line (time, level, tier, logger, "
        "message) for a log collector")
    reflection: bool = Field(
        True, description="serve gRPC server reflection (v1 and v1alpha), listing the services this tier serves")
    reuse_port: bool = Field(
        False, description="let several processes listen on the same port (SO_REUSEPORT); off: a port in use "
        "is an error at start")
    max_connection_age_s: float = Field(
        30.0, ge=0, description="close each client connection gracefully after this long (0: never), so that "
        "clients re-resolve and spread calls onto replicas started since")
    max_connection_age_grace_s: float = Field(
        5.0, ge=0, description="time calls in flight on a connection being closed for its age get to finish")
    max_inflight_samples: int = Field(
        512, ge=1, description="samples (texts, images, forwarded rows) handled at once at most; a request "
        "beyond it gets RESOURCE_EXHAUSTED at once")
    tls_cert: Path | None = Field(None, description="PEM server certificate: serve TLS (with tls_key)")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA that client certificates must be signed by: mutual TLS")
    inject_delay_ms: float = Field(
        0.0, ge=0, description="test hook, never in production: sleep this long before answering Continue")

    @field_validator("listen")
    @classmethod
    def _listen_address(cls, value: str) -> str:
        return check_listen(value)  # AddressError (a ValueError) says what is wrong

    @field_validator("cpus")
    @classmethod
    def _cpu_list(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return format_cpu_list(parse_cpu_list(value))  # ValueError says what is wrong

    @model_validator(mode="after")
    def _a_full_request_fits(self) -> TierSettings:
        if self.max_inflight_samples < self.max_batch:
            raise ValueError(f"max_inflight_samples ({self.max_inflight_samples}) must be at least max_batch "
                             f"({self.max_batch}), or a full request could never be admitted")
        return self

    @model_validator(mode="after")
    def _tls_files_come_in_pairs(self) -> TierSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        return self


class ForwardingSettings(TierSettings):
    """A tier with a next tier and an exit that may answer early."""

    next: str = Field(description="the next tier: host:port, a list of replicas ip:port,ip:port, a DNS name "
                      "resolving to every replica, or a gRPC target URI; calls are balanced round_robin over "
                      "the replicas reporting SERVING")
    next_reresolve_ms: int = Field(
        500, ge=100, description="how often at most the next tier's DNS name is resolved again when a replica "
        "goes away (gRPC's default is 30 s: a replica restarted at a new address would wait that long)")
    threshold: float | None = Field(
        None, ge=0, description="override of this tier's exit threshold (above 1: never answer)")
    hop_timeout: float = Field(
        10.0, gt=0, description="deadline, seconds per hop after this tier, for a call to the next tier at most "
        "(and until the hop's time has been measured)")
    min_hop_timeout: float = Field(
        1.0, gt=0, description="deadline, seconds per hop after this tier, for a call to the next tier at least; "
        "between the two, ten times the hop's recent time per sample, so that a partitioned next tier is given up "
        "on quickly")
    coalesce_forwards: bool = Field(
        True, description="the forwards of requests that leave this tier together (one batched slice run) go "
        "to the next tier as one call: fewer gRPC calls for both tiers under load; each request keeps its own "
        "deadline and answers (false: a call per request)")
    forward_encoding: Literal["fp32", "fp16", "int8", "int8_tensor", "int4"] = Field(
        "fp32", description="hidden state sent to the next tier as fp32, fp16, int8 with a scale per token, "
        "int8 with one scale per tensor, or int4 with a scale per 32 values (for slow links: about half of "
        "int8's bytes, more rounding) (the attention mask always goes as lengths)")
    deadline_margin_ms: float = Field(
        10.0, ge=0, description="time kept back from the caller's deadline to answer degraded in time, at least "
        "(and at least 5% of the time left; the entry tier keeps more: its answer still crosses to the client)")
    audit_fraction: float = Field(
        0.02, ge=0, le=1, description="share of the samples reaching this exit (answered or forwarded) also "
        "continued to the final exit in the background, to measure the exit's agreement with it; picked at random, "
        "never more than this share of the samples seen so far (0: no audits)")
    audit_budget_samples: int = Field(
        8, ge=1, description="audited samples in flight at most; more are skipped (so are all while the tier is "
        "more than half full)")
    audit_window: int = Field(1000, ge=10, description="recent audits the agreement bound is computed over")
    audit_delta: float = Field(
        0.1, gt=0, lt=1, description="the agreement bound holds with probability 1 - audit_delta")
    agreement_target: float = Field(
        0.9, ge=0, le=1, description="agreement with the final exit this exit should keep; exported for the "
        "alert that fires when the bound falls below it")
    overload_threshold: float | None = Field(
        None, ge=0, description="opt-in: while the next tier is overloaded (it refused for load or answered too "
        "late within the last second, or its breaker is open), this exit answers at this lower threshold; those "
        "answers are flagged degraded, saying so. Choose it for the accuracy you accept under load, e.g. from "
        "`tierserve retune --policy p_tar --p-tar X` on a copy")
    threshold_controller: bool = Field(
        False, description="let this exit's threshold follow the traffic: the lowest threshold whose audited "
        "agreement with the final exit meets agreement_target (with probability 1 - audit_delta), moved in bounded "
        "steps (shared.serving.controller); needs audits")
    controller_floor: float = Field(0.5, ge=0, description="the controller's lowest threshold")
    controller_ceiling: float = Field(
        1.0, ge=0, description="the controller's highest threshold (above 1: it may stop the exit answering)")
    controller_max_raise: float = Field(
        0.05, gt=0, description="the controller's largest rise per update (it rises faster than it falls: a "
        "threshold too low breaks the agreement target, one too high only costs the next tiers' work)")
    controller_max_lower: float = Field(0.02, gt=0, description="the controller's largest fall per update")
    controller_every: int = Field(200, ge=1, description="audits between two updates of the controller")
    controller_window: int = Field(2000, ge=10, description="recent audits the controller searches over")
    controller_min_samples: int = Field(300, ge=1, description="audits the controller waits for before moving")
    forward_attempts: int = Field(
        3, ge=1, description="calls to the next tier at most per batch (retries on UNAVAILABLE only)")
    retry_base_ms: float = Field(10.0, ge=0, description="backoff before the first retry (full jitter)")
    retry_max_ms: float = Field(200.0, ge=0, description="backoff between retries at most")
    breaker_failures: int = Field(
        5, ge=1, description="consecutive failures of the next tier that open its circuit breaker")
    breaker_cooldown_s: float = Field(
        0.25, ge=0, description="time an open breaker waits before letting one probe call through")
    reconnect_max_ms: int = Field(
        250, ge=10, description="gRPC reconnect backoff to the next tier at most")
    next_tls: bool = Field(False, description="TLS to the next tier (implied by next_tls_ca / next_tls_cert)")
    next_tls_ca: Path | None = Field(None, description="PEM CA that verifies the next tier's certificate")
    next_tls_cert: Path | None = Field(None, description="PEM client certificate for mutual TLS to the next tier")
    next_tls_key: Path | None = Field(None, description="PEM private key of next_tls_cert")
    next_tls_server_name: str | None = Field(
        None, description="name expected in the next tier's certificate, if not its host")

    @field_validator("next")
    @classmethod
    def _next_target(cls, value: str) -> str:
        grpc_target(value)  # AddressError (a ValueError) says what is wrong
        return value.strip()

    @model_validator(mode="after")
    def _controller_needs_audits(self) -> ForwardingSettings:
        if self.threshold_controller and self.audit_fraction == 0:
            raise ValueError("threshold_controller learns from audits: set audit_fraction above 0")
        if self.controller_floor > self.controller_ceiling:
            raise ValueError(f"controller_floor {self.controller_floor} is above controller_ceiling "
                             f"{self.controller_ceiling}")
        return self

    @model_validator(mode="after")
    def _next_tls_files_come_in_pairs(self) -> ForwardingSettings:
        if (self.next_tls_cert is None) != (self.next_tls_key is None):
            raise ValueError("next_tls_cert and next_tls_key go together")
        return self

    def next_client_tls(self) -> ClientTLS | None:
        """TLS to the next tier, or None for plaintext."""
        if not (self.next_tls or self.next_tls_ca or self.next_tls_cert):
            return None
        return ClientTLS(self.next_tls_ca, self.next_tls_cert, self.next_tls_key, self.next_tls_server_name)


class MobileSettings(ForwardingSettings):
    model_config = SettingsConfigDict(env_prefix="TIERSERVE_MOBILE_", extra="forbid")
    tier: ClassVar[Tier] = "mobile"
    listen: str = "127.0.0.1:50051"
    next: str = "127.0.0.1:50052"
    metrics_port: int = 9101
    deadline_margin_ms: float = 20.0
    max_text_chars: int = Field(10_000, ge=1, description="characters per text at most")
    label_memory: int = Field(
        100_000, ge=0, description="recent answers remembered for ReportLabels (true labels reported by clients "
        "give each exit's live accuracy); 0: none")
    model_name: str = Field(
        "tierserve", min_length=1, description="the model's name in the Open Inference Protocol")


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
            help=(f"{_description(cls, name)}; default {field.default} "  # argparse formats help with %
                  f"(env {cls.model_config['env_prefix']}{name.upper()})").replace("%", "%%"))


def _description(cls: type[TierSettings], name: str) -> str:
    # a subclass that only changes a default drops the base field's description
    for base in cls.__mro__:
        field = getattr(base, "model_fields", {}).get(name)
        if field is not None and field.description:
            return field.description
    return name


# what Kubernetes injects for a Service (unless enableServiceLinks is off) and Docker for a link: a Service
# named tierserve-edge gives TIERSERVE_EDGE_SERVICE_HOST, TIERSERVE_EDGE_PORT_50052_TCP_ADDR, ...
_SERVICE_LINK = re.compile(
    r"(^|_)(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)$")


def _service_link(suffix: str, value: str) -> bool:
    """A name Kubernetes or Docker injects; a bare <...>_PORT only with its value's form (tcp://host:port), so
    that a misspelt setting ending in _PORT (METRIC_PORT=9102) is still caught."""
    found = _SERVICE_LINK.search(suffix)
    if found is None:
        return False
    return found.group(2) != "PORT" or value.lower().startswith(("tcp://", "udp://", "sctp://"))


def unknown_environment(cls: type[TierSettings], environ: Mapping[str, str] | None = None) -> list[str]:
    """Variables named with this tier's prefix that are no setting of it, each with the nearest setting's
    name where one is close: pydantic-settings ignores them, so a typo would silently leave a default.
    Names of the form a cluster injects for its services (_SERVICE_LINK) are not counted."""
    prefix = str(cls.model_config["env_prefix"])
    known = [prefix + name.upper() for name in cls.model_fields]
    unknown = []
    env = os.environ if environ is None else environ
    for name in sorted(env):
        upper = name.upper()
        if upper.startswith(prefix) and upper not in known and not _service_link(upper[len(prefix):], env[name]):
            near = difflib.get_close_matches(upper, known, n=1)
            unknown.append(name + (f" (did you mean {near[0]}?)" if near else ""))
    return unknown


def settings_from_args(cls: type[TierSettings], args: argparse.Namespace,
                       parser: argparse.ArgumentParser | None = None) -> TierSettings:
    """Settings from parsed flags over the environment; bad values, and variables with the tier's prefix
    that name no setting, end in parser.exit(2) if a parser is given (else ValidationError, ValueError)."""
    unknown = unknown_environment(cls)
    if unknown:
        message = (f"{', '.join(unknown)} in the environment: no setting of the {cls.tier} tier (its settings are "
                   f"{cls.model_config['env_prefix']}<FLAG> for the flags in --help)")
        if parser is None:
            raise ValueError(message)
        parser.exit(2, f"{parser.prog}: {message}\n")
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
        # one line, without argparse's usage text (it lists every flag)
        parser.exit(2, f"{parser.prog}: invalid settings ({cls.model_config['env_prefix']}* or flags): {problems}\n")


def parse_settings(tier: str, argv: Sequence[str] | None = None) -> TierSettings:
    """Settings for `tier` from the environment and flags (`python -m edge_node --listen ...`)."""
    cls = SETTINGS_BY_TIER[tier]
    parser = argparse.ArgumentParser(prog=f"{tier}_node", description=f"tierserve {tier} tier")
    add_settings_arguments(parser, cls)
    return settings_from_args(cls, parser.parse_args(argv), parser)
