"""The generic tier server: grpc.aio, health checking, reflection, metrics, graceful shutdown.

`run_tier(settings)` is all a node package calls. The server starts NOT_SERVING, loads and verifies
its slice, then reports SERVING; SIGTERM/SIGINT stop new RPCs and let in-flight ones finish
within the grace period.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared.contract.manifest import TIERS, load_manifest, verified_slice_path
from shared.contract.text import TextEncoder
from shared.errors import TierServeError
from shared.serving.batching import Batcher
from shared.serving.decoding import UndecodableRequests
from shared.serving.metrics import TierMetrics
from shared.serving.next_tier import ContinuationClient
from shared.serving.placement import parse_cpu_list, pin_process
from shared.serving.process import exit_with_parent
from shared.serving.resilience import CircuitBreaker, GuardedNextTier, InflightLimit, RetryPolicy
from shared.serving.runner import SliceRunner
from shared.serving.settings import ForwardingSettings, MobileSettings, TierSettings, parse_settings
from shared.serving.tier import ClassifierServicer, ContinuationServicer, TierLoop
from shared.wire.rpc import SERVICE_NAMES, pb2, pb2_grpc, server_options
from shared.wire.tls import server_credentials

log = logging.getLogger("tierserve.server")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def guarded_next_tier(settings: ForwardingSettings) -> GuardedNextTier:
    """The client of the next tier behind retries and a circuit breaker, as configured."""
    client = ContinuationClient(settings.next, settings.max_message_bytes, settings.next_client_tls(),
                                settings.reconnect_max_ms, transport=settings.forward_transport)
    retry = RetryPolicy(settings.forward_attempts, settings.retry_base_ms / 1000, settings.retry_max_ms / 1000)
    breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_cooldown_s)
    next_name = TIERS[TIERS.index(settings.tier) + 1]
    return GuardedNextTier(client, next_name, retry, breaker)


def _load(settings: TierSettings, metrics: TierMetrics, next_tier: GuardedNextTier | None,
          admission: InflightLimit) -> tuple[TierLoop, TextEncoder | None]:
    """Read the manifest, verify and open this tier's slice (blocking: run it in a thread)."""
    manifest = load_manifest(settings.artifacts)
    spec = manifest.slice(settings.tier)
    runner = SliceRunner(verified_slice_path(settings.artifacts, spec), spec, settings.onnx_threads,
                         workers=settings.slice_workers, spinning=settings.onnx_spinning)
    batcher = None
    if settings.max_batch_size > 1:
        batcher = Batcher(runner, settings.max_batch_size, settings.max_queue_delay_ms / 1000, metrics,
                          inline_max_samples=settings.inline_max_samples, alone=lambda: admission.current <= 1,
                          concurrency=settings.slice_workers)
    loop = TierLoop(
        manifest, settings.tier, runner, metrics, next_tier,
        batcher=batcher, forward_encoding=getattr(settings, "forward_encoding", "fp32"),
        threshold_override=getattr(settings, "threshold", None),
        hop_timeout=getattr(settings, "hop_timeout", 10.0),
        deadline_margin=getattr(settings, "deadline_margin_ms", 0.0) / 1000)
    encoder = None
    if isinstance(settings, MobileSettings) and manifest.family == "text":
        encoder = TextEncoder.for_manifest(manifest, settings.artifacts)
    return loop, encoder


async def serve(settings: TierSettings, stop: asyncio.Event) -> None:
    """Serve one tier until `stop` is set, then shut down gracefully."""
    tier = settings.tier
    metrics = TierMetrics(tier)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, settings.metrics_addr)
    server = grpc.aio.server(options=server_options(settings.max_message_bytes),
                             interceptors=[UndecodableRequests(metrics, tier)])
    servicer: ClassifierServicer | ContinuationServicer
    if isinstance(settings, MobileSettings):
        servicer = ClassifierServicer(tier, metrics, settings.max_batch, settings.max_text_chars)
        pb2_grpc.add_ClassifierServicer_to_server(servicer, server)
        service = pb2.DESCRIPTOR.services_by_name["Classifier"].full_name
    else:
        servicer = ContinuationServicer(tier, metrics, settings.max_batch)
        pb2_grpc.add_ContinuationServicer_to_server(servicer, server)
        service = pb2.DESCRIPTOR.services_by_name["Continuation"].full_name
    servicer.admission = InflightLimit(settings.max_inflight, tier)
    servicer.inject_delay = settings.inject_delay_ms / 1000
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    extra_services: list[str] = []
    if isinstance(servicer, ClassifierServicer):  # the Open Inference Protocol beside Classify
        from shared.serving.oip import (
            add_inference_service,  # imported here only: see shared.wire.stubs.inference_stubs
        )

        assert isinstance(settings, MobileSettings)
        extra_services.append(add_inference_service(server, servicer, settings.model_name, health_servicer))
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, *extra_services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    if settings.tls_cert is not None and settings.tls_key is not None:
        port = server.add_secure_port(settings.listen, server_credentials(
            settings.tls_cert, settings.tls_key, settings.tls_client_ca))
    else:
        port = server.add_insecure_port(settings.listen)
    for name in ("", service, *extra_services):
        await health_servicer.set(name, NOT_SERVING)
    await server.start()
    host = settings.listen.rsplit(":", 1)[0]
    security = "mutual TLS" if settings.tls_client_ca else "TLS" if settings.tls_cert else "plaintext"
    log.info("%s tier listening on %s:%d, %s (metrics port %s)", tier, host, port, security,
             settings.metrics_port or "off")

    next_tier = None
    if isinstance(settings, ForwardingSettings):
        next_tier = guarded_next_tier(settings)
    try:
        servicer.loop, encoder = await asyncio.to_thread(_load, settings, metrics, next_tier, servicer.admission)
        if isinstance(servicer, ClassifierServicer):
            servicer.encoder = encoder
        settle_garbage_collector()
        for name in ("", service, *extra_services):
            await health_servicer.set(name, SERVING)
        log.info("%s tier serving %s", tier, settings.artifacts)
        await stop.wait()
        log.info("%s tier stopping: finishing in-flight requests (grace %.1fs)", tier,
                 settings.grace_seconds)
    finally:
        await health_servicer.enter_graceful_shutdown()
        servicer.drain_streams()  # long-lived streams would hold stop() for the whole grace
        await server.stop(settings.grace_seconds)
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


# gen0 collects after this many allocations net (Python's default 700: every few requests)
GC_GEN0_THRESHOLD = 20_000


def settle_garbage_collector() -> None:
    """Once the model is loaded: freeze what exists (the model, tokeniser, grpc and library objects
    are never garbage; full collections stop walking them) and collect the young generation less
    often. A request allocates hundreds of objects per tier; with the defaults a collection ran on
    the hot path every few requests."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


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
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format=f"%(asctime)s {settings.tier} %(levelname)s %(name)s: %(message)s")
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
