"""Who the local mesh and the gateway answer: loopback unless told otherwise, the dev sign-in (a token for
any user name) never for another machine, Envoy's admin interface never on the network."""

from __future__ import annotations

import os
from typing import Any

import pytest

from chat_service.dev_sign_in import is_local_caller, peer_host
from chatmesh.common.loopback import PEER_ADDRESS_HEADER, is_loopback_host
from chatmesh.mesh import MeshSettings, check_exposure, plan
from gateway import GatewaySettings, build_envoy_config
from gateway.filters import LOOPBACK_PREFIXES
from gateway.metrics import ADMIN_CLUSTER

SECRET = "s" * 40


@pytest.fixture(autouse=True)
def _no_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("CHATMESH_GATEWAY_", "CHATMESH_MESH_", "CHATMESH_CHAT_")):
            monkeypatch.delenv(name)


def gateway(**values: Any) -> GatewaySettings:
    return GatewaySettings(**{"jwt_secret": SECRET, "jwt_secret_file": None, **values})


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.1.1", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.0.2.2", False),
        ("", False),
        ("chat.example", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_the_gateway_listens_on_loopback_unless_told_otherwise() -> None:
    settings = gateway()
    assert settings.listen_host == "127.0.0.1"
    public = build_envoy_config(settings)["static_resources"]["listeners"][0]
    assert public["address"]["socket_address"]["address"] == "127.0.0.1"


def test_the_gateway_refuses_the_dev_sign_in_on_another_interface() -> None:
    assert gateway(listen_host="0.0.0.0").listen_host == "0.0.0.0"  # an explicit choice, without it
    assert gateway(dev_sign_in=True).dev_sign_in
    with pytest.raises(ValueError) as refused:
        gateway(listen_host="0.0.0.0", dev_sign_in=True)
    message = str(refused.value)
    assert "CHATMESH_GATEWAY_DEV_SIGN_IN" in message and "CHATMESH_GATEWAY_LISTEN_HOST=0.0.0.0" in message
    assert "unset" in message


def test_the_admin_interface_stays_on_loopback() -> None:
    with pytest.raises(ValueError, match="CHATMESH_GATEWAY_METRICS_PORT"):
        gateway(admin_host="0.0.0.0")


def test_the_dev_sign_in_routes_admit_loopback_peers_by_their_connection_only() -> None:
    config = build_envoy_config(gateway(dev_sign_in=True))
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    sign_in = [r for r in routes if r.get("name", "").startswith("/chatmesh.dev.v1.DevSignInService/")]
    assert sign_in
    for route in sign_in:
        policy = route["typed_per_filter_config"]["envoy.filters.http.rbac"]["rbac"]["rules"]
        assert policy["action"] == "ALLOW"
        (rule,) = policy["policies"].values()
        assert rule["principals"] == [
            {"direct_remote_ip": {"address_prefix": prefix, "prefix_len": length}}
            for prefix, length in LOOPBACK_PREFIXES
        ]
        assert route["request_headers_to_add"] == [
            {
                "header": {
                    "key": PEER_ADDRESS_HEADER,
                    "value": "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%",
                },
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ]
    others = [r for r in routes if r not in sign_in]
    assert not any("envoy.filters.http.rbac" in r.get("typed_per_filter_config", {}) for r in others)
    assert "envoy.filters.http.rbac" in [f["name"] for f in hcm["http_filters"]]


def test_the_metrics_listener_routes_two_paths_to_the_loopback_admin() -> None:
    assert len(build_envoy_config(gateway())["static_resources"]["listeners"]) == 1  # off by default
    config = build_envoy_config(gateway(metrics_host="0.0.0.0", metrics_port=9104))
    metrics = config["static_resources"]["listeners"][1]
    assert metrics["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 9104}
    hcm = metrics["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    forwarded = {r["match"]["path"] for r in routes if "route" in r}
    assert forwarded == {"/stats/prometheus", "/ready"}
    assert routes[-1]["direct_response"]["status"] == 404
    (admin,) = [c for c in config["static_resources"]["clusters"] if c["name"] == ADMIN_CLUSTER]
    endpoint = admin["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9901}


def test_the_mesh_listens_on_loopback_and_refuses_the_dev_sign_in_elsewhere() -> None:
    settings = MeshSettings()
    assert (settings.host, settings.gateway_host) == ("127.0.0.1", "127.0.0.1")
    check_exposure(settings)  # the default: fine
    for name, value in (("gateway_host", "0.0.0.0"), ("host", "0.0.0.0"), ("gateway_host", "192.0.2.2")):
        with pytest.raises(ValueError) as refused:
            check_exposure(MeshSettings.model_validate({name: value}))
        message = str(refused.value)
        assert f"CHATMESH_MESH_{name.upper()}={value}" in message
        assert "CHATMESH_MESH_DEV_SIGN_IN=false" in message and "chatmesh token USER" in message
    # Explicitly without the dev sign-in, the network is the operator's choice.
    exposed = MeshSettings(gateway_host="0.0.0.0", dev_sign_in=False)
    check_exposure(exposed)
    chat = [spec for spec in plan(exposed) if spec.module == "chat_service"]
    assert chat and all(spec.env["CHATMESH_CHAT_DEV_SIGN_IN"] == "false" for spec in chat)


def test_a_configured_key_turns_the_dev_sign_in_off_so_the_mesh_may_listen_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHATMESH_CHAT_JWT_SECRET", SECRET)
    check_exposure(MeshSettings(gateway_host="0.0.0.0"))


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:127.0.0.1:5000", "127.0.0.1"),
        ("ipv4:192.0.2.2:5000", "192.0.2.2"),
        ("ipv6:[::1]:5000", "::1"),
        ("ipv6:%5B::1%5D:5000", "::1"),
        ("unix:/tmp/socket", "localhost"),
        ("something-else", None),
    ],
)
def test_peer_hosts(peer: str, host: str | None) -> None:
    assert peer_host(peer) == host


@pytest.mark.parametrize(
    ("peer", "metadata", "local"),
    [
        ("ipv4:127.0.0.1:5000", [], True),
        ("ipv6:%5B::1%5D:5000", [], True),
        ("ipv4:192.0.2.2:5000", [], False),
        # The gateway on this machine forwarded a caller: the address of the connection it accepted.
        ("ipv4:127.0.0.1:5000", [(PEER_ADDRESS_HEADER, "127.0.0.1")], True),
        ("ipv4:127.0.0.1:5000", [(PEER_ADDRESS_HEADER, "::1")], True),
        ("ipv4:127.0.0.1:5000", [(PEER_ADDRESS_HEADER, "192.0.2.2")], False),
        ("ipv4:127.0.0.1:5000", [(PEER_ADDRESS_HEADER, b"192.0.2.2")], False),
        # Headers a caller may write itself count for nothing.
        ("ipv4:192.0.2.2:5000", [(PEER_ADDRESS_HEADER, "127.0.0.1")], False),
        ("ipv4:192.0.2.2:5000", [("x-forwarded-for", "127.0.0.1")], False),
    ],
)
def test_local_callers(peer: str, metadata: list[tuple[str, str | bytes]], local: bool) -> None:
    assert is_local_caller(peer, metadata) is local
