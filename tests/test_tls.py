"""TLS and mutual TLS: client -> mobile and tier -> tier, with certificates generated at test time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from shared.client import TierClient, health_status
from shared.contract.manifest import load_manifest
from shared.tools.processes import TierCluster, running_tiers
from shared.wire.codec import encode_tensors
from shared.wire.rpc import pb2, pb2_grpc
from shared.wire.tls import ClientTLS, secure_or_insecure_channel
from tests.certs import PKI, make_pki

TO_THE_CLOUD = {"mobile": 1.01, "edge": 1.01}  # every sample goes through all three tiers


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def trusted(pki: PKI) -> ClientTLS:
    return ClientTLS(ca=pki.ca, cert=pki.client.cert, key=pki.client.key)


@pytest.fixture(scope="module")
def cluster(tiny_artifacts: Path, pki: PKI, trusted: ClientTLS) -> Iterator[TierCluster]:
    """All three tiers serve mutual TLS; mobile and edge call the next tier with the client certificate."""
    serve = {"tls_cert": pki.server.cert, "tls_key": pki.server.key, "tls_client_ca": pki.ca}
    call_next = {"next_tls_ca": pki.ca, "next_tls_cert": pki.client.cert, "next_tls_key": pki.client.key}
    flags = {"mobile": {**serve, **call_next}, "edge": {**serve, **call_next}, "cloud": serve}
    with running_tiers(tiny_artifacts, flags=flags, health_tls=trusted) as started:
        yield started


def test_a_client_with_a_trusted_certificate_is_served_through_all_tiers(
        cluster: TierCluster, trusted: ClientTLS) -> None:
    with TierClient(cluster.entry_address, timeout=10, tls=trusted) as client:
        answers = client.classify(["a good film", "dull plot"], thresholds=TO_THE_CLOUD)
    assert [a.tier for a in answers] == ["cloud", "cloud"]
    assert not any(a.degraded for a in answers), [a.degraded_reason for a in answers]
    assert [t.tier for t in answers[0].timings] == ["mobile", "edge", "cloud"]


@pytest.mark.parametrize("case", ["no client certificate", "certificate from an untrusted CA", "plaintext"])
def test_a_client_without_a_trusted_certificate_is_refused(
        cluster: TierCluster, pki: PKI, case: str) -> None:
    tls = {"no client certificate": ClientTLS(ca=pki.ca),
           "certificate from an untrusted CA": ClientTLS(ca=pki.ca, cert=pki.rogue_client.cert,
                                                         key=pki.rogue_client.key),
           "plaintext": None}[case]
    with TierClient(cluster.entry_address, timeout=5, tls=tls) as client, pytest.raises(grpc.RpcError) as caught:
        client.classify(["a good film"])
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_server_refuses_it(cluster: TierCluster, pki: PKI) -> None:
    impostor_check = ClientTLS(ca=pki.rogue_ca, cert=pki.client.cert, key=pki.client.key)
    with TierClient(cluster.entry_address, timeout=5, tls=impostor_check) as client, \
            pytest.raises(grpc.RpcError) as caught:
        client.classify(["a good film"])
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_an_inner_tier_refuses_callers_without_a_trusted_certificate(
        cluster: TierCluster, pki: PKI, trusted: ClientTLS, tiny_artifacts: Path) -> None:
    manifest = load_manifest(tiny_artifacts)
    request = pb2.ContinueRequest(
        tensors=encode_tensors({"hidden": np.zeros((1, 3, manifest.hidden_size), np.float32),
                                "attention_mask": np.ones((1, 3), np.int64)}),
        request_ids=["tls/0"])
    edge = cluster.tiers["edge"].address
    with secure_or_insecure_channel(edge, [], trusted) as channel:
        assert len(pb2_grpc.ContinuationStub(channel).Continue(request, timeout=10).answers) == 1
    with secure_or_insecure_channel(edge, [], ClientTLS(ca=pki.ca)) as channel, \
            pytest.raises(grpc.RpcError) as caught:
        pb2_grpc.ContinuationStub(channel).Continue(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert health_status(edge, tls=trusted) == "SERVING"
    assert health_status(edge) == "UNREACHABLE"  # plaintext is not spoken there
