"""The gateway's config as data: the golden rendering, routes derived from a descriptor set, JWT keys.

The golden file pins the whole rendered Envoy config for fixed settings. After an intended change,
regenerate it and review the diff like code:

    CHATMESH_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_gateway_config.py -k golden
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from chatmesh.common.auth import JwtKeys, issue_token, verify_token
from chatmesh.keygen import write_hs256_secret, write_rs256_key_pair
from gateway import GatewaySettings, ServiceApi, build_envoy_config, default_descriptor_path, jwks
from gateway.api import OPENAI_SERVICE, Method, RestBinding, template_regex
from gateway.rest_errors import lua_pattern, lua_tables
from gateway.routes import WEB_DIRECTORY

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "gateway_envoy.json"
UPDATE_GOLDEN = os.environ.get("CHATMESH_UPDATE_GOLDEN") == "1"
DESCRIPTOR_PLACEHOLDER = "<descriptor set>"
SECRET = "golden-secret-" + "g" * 40


@pytest.fixture(autouse=True)
def _no_gateway_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings come from the arguments alone, whatever the shell running the tests exports.
    for name in list(os.environ):
        if name.startswith("CHATMESH_GATEWAY_"):
            monkeypatch.delenv(name)


def settings(**overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "listen_host": "0.0.0.0",
        "listen_port": 8080,
        "admin_port": 9901,
        "chat_addresses": ["127.0.0.1:50051", "chat-2.internal:50051"],
        "jwt_secret": SECRET,
        "api_key_secret": "api-key-" + SECRET,
        "jwt_issuer": "https://id.example",
        "jwt_audience": "chatmesh",
        "concurrency": 2,
        **overrides,
    }
    return GatewaySettings(**values)


def rendered(config_settings: GatewaySettings, descriptor: Path | None = None) -> dict[str, Any]:
    """The config as JSON data, with the machine-specific descriptor path replaced by a placeholder."""
    path = (descriptor or default_descriptor_path()).resolve()
    text = (
        json.dumps(build_envoy_config(config_settings, path))
        .replace(json.dumps(str(path))[1:-1], DESCRIPTOR_PLACEHOLDER)
        .replace(json.dumps(str(path.parent))[1:-1], DESCRIPTOR_PLACEHOLDER + "-dir")
        .replace(json.dumps(str(WEB_DIRECTORY))[1:-1], "<web-page-dir>")
    )
    return json.loads(text)  # type: ignore[no-any-return]


def routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["route_config"]["virtual_hosts"][0]["routes"]  # type: ignore[no-any-return]


def test_rendered_config_matches_the_golden_file() -> None:
    actual = json.dumps(rendered(settings()), indent=2, sort_keys=True) + "\n"
    if UPDATE_GOLDEN:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(actual)
    assert GOLDEN.exists(), f"{GOLDEN} is missing; create it with CHATMESH_UPDATE_GOLDEN=1"
    assert actual == GOLDEN.read_text(), (
        "the rendered Envoy config changed; if that is intended, run"
        " `CHATMESH_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_gateway_config.py -k golden`"
        " and review the diff of tests/golden/gateway_envoy.json"
    )


def _descriptor_set(tmp_path: Path) -> Path:
    """A descriptor set with a ChatService that is nothing like the real one: other methods, verbs,
    an additional binding, a custom verb and a client-streaming method."""
    file = descriptor_pb2.FileDescriptorProto(name="other.proto", package="chatmesh.chat.v1", syntax="proto3")
    file.message_type.add(name="Req").field.add(
        name="thing_id", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING
    )
    file.message_type.add(name="Resp")
    service = file.service.add(name="ChatService")

    def method(name: str, client_streaming: bool = False, server_streaming: bool = False) -> Any:
        return service.method.add(
            name=name,
            input_type=".chatmesh.chat.v1.Req",
            output_type=".chatmesh.chat.v1.Resp",
            client_streaming=client_streaming,
            server_streaming=server_streaming,
        )

    rule = method("Fetch").options.Extensions[annotations_pb2.http]
    rule.get = "/things/{thing_id}"
    rule.additional_bindings.add(get="/v2/{thing_id=shelves/*/things/*}")
    rule = method("Replace").options.Extensions[annotations_pb2.http]
    rule.put = "/things/{thing_id}"
    rule.body = "*"
    rule = method("Watch", server_streaming=True).options.Extensions[annotations_pb2.http]
    rule.custom.kind = "WATCH"
    rule.custom.path = "/things/{thing_id}:watch"
    method("Upload", client_streaming=True)  # gRPC only
    # The gateway exposes an OpenAIService, an AccountService and an AdminService too; here they have no
    # methods.
    openai = descriptor_pb2.FileDescriptorProto(
        name="openai.proto", package="chatmesh.openai.v1", syntax="proto3"
    )
    openai.service.add(name="OpenAIService")
    file.service.add(name="AccountService")
    file.service.add(name="AdminService")
    path = tmp_path / "other.pb"
    path.write_bytes(descriptor_pb2.FileDescriptorSet(file=[file, openai]).SerializeToString())
    return path


def test_routes_405s_and_streaming_come_from_the_descriptor_set(tmp_path: Path) -> None:
    config = rendered(settings(), _descriptor_set(tmp_path))
    by_name = {route.get("name"): route for route in routes(config)}
    prefix = "/chatmesh.chat.v1.ChatService/"

    # One gRPC route per method; streaming ones (either direction) get the completion timeout and
    # are retried only before reaching a replica.
    for name, streaming in (("Fetch", False), ("Replace", False), ("Watch", True), ("Upload", True)):
        route = by_name[prefix + name]
        assert route["match"] == {"path": prefix + name, "grpc": {}}
        limit = "3600.000s" if streaming else "30.000s"
        # As the stream's duration: Envoy ignores a route `timeout` beside it.
        assert "timeout" not in route["route"], name
        assert route["route"]["max_stream_duration"] == {
            "max_stream_duration": limit,
            "grpc_timeout_header_max": limit,
        }, name
        retry_on = route["route"]["retry_policy"]["retry_on"]
        assert ("unavailable" not in retry_on) == streaming, name
        assert "envoy.filters.http.local_ratelimit" in route["typed_per_filter_config"], name
    assert not any(prefix + old in by_name for old in ("CreateChat", "Complete", "ListChats"))

    # A 405 with the allowed verbs for each REST path, additional bindings and custom verbs included.
    wrong = {r["name"]: r for r in routes(config) if r.get("direct_response", {}).get("status") == 405}
    assert set(wrong) == {
        "method-not-allowed /things/{thing_id}",
        "method-not-allowed /v2/{thing_id=shelves/*/things/*}",
        "method-not-allowed /things/{thing_id}:watch",
    }
    allow = wrong["method-not-allowed /things/{thing_id}"]["response_headers_to_add"][0]["header"]
    assert allow == {"key": "allow", "value": "GET, PUT"}
    assert wrong["method-not-allowed /things/{thing_id}"]["match"]["safe_regex"]["regex"] == (
        "^/things/[^/]+/?$"
    )
    not_found = routes(config)[-1]["direct_response"]["body"]["inline_string"]
    assert not_found == (
        "no such endpoint; the API is GET /things/{thing_id}, GET /v2/{thing_id=shelves/*/things/*},"
        " PUT /things/{thing_id}, WATCH /things/{thing_id}:watch"
    )


def test_the_real_api_is_read_from_the_packaged_descriptor_set() -> None:
    api = ServiceApi.load(default_descriptor_path())
    assert api.services == (
        "chatmesh.chat.v1.ChatService",
        "chatmesh.openai.v1.OpenAIService",
        "chatmesh.chat.v1.AccountService",
        "chatmesh.chat.v1.AdminService",
    )
    assert [m.name for m in api.streaming_methods] == [
        "CreateChat",
        "Complete",
        "WatchJob",
        "CreateChatCompletion",
    ]
    assert {(p.template, p.verbs) for p in api.rest_paths()} == {
        ("/chat", ("POST",)),
        ("/chat/{chat_id}/completion", ("POST",)),
        ("/chats", ("GET",)),
        ("/chat/{chat_id}/messages", ("GET",)),
        ("/chat/{chat_id}", ("PATCH", "DELETE")),
        ("/cache", ("DELETE",)),
        ("/chat/{chat_id}/jobs", ("POST",)),
        ("/jobs/{job_id}", ("GET",)),
        ("/jobs/{job_id}/events", ("GET",)),
        ("/models", ("GET",)),
        ("/v1/chat/completions", ("POST",)),
        ("/v1/models", ("GET",)),
        ("/keys", ("POST", "GET")),
        ("/keys/{key_id}", ("DELETE",)),
        ("/usage", ("GET",)),
        ("/admin/usage", ("GET",)),
        ("/admin/budgets", ("GET", "PUT")),
        ("/admin/users/{user_id}/keys", ("GET", "DELETE")),
    }


def test_a_missing_service_or_descriptor_set_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="make protos"):
        ServiceApi.load(tmp_path / "nope.pb")
    with pytest.raises(ValueError, match=r"chatmesh\.chat\.v1\.Nope .*make protos"):
        ServiceApi.load(default_descriptor_path(), ("chatmesh.chat.v1.Nope",))


@pytest.mark.parametrize(
    ("template", "matches", "misses"),
    [
        ("/chats", ["/chats", "/chats/"], ["/chats/x", "/chat"]),
        ("/chat/{chat_id}", ["/chat/abc", "/chat/abc/"], ["/chat", "/chat/a/b"]),
        ("/chat/{chat_id}/completion", ["/chat/a/completion"], ["/chat/a/b/completion"]),
        ("/v1/{name=shelves/*}/books", ["/v1/shelves/s1/books"], ["/v1/shelves/books"]),
        ("/files/{path=**}", ["/files/a/b/c"], ["/file/a"]),
        ("/things/{id}:watch", ["/things/7:watch"], ["/things/7", "/things/7:watchx"]),
        ("/a.b/*", ["/a.b/x"], ["/aXb/x"]),
    ],
)
def test_path_templates_become_anchored_regexes(template: str, matches: list[str], misses: list[str]) -> None:
    regex = re.compile(template_regex(template))
    assert all(regex.match(path) for path in matches), (template, regex.pattern)
    assert not any(regex.match(path) for path in misses), (template, regex.pattern)


@pytest.mark.parametrize(
    ("template", "pattern"),
    [
        ("/chat/{chat_id}/jobs", "^/chat/[^/?]+/jobs/?$"),
        ("/v1/{name=shelves/*}/books", "^/v1/shelves/[^/?]+/books/?$"),
        ("/files/{path=**}", "^/files/[^?]*/?$"),
        ("/things/{id}:watch", "^/things/[^/?]+:watch/?$"),
        ("/a.b-c/*", "^/a%.b%-c/[^/?]+/?$"),
    ],
)
def test_path_templates_become_anchored_lua_patterns(template: str, pattern: str) -> None:
    # Lua patterns see the request's own path, query string included: a variable stops at `?` too.
    assert lua_pattern(template) == pattern


def test_the_lua_filter_takes_the_job_and_openai_paths_from_the_api() -> None:
    real = lua_tables(ServiceApi.load(default_descriptor_path()))
    assert '  {"POST", "^/chat/[^/?]+/jobs/?$"},\n' in real, real
    assert 'local OPENAI_ROOTS = {\n  "/v1/",\n}' in real, real
    chat = "chatmesh.chat.v1.ChatService"
    other = ServiceApi(
        (chat, OPENAI_SERVICE),
        (
            Method(
                chat, "SubmitCompletion", f"/{chat}/SubmitCompletion", False, (RestBinding("PUT", "/q/{id}"),)
            ),
            Method(chat, "GetJob", f"/{chat}/GetJob", False, (RestBinding("GET", "/q/{id}"),)),
            Method(
                OPENAI_SERVICE, "M", f"/{OPENAI_SERVICE}/M", False, (RestBinding("GET", "/compat/models"),)
            ),
        ),
    )
    tables = lua_tables(other)
    assert 'local ACCEPTED = {\n  {"PUT", "^/q/[^/?]+/?$"},\n}' in tables, tables
    assert 'local OPENAI_ROOTS = {\n  "/compat/",\n}' in tables, tables


def _b64url_int(text: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


def test_keygen_writes_an_rs256_pair_whose_jwks_verifies_its_tokens(tmp_path: Path) -> None:
    files = write_rs256_key_pair(tmp_path / "k.key", tmp_path / "k.pub")
    assert stat.S_IMODE(files.private_key.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError, match="--force"):
        write_rs256_key_pair(files.private_key, files.public_key)

    config = rendered(settings(jwt_secret=None, jwt_public_key_file=files.public_key))
    keys = JwtKeys.rs256(files.public_key.read_text(), files.private_key.read_text())
    token = issue_token(keys, "ada")
    assert verify_token(keys, token) == "ada"
    (jwk,) = jwks(keys)["keys"]
    public = serialization.load_pem_public_key(files.public_key.read_bytes())
    assert isinstance(public, rsa.RSAPublicKey)
    numbers = public.public_numbers()
    assert (jwk["kty"], jwk["alg"]) == ("RSA", "RS256")
    assert (_b64url_int(jwk["n"]), _b64url_int(jwk["e"])) == (numbers.n, numbers.e)
    # The JWK is a key PyJWT verifies the token with, as Envoy will.
    assert jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=["RS256"])["sub"] == "ada"
    text = json.dumps(config)
    assert jwk["n"] in text and json.dumps(SECRET) not in text, "the public key, not the secret, is used"


def test_a_key_the_gateway_cannot_use_is_refused_with_the_fix(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    ec_pem = ec_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "ec.pub").write_bytes(ec_pem)
    (tmp_path / "junk.pub").write_text("not a key")
    for name in ("ec.pub", "junk.pub"):
        with pytest.raises(ValueError, match="chatmesh keygen"):
            build_envoy_config(settings(jwt_public_key_file=tmp_path / name))


def test_the_secret_is_checked_by_the_auth_module_rules(tmp_path: Path) -> None:
    short = "s" * 31
    with pytest.raises(ValueError) as gateway_error:
        settings(jwt_secret=short).jwt_keys()
    with pytest.raises(ValueError) as auth_error:
        JwtKeys.hs256(short)
    assert str(gateway_error.value) == str(auth_error.value)
    secret_file = write_hs256_secret(tmp_path / "secret")
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    keys = settings(jwt_secret=None, jwt_secret_file=secret_file).jwt_keys()
    assert (keys.algorithm, keys.verify_key) == ("HS256", secret_file.read_text())
    (jwk,) = jwks(keys)["keys"]
    assert base64.urlsafe_b64decode(jwk["k"] + "=" * (-len(jwk["k"]) % 4)).decode() == keys.verify_key


def test_settings_read_replicas_from_a_comma_separated_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATMESH_GATEWAY_CHAT_ADDRESSES", "10.0.0.1:50051, 10.0.0.2:50051")
    assert GatewaySettings().chat_addresses == ["10.0.0.1:50051", "10.0.0.2:50051"]
    monkeypatch.setenv("CHATMESH_GATEWAY_CHAT_ADDRESSES", "no-port")
    with pytest.raises(ValueError, match="host:port"):
        GatewaySettings()


def _route_names(config: dict[str, Any]) -> set[str]:
    return {str(route.get("name")) for route in routes(config)}


def test_the_web_page_is_served_with_a_policy_against_inline_scripts() -> None:
    config = rendered(settings())
    page = {route["name"]: route for route in routes(config) if str(route.get("name")).startswith("web ")}
    assert set(page) == {"web /", "web /app.js", "web /markdown.js", "web /app.css", "web /favicon.svg"}
    for route in page.values():
        filename = route["direct_response"]["body"]["filename"]
        assert (WEB_DIRECTORY / Path(filename).name).is_file(), filename
        headers = {h["header"]["key"]: h["header"]["value"] for h in route["response_headers_to_add"]}
        assert "script-src 'self'" in headers["content-security-policy"]
        assert "unsafe-inline" not in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
    assert "web /" not in _route_names(rendered(settings(web_page=False)))


def test_the_dev_sign_in_exists_only_when_asked_for_and_needs_no_token() -> None:
    dev_path = "/chatmesh.dev.v1.DevSignInService/SignIn"
    default = rendered(settings())
    assert dev_path not in _route_names(default)
    dev = rendered(settings(dev_sign_in=True, listen_host="127.0.0.1"))  # refused on 0.0.0.0
    assert dev_path in _route_names(dev)
    filters = dev["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    by_name = {f["name"]: f["typed_config"] for f in filters["http_filters"]}
    assert (
        "chatmesh.dev.v1.DevSignInService" in by_name["envoy.filters.http.grpc_json_transcoder"]["services"]
    )
    required = [rule["match"]["prefix"] for rule in by_name["envoy.filters.http.jwt_authn"]["rules"]]
    assert required == [
        "/chatmesh.chat.v1.ChatService/",
        "/chatmesh.openai.v1.OpenAIService/",
        "/chatmesh.chat.v1.AccountService/",
        "/chatmesh.chat.v1.AdminService/",
    ]
