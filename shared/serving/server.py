"""Start a tier: settings -> gRPC server (the tier's service, health, reflection, and at the entry
tier the Open Inference Protocol) -> load the slice -> SERVING. SIGTERM/SIGINT: NOT_SERVING at
once (clients' health checks move calls to other replicas), stop new RPCs, and let in-flight ones
finish within the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from shared.contract.manifest import TIERS, load_manifest, verified_slice_path
from shared.contract.text import TextEncoder
from shared.errors import TierServeError
from shared.serving.admission import WorkLimit
from shared.serving.audit import Auditor
from shared.serving.batching import Batcher
from shared.serving.controller import ThresholdController
from shared.serving.logs import configure_logging
from shared.serving.metrics import TierMetrics
from shared.serving.next_tier import CircuitBreaker, ContinuationClient, GuardedNextTier, HopDeadline, RetryPolicy
from shared.serving.placement import parse_cpu_list, pin_process
from shared.serving.process import exit_with_parent
from shared.serving.runner import SliceRunner
from shared.serving.servicers import ClassifierServicer, ContinuationServicer, TierServicer
from shared.serving.settings import ForwardingSettings, MobileSettings, TierSettings, parse_settings
from shared.serving.status import StatusInterceptor
from shared.serving.tier import TierLoop
from shared.wire.rpc import pb2, pb2_grpc, server_options
from shared.wire.tls import server_credentials

log = logging.getLogger("tierserve.server")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
WORK_METHODS = ("Classify", "Continue", "ModelInfer", "ModelMetadata")  # durations and failures recorded
NEXT_TIER_START_WAIT = 5.0  # seconds a tier waits for its next tier at start before warning


def guarded_next_tier(settings: ForwardingSettings) -> GuardedNextTier:
    """The client of the next tier behind retries and a circuit breaker, as configured."""
    client = ContinuationClient(settings.next, settings.max_message_bytes, settings.next_client_tls(),
                                settings.reconnect_max_ms, settings.next_reresolve_ms)
    retry = RetryPolicy(settings.forward_attempts, settings.retry_base_ms / 1000, settings.retry_max_ms / 1000)
    breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_cooldown_s)
    next_name = TIERS[TIERS.index(settings.tier) + 1]
    # a call covers every hop after this tier: the next tier's own deadline for its hop must end
    # first, so that it still answers (degraded) before this tier gives up on it
    hops = len(TIERS) - 1 - TIERS.index(settings.tier)
    return GuardedNextTier(client, next_name, retry, breaker, hop_deadline=HopDeadline(
        settings.hop_timeout * hops, settings.min_hop_timeout * hops))


def _load(settings: TierSettings, metrics: TierMetrics, next_tier: GuardedNextTier | None,
          admission: WorkLimit) -> tuple[TierLoop, TextEncoder | None]:
    """Read the manifest, verify and open this tier's slice (blocking: run it in a thread)."""
    manifest = load_manifest(settings.artifacts)
    spec = manifest.slice(settings.tier)
    runner = SliceRunner(verified_slice_path(settings.artifacts, spec), spec, settings.onnx_threads,
                         workers=settings.slice_workers, spinning=settings.onnx_spinning,
                         max_sequence=manifest.max_length)
    batcher = None
    if settings.max_batch_size > 1:
        batcher = Batcher(runner, settings.max_batch_size, settings.max_queue_delay_ms / 1000, metrics,
                          inline_max_samples=settings.inline_max_samples, alone=lambda: admission.calls <= 1,
                          concurrency=settings.slice_workers)
    forwarding = settings if isinstance(settings, ForwardingSettings) else None
    auditor = None
    if forwarding is not None and next_tier is not None and forwarding.audit_fraction > 0:
        controller = None
        if forwarding.threshold_controller:
            start = forwarding.threshold if forwarding.threshold is not None else manifest.exit(settings.tier).threshold
            controller = ThresholdController.from_settings(settings.tier, metrics, start, forwarding)
        auditor = Auditor(settings.tier, metrics, next_tier.client.continue_batch, forwarding.audit_fraction,
                          forwarding.audit_budget_samples, forwarding.audit_window, forwarding.audit_delta,
                          controller=controller)
        metrics.series.agreement_target.set(forwarding.agreement_target)
    loop = TierLoop(
        manifest, settings.tier, runner, metrics, next_tier, batcher=batcher,
        forward_encoding=forwarding.forward_encoding if forwarding else "fp32",
        coalesce_forwards=forwarding.coalesce_forwards if forwarding else False,
        threshold_override=forwarding.threshold if forwarding else None,
        deadline_margin=forwarding.deadline_margin_ms / 1000 if forwarding else 0.0,
        auditor=auditor, load=lambda: admission.current / admission.limit,
        overload_threshold=forwarding.overload_threshold if forwarding else None,
        next_overloaded=next_tier.overloaded if next_tier is not None else lambda: False)
    metrics.series.exit_threshold.set(loop.threshold({}) if next_tier is not None else 0.0)
    encoder = None
    if isinstance(settings, MobileSettings) and manifest.family == "text":
        encoder = TextEncoder.for_manifest(manifest, settings.artifacts)
    return loop, encoder


def enable_reflection(server: grpc.aio.Server, services: Sequence[str]) -> None:
    """gRPC server reflection listing `services`, as v1alpha (grpcio-reflection's) and v1: the two
    protocols differ only in their package name, so v1 is the same servicer under its own name."""
    servicer = reflection.aio.ReflectionServicer((*services, reflection.SERVICE_NAME, REFLECTION_V1))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    info = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": info}),))


def _bind(server: grpc.aio.Server, settings: TierSettings) -> int:
    """Listen on settings.listen; a port in use (or an address not on this machine) is an error."""
    try:
        if settings.tls_cert is not None and settings.tls_key is not None:
            return server.add_secure_port(settings.listen, server_credentials(
                settings.tls_cert, settings.tls_key, settings.tls_client_ca))
        return server.add_insecure_port(settings.listen)
    except RuntimeError as exc:
        sharing = "" if settings.reuse_port else " (set reuse_port to share a port between processes on purpose)"
        raise TierServeError(f"the {settings.tier} tier cannot listen on {settings.listen}: the port is in use "
                             f"or the address is not one of this machine's{sharing} ({exc})") from None


async def _next_tier_reachable(next_tier: GuardedNextTier, tier: str) -> None:
    """Wait (bounded) until a replica of the next tier is connected and SERVING; else a WARNING
    naming it. The tier reports SERVING after this, so its first answers are not degraded merely
    because its channel was still connecting; a next tier that stays away delays it no longer."""
    client = next_tier.client
    if isinstance(client, ContinuationClient) and not await client.wait_ready(NEXT_TIER_START_WAIT):
        log.warning("%s tier: no replica of the %s tier at %s (%s) is reachable and SERVING after %.0f s; "
                    "samples it should answer are answered degraded until one is", tier, next_tier.name,
                    client.address, client.target, NEXT_TIER_START_WAIT)


async def serve(settings: TierSettings, stop: asyncio.Event) -> None:
    """Serve one tier until `stop` is set, then shut down gracefully."""
    tier = settings.tier
    metrics = TierMetrics(tier)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, settings.metrics_addr)
    admission = WorkLimit(settings.max_inflight_samples, tier)
    servicer: TierServicer
    if isinstance(settings, MobileSettings):
        servicer = ClassifierServicer(tier, metrics, settings.max_batch, admission, settings.max_text_chars)
        service = pb2.DESCRIPTOR.services_by_name["Classifier"].full_name
    else:
        servicer = ContinuationServicer(tier, metrics, settings.max_batch, admission,
                                        settings.inject_delay_ms / 1000)
        service = pb2.DESCRIPTOR.services_by_name["Continuation"].full_name
    services = [service]
    if isinstance(servicer, ClassifierServicer):  # the Open Inference Protocol beside Classify
        from shared.serving.oip import SERVICE_NAME as OIP_SERVICE  # only here: see shared.wire.stubs.inference_stubs
        services.append(OIP_SERVICE)
    server = grpc.aio.server(
        options=server_options(settings.max_message_bytes, settings.reuse_port, settings.max_connection_age_s,
                               settings.max_connection_age_grace_s),
        interceptors=[StatusInterceptor(metrics, tier, WORK_METHODS)])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if isinstance(servicer, ClassifierServicer):
        from shared.serving.oip import add_inference_service

        assert isinstance(settings, MobileSettings)
        pb2_grpc.add_ClassifierServicer_to_server(servicer, server)
        add_inference_service(server, servicer, settings.model_name, health_servicer)
    else:
        assert isinstance(servicer, ContinuationServicer)
        pb2_grpc.add_ContinuationServicer_to_server(servicer, server)
    if settings.reflection:
        enable_reflection(server, (*services, HEALTH_SERVICE))
    port = _bind(server, settings)
    for name in ("", *services):
        await health_servicer.set(name, NOT_SERVING)
    await server.start()
    host = settings.listen.rsplit(":", 1)[0]
    security = "mutual TLS" if settings.tls_client_ca else "TLS" if settings.tls_cert else "plaintext"
    log.info("%s tier listening on %s:%d, %s (metrics port %s)", tier, host, port, security,
             settings.metrics_port or "off")

    next_tier = None
    connecting: asyncio.Task[None] | None = None
    if isinstance(settings, ForwardingSettings):
        next_tier = guarded_next_tier(settings)
        log.info("%s tier forwards to %s (%s)", tier, next_tier.client.address,
                 getattr(next_tier.client, "target", next_tier.client.address))
        connecting = asyncio.create_task(_next_tier_reachable(next_tier, tier))  # while the model loads
    try:
        loop, encoder = await asyncio.to_thread(_load, settings, metrics, next_tier, admission)
        if isinstance(servicer, ClassifierServicer):
            assert isinstance(settings, MobileSettings)
            servicer.ready(loop, encoder, settings.label_memory)
        else:
            servicer.ready(loop)
        if connecting is not None:
            await connecting
        for name in ("", *services):
            await health_servicer.set(name, SERVING)
        log.info("%s tier serving %s", tier, settings.artifacts)
        await stop.wait()
        log.info("%s tier stopping: finishing in-flight requests (grace %.1fs)", tier,
                 settings.grace_seconds)
    finally:
        if connecting is not None:
            connecting.cancel()
        await health_servicer.enter_graceful_shutdown()
        await server.stop(settings.grace_seconds)
        if servicer.loop is not None and servicer.loop.auditor is not None:
            await servicer.loop.auditor.close()
        if servicer.loop is not None and servicer.loop.coalescer is not None:
            await servicer.loop.coalescer.close()
        if next_tier is not None:
            await next_tier.close()
        if servicer.loop is not None:
            servicer.loop.runner.close()
    log.info("%s tier stopped", tier)


async def _serve_until_signalled(settings: TierSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(settings, stop)


def run_event_loop(main: Coroutine[Any, Any, None], kind: str = "auto") -> None:
    """Run `main` to its end on the event loop TierSettings.event_loop names: uvloop (auto: where
    it is installed) or asyncio's own."""
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                main.close()
                raise TierServeError("event_loop is uvloop but the uvloop package is not installed: "
                                     "pip install uvloop, or set event_loop to asyncio") from None
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def run_tier(settings: TierSettings) -> int:
    """Serve a tier in this process until SIGTERM/SIGINT; the exit status."""
    configure_logging(settings.tier, settings.log_level, settings.log_format)
    exit_with_parent()
    try:
        if settings.cpus is not None:  # before the slice's and gRPC's threads start: they inherit it
            pin_process(parse_cpu_list(settings.cpus))
            log.info("%s tier pinned to CPUs %s", settings.tier, settings.cpus)
    except (OSError, ValueError) as exc:
        log.error("cannot pin the %s tier to CPUs %s: %s", settings.tier, settings.cpus, exc)
        return 2
    try:
        run_event_loop(_serve_until_signalled(settings), settings.event_loop)
    except TierServeError as exc:  # a broken or missing artifact or setting: say what, exit non-zero
        log.error("%s", exc)
        return 2
    return 0


def main(tier: str, argv: Sequence[str] | None = None) -> None:
    """Entry point of `python -m <tier>_node`: settings from env and flags, then serve."""
    sys.exit(run_tier(parse_settings(tier, argv)))
