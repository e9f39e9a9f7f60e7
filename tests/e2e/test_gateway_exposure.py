"""What the gateway offers to other machines, through a real Envoy: the dev sign-in answers this machine
only, the metrics listener serves metrics and nothing else of the admin interface, the admin interface is
not on the network, and the config (with the JWT secret) and log are the owner's alone.

A peer "on the network" is this machine's own non-loopback address: a connection to it carries that
address as its source, as one from another machine would, so no second machine or namespace is needed.
The clients ignore proxy settings of the environment: the address they connect from is the point.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from chat_service.dev_sign_in import SERVICE_NAME as DEV_SIGN_IN_SERVICE
from chat_service.dev_sign_in import DevSignInServicer
from chatmesh.common.auth import JwtKeys, verify_token
from chatmesh.common.loopback import PEER_ADDRESS_HEADER
from chatmesh.common.server import add_health_and_reflection, create_server, set_serving
from chatmesh.dev.v1 import dev_pb2, dev_pb2_grpc
from gateway import CHAT_SERVICE, EnvoyProcess, run_envoy, validate_settings
from tests.support.chat import TEST_SECRET
from tests.support.files import umask
from tests.support.processes import free_port
from tests.support.stack import gateway_settings

pytestmark = pytest.mark.e2e


def network_address() -> str:
    """An IPv4 address of this machine that is not loopback (the one its default route leaves from)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe, contextlib.suppress(OSError):
        probe.connect(("192.0.2.1", 9))  # UDP: picks the route, sends nothing
        address: str = probe.getsockname()[0]
        if not address.startswith("127."):
            return address
    for *_, sockaddr in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
        if not str(sockaddr[0]).startswith("127."):
            return str(sockaddr[0])
    pytest.fail("this machine has no IPv4 address besides loopback to play a peer on the network from")


@dataclass
class Exposed:
    envoy: EnvoyProcess
    replica_port: int
    listen_port: int
    metrics_port: int
    admin_port: int
    network: str


@pytest.fixture(scope="module")
async def exposed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Exposed]:
    # A chat replica's dev sign-in (the real servicer, error mapping and health), on every interface.
    server = create_server()
    dev_pb2_grpc.add_DevSignInServiceServicer_to_server(DevSignInServicer(JwtKeys.hs256(TEST_SECRET)), server)
    health = add_health_and_reflection(server, [DEV_SIGN_IN_SERVICE, CHAT_SERVICE])
    replica_port = server.add_insecure_port("0.0.0.0:0")
    await server.start()
    await set_serving(health, [DEV_SIGN_IN_SERVICE, CHAT_SERVICE])
    settings = gateway_settings([f"127.0.0.1:{replica_port}"], dev_sign_in=True, metrics_port=free_port())
    # The settings refuse the dev sign-in on every interface (tests/unit/test_exposure.py); the copy skips
    # that check to show that Envoy itself still answers loopback peers only, and that the metrics
    # listener and the admin interface are what they claim wherever Envoy listens.
    everywhere = settings.model_copy(update={"listen_host": "0.0.0.0", "metrics_host": "0.0.0.0"})
    try:
        # A permissive umask, as a shell's usual 022: the config must be private by itself.
        with umask(0o022):
            starting = run_envoy(everywhere, tmp_path_factory.mktemp("envoy"))
            envoy = await starting.__aenter__()
        try:
            assert settings.metrics_port is not None
            yield Exposed(
                envoy,
                replica_port,
                settings.listen_port,
                settings.metrics_port,
                settings.admin_port,
                network_address(),
            )
        finally:
            await starting.__aexit__(None, None, None)
    finally:
        await server.stop(None)


async def test_the_dev_sign_in_answers_this_machine_and_refuses_a_peer_on_the_network(
    exposed: Exposed,
) -> None:
    async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
        local = await http.post(f"http://127.0.0.1:{exposed.listen_port}/dev/sign-in", json={"user": "alice"})
        assert local.status_code == 200, local.text
        assert verify_token(JwtKeys.hs256(TEST_SECRET), local.json()["token"]) == "alice"
        # From the network, even claiming to be forwarded for loopback: Envoy goes by the connection.
        remote = await http.post(
            f"http://{exposed.network}:{exposed.listen_port}/dev/sign-in",
            json={"user": "alice"},
            headers={"x-forwarded-for": "127.0.0.1"},
        )
    assert remote.status_code == 403, remote.text
    assert remote.json()["code"] == "PERMISSION_DENIED"
    assert "own machine only" in remote.json()["message"]
    assert "token" not in remote.json()
    # The same route over native gRPC.
    async with grpc.aio.insecure_channel(f"{exposed.network}:{exposed.listen_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await dev_pb2_grpc.DevSignInServiceStub(channel).SignIn(
                dev_pb2.SignInRequest(user="alice"), timeout=10
            )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_the_replica_itself_refuses_a_caller_on_the_network(exposed: Exposed) -> None:
    # The second line, for a replica reachable without the gateway (or a gateway config without the rule).
    request = dev_pb2.SignInRequest(user="alice")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{exposed.replica_port}") as channel:
        stub = dev_pb2_grpc.DevSignInServiceStub(channel)
        assert (await stub.SignIn(request, timeout=10)).user == "alice"
        # The gateway forwarding a caller from the network says so (as it would without its own rule).
        with pytest.raises(grpc.aio.AioRpcError) as forwarded:
            await stub.SignIn(request, metadata=[(PEER_ADDRESS_HEADER, "198.51.100.7")], timeout=10)
    assert forwarded.value.code() == grpc.StatusCode.PERMISSION_DENIED
    async with grpc.aio.insecure_channel(f"{exposed.network}:{exposed.replica_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as direct:
            await dev_pb2_grpc.DevSignInServiceStub(channel).SignIn(request, timeout=10)
    assert direct.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "this machine only" in (direct.value.details() or "")


async def test_the_metrics_listener_serves_metrics_and_readiness_and_nothing_else_of_the_admin(
    exposed: Exposed,
) -> None:
    base = f"http://{exposed.network}:{exposed.metrics_port}"
    async with httpx.AsyncClient(base_url=base, timeout=10, trust_env=False) as http:
        metrics = await http.get("/stats/prometheus")
        assert metrics.status_code == 200
        assert "envoy_cluster_upstream_rq_total" in metrics.text
        ready = await http.get("/ready")
        assert (ready.status_code, ready.text.strip()) == (200, "LIVE")
        for method, path in [
            ("GET", "/config_dump"),
            ("GET", "/config_dump?include_eds"),
            ("POST", "/quitquitquit"),
            ("GET", "/quitquitquit"),
            ("POST", "/logging?level=trace"),
            ("POST", "/healthcheck/fail"),
            ("GET", "/clusters"),
            ("GET", "/"),
            ("POST", "/stats/prometheus"),
            ("GET", "/stats/prometheus/../../config_dump"),
            ("GET", "//config_dump"),
        ]:
            reply = await http.request(method, path)
            assert reply.status_code == 404, f"{method} {path}: {reply.status_code} {reply.text[:200]}"
        # An escaped slash is no way around the exact paths either.
        assert (await http.get("/stats%2Fprometheus")).status_code in (400, 404)
    # Envoy is still up and healthy: nothing of the above reached the admin interface.
    status, body = await exposed.envoy.admin_get("/ready")
    assert (status, body.strip()) == (200, "LIVE")
    assert exposed.envoy.process.returncode is None


async def test_the_admin_interface_is_not_on_the_network(exposed: Exposed) -> None:
    async with httpx.AsyncClient(timeout=5, trust_env=False) as http:
        assert (await http.get(f"http://127.0.0.1:{exposed.admin_port}/ready")).status_code == 200
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://{exposed.network}:{exposed.admin_port}/ready")


def test_the_config_with_the_secret_and_the_log_are_the_owners_alone(exposed: Exposed) -> None:
    envoy = exposed.envoy
    # The HS256 secret is in the config, as the JWKS key Envoy verifies with.
    assert (
        base64.urlsafe_b64encode(TEST_SECRET.encode()).rstrip(b"=").decode() in envoy.config_path.read_text()
    )
    for path, mode in (
        (envoy.config_path, 0o600),
        (envoy.log_path, 0o600),
        (envoy.config_path.parent, 0o700),
    ):
        assert stat.S_IMODE(path.stat().st_mode) == mode, f"{path}: {oct(path.stat().st_mode)}"


def test_a_validated_config_is_the_owners_alone_too(tmp_path: Path) -> None:
    settings = gateway_settings(["127.0.0.1:50051"])
    with umask(0o022):
        path, _ = validate_settings(settings, tmp_path / "work")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
