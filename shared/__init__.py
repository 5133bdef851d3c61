"""tierserve common library: one home per concept (manifest, codec, calibration, tier loop, ...)."""

import os

__version__ = "0.1.0"

# gRPC's EventEngine (on by default in grpcio 1.85) reads sockets on its own threads and hands each
# event over to the thread polling the completion queue: one thread wake-up more per message than
# the older polling engine (README, "Streams of calls"). gRPC reads GRPC_EXPERIMENTS once, when the
# grpc package is imported, so it is set here: every module of tierserve that uses grpc is imported
# through this package, in the tiers, the CLI, the benches and the clients alike. A process that
# imports grpc before tierserve, or sets GRPC_EXPERIMENTS itself, keeps its own setting.
LOW_LATENCY_EXPERIMENTS = "-event_engine_client,-event_engine_listener"
os.environ.setdefault("GRPC_EXPERIMENTS", LOW_LATENCY_EXPERIMENTS)
