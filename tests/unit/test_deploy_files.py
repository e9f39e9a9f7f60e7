"""The deployment files in deploy/ stay honest: images can't be built here (no registry for base images),
so the Dockerfiles are linted with hadolint and every file they copy must exist; the Kubernetes manifests
(base and overlays, with the overlays' patches applied as kustomize would) validate against the API
schemas of the Kubernetes version we target and follow the rules the deployment promises."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway import GatewaySettings, build_envoy_config

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33.0"
SERVICES = {"chat": 50051, "inference": 50052, "embedding": 50053}
METRICS = {"chat": 9101, "inference": 9102, "embedding": 9103}
GATEWAY_PORT = 8080
GATEWAY_METRICS = 9104
JWT_CLAIM_SETTINGS = ("JWT_ISSUER", "JWT_AUDIENCE")

Doc = dict[str, Any]


# --- Dockerfiles -------------------------------------------------------------------------------------


def dockerfiles() -> list[Path]:
    return sorted(DOCKER.glob("*.Dockerfile"))


def test_there_is_a_dockerfile_per_service_and_the_gateway() -> None:
    assert {path.name.removesuffix(".Dockerfile") for path in dockerfiles()} == {*SERVICES, "gateway"}


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(path: Path) -> None:
    hadolint = shutil.which("hadolint") or str(Path(ROOT / ".venv" / "bin" / "hadolint"))
    done = subprocess.run([hadolint, str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: p.name)
def test_dockerfile_copies_files_that_exist_into_a_non_root_image_without_build_tools(path: Path) -> None:
    text = path.read_text()
    stages = re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]
    assert len(stages) >= 2, "multi-stage: build, then a clean runtime image"
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.MULTILINE):
        *sources, _ = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{path.name}: COPY {source}: no such file in the repository"
    final = stages[-1]
    assert "apt-get install" not in final and "build-essential" not in final, "no build tools at run time"
    user = re.findall(r"^USER (\S+)$", final, flags=re.MULTILINE)
    assert user and user[-1] not in ("root", "0"), "the service runs as a non-root user"


# --- Kubernetes ----------------------------------------------------------------------------------------


def load(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization(directory: Path) -> Doc:
    loaded = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def render(directory: Path) -> list[Doc]:
    """The resources of a kustomization with its JSON 6902 patches applied (what kustomize build does
    with the features these files use)."""
    spec = kustomization(directory)
    docs: list[Doc] = []
    for resource in spec.get("resources", []):
        target = (directory / resource).resolve()
        docs.extend(render(target) if target.is_dir() else load(target))
    for patch in spec.get("patches", []):
        selected = [
            d
            for d in docs
            if all(
                d.get("kind") == v if k == "kind" else d["metadata"].get(k) == v
                for k, v in patch["target"].items()
            )
        ]
        assert len(selected) == 1, f"patch target {patch['target']} matches {len(selected)} resources"
        for operation in yaml.safe_load(patch["patch"]):
            apply(selected[0], operation)
    return docs


def apply(doc: Doc, operation: Doc) -> None:
    *parents, last = [part for part in operation["path"].split("/") if part]
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    value = copy.deepcopy(operation["value"])
    if operation["op"] == "add" and isinstance(node, list):
        node.append(value) if last == "-" else node.insert(int(last), value)
    elif operation["op"] in ("add", "replace"):
        if isinstance(node, list):
            node[int(last)] = value
        else:
            assert operation["op"] == "add" or last in node, f"replace of a missing {operation['path']}"
            node[last] = value
    else:
        raise AssertionError(f"unsupported patch operation {operation['op']}")


OVERLAYS = sorted(path for path in (K8S / "overlays").iterdir() if path.is_dir())


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_every_manifest_is_valid_for_the_targeted_kubernetes(overlay: Path) -> None:
    docs = render(overlay)
    assert docs
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{overlay.name}: {name}: {error.message} at {list(error.path)}")


def by_kind(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_workloads_have_resources_probes_disruption_budgets_and_run_as_non_root(overlay: Path) -> None:
    docs = render(overlay)
    deployments = by_kind(docs, "Deployment")
    budgets = {
        doc["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        for doc in docs
        if doc["kind"] == "PodDisruptionBudget"
    }
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"]:
            assert {"requests", "limits"} <= set(container["resources"]), name
            assert "readinessProbe" in container and "livenessProbe" in container, name
        assert name in budgets, f"{name} has no PodDisruptionBudget"
        if name != "triton":  # NVIDIA's image runs as its own user
            assert pod["securityContext"]["runAsNonRoot"] is True, name
    autoscaled = {
        doc["spec"]["scaleTargetRef"]["name"] for doc in docs if doc["kind"] == "HorizontalPodAutoscaler"
    }
    assert {"chat", "embedding"} <= autoscaled


def test_service_ports_and_probes_match_the_services_settings() -> None:
    docs = render(OVERLAYS[0])
    for name, port in SERVICES.items():
        container = by_kind(docs, "Deployment")[name]["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": port, "metrics": METRICS[name]}
        assert container["readinessProbe"]["grpc"]["port"] == port
    # The image's defaults (deploy/docker) listen where the manifests expect.
    for name, port in SERVICES.items():
        text = (DOCKER / f"{name}.Dockerfile").read_text()
        assert f"_ADDRESS=0.0.0.0:{port}" in text and f"_METRICS_ADDRESS=0.0.0.0:{METRICS[name]}" in text


def test_network_policies_let_only_the_gateway_reach_chat_and_only_chat_reach_the_engines() -> None:
    policies = [doc for doc in render(K8S / "overlays" / "gpu") if doc["kind"] == "NetworkPolicy"]

    def allowed_sources(app: str, port: int) -> set[str]:
        sources: set[str] = set()
        for policy in policies:
            selector = policy["spec"]["podSelector"].get("matchLabels", {})
            if selector and selector.get("app.kubernetes.io/name") != app:
                continue
            for rule in policy["spec"].get("ingress", []):
                if port not in {p["port"] for p in rule.get("ports", [])}:
                    continue
                for peer in rule.get("from", [{"anywhere": True}]):
                    labels = peer.get("podSelector", {}).get("matchLabels", {})
                    sources.add(
                        labels.get("app.kubernetes.io/name", "anywhere" if "anywhere" in peer else "other")
                    )
        return sources

    default_deny = [p for p in policies if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert default_deny, "a default-deny ingress policy"
    assert allowed_sources("gateway", 8080) == {"anywhere"}
    assert allowed_sources("chat", 50051) == {"gateway"}
    assert allowed_sources("inference", 50052) == {"chat"}
    assert allowed_sources("embedding", 50053) == {"chat"}
    assert allowed_sources("triton", 8001) == {"inference"}


def test_secrets_come_from_the_secret_and_config_from_the_config_map() -> None:
    docs = render(OVERLAYS[0])
    chat = by_kind(docs, "Deployment")["chat"]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in chat["containers"][0]["env"]}
    assert env["CHATMESH_CHAT_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "chatmesh-secrets"
    assert any(v.get("secret", {}).get("secretName") == "chatmesh-secrets" for v in chat["volumes"])
    config = by_kind(docs, "ConfigMap")["chatmesh-config"]["data"]
    assert not any("SECRET" in key or "PASSWORD" in key for key in config)
    assert config["CHATMESH_CHAT_INFERENCE_ADDRESS"] == f"inference:{SERVICES['inference']}"
    assert config["CHATMESH_CHAT_CACHE_ADDRESS"] == f"embedding:{SERVICES['embedding']}"


# --- compose -------------------------------------------------------------------------------------------


def test_compose_runs_the_whole_mesh_on_one_gpu_host_from_files_that_exist() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert {
        "gateway",
        "chat-1",
        "chat-2",
        "inference",
        "triton",
        "embedding",
        "qdrant",
        "postgres",
        "nats",
    } <= set(services)
    for name, service in services.items():
        if "build" in service:
            assert (ROOT / service["build"]["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / "deploy" / source).exists(), f"{name}: {source}"
    devices = services["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    # Addresses name services that exist, on the ports the services listen on.
    chat = services["chat-1"]["environment"]
    assert chat["CHATMESH_CHAT_INFERENCE_ADDRESS"] == f"inference:{SERVICES['inference']}"
    assert chat["CHATMESH_CHAT_CACHE_ADDRESS"] == f"embedding:{SERVICES['embedding']}"
    assert (
        services["chat-2"]["environment"]["CHATMESH_CHAT_DATABASE_URL"] == chat["CHATMESH_CHAT_DATABASE_URL"]
    )
    gateway = services["gateway"]["environment"]["CHATMESH_GATEWAY_CHAT_ADDRESSES"].split(",")
    assert gateway == [f"chat-1:{SERVICES['chat']}", f"chat-2:{SERVICES['chat']}"]
    triton = services["inference"]["environment"]["CHATMESH_INFERENCE_TRITON_URL"]
    assert triton.split(":")[0] in services
    # The service tokenizes prompts with the tokenizer Triton's postprocessing decodes with.
    tokenizer = services["inference"]["environment"]["CHATMESH_INFERENCE_TRITON_TOKENIZER"]
    (mount,) = (v for v in services["inference"]["volumes"] if v.split(":")[1] == tokenizer)
    (models,) = (v for v in services["triton"]["volumes"] if v.split(":")[1] == "/models")
    postprocessing = (ROOT / "deploy" / "triton" / "postprocessing" / "config.pbtxt").read_text()
    tokenizer_dir = re.search(r'"tokenizer_dir" value: \{ string_value: "([^"]+)"', postprocessing)
    assert tokenizer_dir is not None
    assert mount.split(":")[0] == models.split(":")[0] + tokenizer_dir[1].removeprefix("/models")
    # Prometheus scrapes every service's metrics port under its compose name.
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert {
        "chat-1:9101",
        "chat-2:9101",
        "inference:9102",
        "embedding:9103",
        f"gateway:{GATEWAY_METRICS}",
    } == targets
    # Only the API is published; the metrics port is for Prometheus on the compose network.
    assert services["gateway"]["ports"] == [f"{GATEWAY_PORT}:{GATEWAY_PORT}"]


# --- the gateway's exposure and the tokens it accepts ----------------------------------------------------


def dockerfile_env(path: Path) -> dict[str, str]:
    """The ENV settings of a Dockerfile's final stage (`ENV A=1 \\ B=2` form)."""
    final = re.split(r"^FROM ", path.read_text(), flags=re.MULTILINE)[-1]
    env: dict[str, str] = {}
    for block in re.findall(r"^ENV ((?:.*\\\n)*.*)$", final, flags=re.MULTILINE):
        for pair in block.replace("\\\n", " ").split():
            name, _, value = pair.partition("=")
            env[name] = value
    return env


def test_the_gateway_image_serves_metrics_on_their_own_port_and_keeps_the_admin_on_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (DOCKER / "gateway.Dockerfile").read_text()
    env = {
        k: v for k, v in dockerfile_env(DOCKER / "gateway.Dockerfile").items() if k.startswith("CHATMESH_")
    }
    assert "CHATMESH_GATEWAY_ADMIN_HOST" not in env
    assert re.findall(r"^EXPOSE (.+)$", text, flags=re.MULTILINE) == [f"{GATEWAY_PORT} {GATEWAY_METRICS}"]
    # The config the image renders from its settings: admin on loopback, a metrics listener beside the API.
    for name in [n for n in os.environ if n.startswith("CHATMESH_GATEWAY_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = build_envoy_config(GatewaySettings(jwt_secret="s" * 40, jwt_secret_file=None))
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    listeners = {
        listener["name"]: listener["address"]["socket_address"]
        for listener in config["static_resources"]["listeners"]
    }
    assert listeners == {
        "public": {"address": "0.0.0.0", "port_value": GATEWAY_PORT},
        "metrics": {"address": "0.0.0.0", "port_value": GATEWAY_METRICS},
    }


def test_kubernetes_probes_and_scrapes_the_gateway_on_its_metrics_port_not_the_admin() -> None:
    docs = render(OVERLAYS[0])
    gateway = by_kind(docs, "Deployment")["gateway"]["spec"]["template"]
    container = gateway["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "http": GATEWAY_PORT,
        "metrics": GATEWAY_METRICS,
    }
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert gateway["metadata"]["annotations"]["prometheus.io/port"] == str(GATEWAY_METRICS)
    services = by_kind(docs, "Service")["gateway"]["spec"]["ports"]
    assert [p["targetPort"] for p in services] == ["http"]
    monitored = {
        port["port"]
        for policy in docs
        if policy["kind"] == "NetworkPolicy" and policy["metadata"]["name"] == "metrics-from-monitoring"
        for rule in policy["spec"]["ingress"]
        for port in rule["ports"]
    }
    assert GATEWAY_METRICS in monitored and 9901 not in monitored


def test_kubernetes_checks_the_issuer_and_audience_of_tokens_in_envoy_and_the_chat_service() -> None:
    docs = render(OVERLAYS[0])
    config = by_kind(docs, "ConfigMap")["chatmesh-config"]["data"]
    for claim in JWT_CLAIM_SETTINGS:
        chat, gateway = config.get(f"CHATMESH_CHAT_{claim}"), config.get(f"CHATMESH_GATEWAY_{claim}")
        assert chat and chat == gateway, f"{claim}: chat {chat!r}, gateway {gateway!r}"
    # Both workloads read the config map (the chat replicas verify every token again).
    for name in ("chat", "gateway"):
        container = by_kind(docs, "Deployment")[name]["spec"]["template"]["spec"]["containers"][0]
        assert {"configMapRef": {"name": "chatmesh-config"}} in container["envFrom"], name


def test_compose_checks_the_issuer_and_audience_of_tokens_in_envoy_and_every_chat_replica() -> None:
    services = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]
    for claim in JWT_CLAIM_SETTINGS:
        values = {
            name: services[name]["environment"].get(f"CHATMESH_{kind}_{claim}")
            for name, kind in (("gateway", "GATEWAY"), ("chat-1", "CHAT"), ("chat-2", "CHAT"))
        }
        assert len(set(values.values())) == 1 and all(values.values()), values
    # The issuer has no default: compose refuses to start until the operator names theirs.
    issuer = services["gateway"]["environment"]["CHATMESH_GATEWAY_JWT_ISSUER"]
    assert re.fullmatch(r"\$\{CHATMESH_JWT_ISSUER:\?.+\}", issuer), issuer
