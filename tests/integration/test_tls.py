"""TLS and mutual TLS on a gRPC port, and the router and HTTP gateway dialing TLS workers, with certificates
generated for the test by openssl."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from fastapi.testclient import TestClient
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from personalize.errors import InvalidArgument
from personalize.routing.membership import Heartbeat, MembershipConfig, NodeInfo, membership_client
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.gen.personalize.v1 import personalize_pb2_grpc as pb_grpc
from personalize_service.http import GatewayConfig, create_app
from personalize_service.http.serve import _Clients
from personalize_service.server.router import RouterConfig, worker_channel_opener
from personalize_service.server.tls import bind

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _signed(name: str, cn: str, ext: str, cwd: Path) -> None:
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-subj",
        f"/CN={cn}",
        "-out",
        f"{name}.csr",
        cwd=cwd,
    )
    (cwd / f"{name}.ext").write_text(ext)
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.pem",
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=personalize test CA",
        cwd=d,
    )
    _signed("server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n", d)
    _signed("client", "app-backend", "extendedKeyUsage=clientAuth\n", d)
    return d


def _serve(certs: Path, mutual: bool) -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = bind(
        server,
        "127.0.0.1:0",
        str(certs / "server.pem"),
        str(certs / "server.key"),
        str(certs / "ca.pem") if mutual else "",
    )
    server.start()
    try:
        yield port
    finally:
        server.stop(0)


def _check(port: int, credentials: grpc.ChannelCredentials | None) -> int:
    target = f"localhost:{port}"
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status


def test_tls_serves_clients_that_trust_the_ca_and_refuses_plaintext(certs: Path) -> None:
    for port in _serve(certs, mutual=False):
        trusted = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
        assert _check(port, trusted) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as raised:
            _check(port, None)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError):  # a client that does not trust our CA
            _check(port, grpc.ssl_channel_credentials((certs / "client.pem").read_bytes()))


def test_mutual_tls_needs_a_client_certificate_signed_by_the_ca(certs: Path) -> None:
    ca = (certs / "ca.pem").read_bytes()
    for port in _serve(certs, mutual=True):
        with pytest.raises(grpc.RpcError):
            _check(port, grpc.ssl_channel_credentials(ca))
        with_cert = grpc.ssl_channel_credentials(
            ca, (certs / "client.key").read_bytes(), (certs / "client.pem").read_bytes()
        )
        assert _check(port, with_cert) == health_pb2.HealthCheckResponse.SERVING


def test_misconfigured_tls_is_a_clear_error(certs: Path, tmp_path: Path) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    with pytest.raises(InvalidArgument, match="--tls-key"):
        bind(server, "127.0.0.1:0", str(certs / "server.pem"), "")
    with pytest.raises(InvalidArgument, match="cannot read"):
        bind(server, "127.0.0.1:0", str(tmp_path / "missing.pem"), str(tmp_path / "missing.key"))
    with pytest.raises(InvalidArgument, match="mutual TLS"):
        bind(server, "127.0.0.1:0", "", "", str(certs / "ca.pem"))


def _through_router_opener(port: int, config: RouterConfig) -> int:
    """Health.Check over the channel the router would open to a worker at localhost:port."""
    with worker_channel_opener(config)(f"localhost:{port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_the_router_dials_tls_workers_with_its_own_client_certificate(certs: Path) -> None:
    upstream = RouterConfig(
        upstream_ca=str(certs / "ca.pem"),
        upstream_cert=str(certs / "client.pem"),
        upstream_key=str(certs / "client.key"),
    )
    for port in _serve(certs, mutual=True):
        assert _through_router_opener(port, upstream) == health_pb2.HealthCheckResponse.SERVING
        for config in (RouterConfig(), RouterConfig(upstream_ca=str(certs / "ca.pem"))):  # plaintext; no cert
            with pytest.raises(grpc.RpcError) as raised:
                _through_router_opener(port, config)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(InvalidArgument, match="--upstream-key"):
        worker_channel_opener(RouterConfig(upstream_ca=str(certs / "ca.pem"), upstream_cert=str(certs / "client.pem")))


class _Greeter(pb_grpc.PersonalizeServicer):
    def Generate(self, request: Any, context: Any) -> pb.GenerateResponse:
        return pb.GenerateResponse(text=f"hi {request.user_id} over TLS", node_id="tls-worker", completion_tokens=1)


@pytest.mark.parametrize("on_ring", [True, False])
def test_the_gateway_dials_tls_workers_with_the_routers_settings(certs: Path, valkey_url: str, on_ring: bool) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_PersonalizeServicer_to_server(_Greeter(), server)
    port = bind(server, "127.0.0.1:0", str(certs / "server.pem"), str(certs / "server.key"), str(certs / "ca.pem"))
    server.start()
    namespace = f"tls{uuid.uuid4().hex[:10]}"
    membership = MembershipConfig(namespace=namespace, ttl_s=30.0, heartbeat_s=0.2)
    node = NodeInfo("tls-worker", f"127.0.0.1:{port}", 4.0)
    beat = Heartbeat(membership_client(valkey_url), membership, node).start()
    mutual = RouterConfig(
        upstream_ca=str(certs / "ca.pem"),
        upstream_cert=str(certs / "client.pem"),
        upstream_key=str(certs / "client.key"),
    )
    where: dict[str, Any] = {"registry_url": valkey_url} if on_ring else {"target": f"localhost:{port}"}
    try:
        for upstream, status in (
            (mutual, 200),
            (RouterConfig(), 503),
            (RouterConfig(upstream_ca=mutual.upstream_ca), 503),
        ):
            clients = _Clients(GatewayConfig(**where, namespace=namespace, upstream=upstream, timeout=10.0))
            try:
                with TestClient(create_app(clients, "tiny", probe=clients.probe)) as http:
                    reply = http.post("/v1/completions", json={"prompt": "Hi", "user": "alice"})
            finally:
                clients.close()
            assert reply.status_code == status, (upstream, reply.text)
            if status == 200:
                assert reply.json()["choices"][0]["text"] == "hi alice over TLS"
            else:
                assert reply.json()["error"]["type"] == "service_unavailable"
    finally:
        beat.stop()
        server.stop(None)
