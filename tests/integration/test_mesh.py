"""`chatmesh run` (what `make run` starts): every service comes up, answers, and Ctrl-C stops them all."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatmesh.client import ChatClient
from chatmesh.common.auth import JwtKeys, issue_token, load_or_create_secret
from chatmesh.common.service_settings import InferenceServiceSettings
from chatmesh.common.settings import env_for, env_name
from chatmesh.mesh import GGUF_PATH_VARIABLE, MeshSettings
from tests.support.files import loose_paths
from tests.support.processes import free_port, free_port_block, process_group_members
from tests.support.services import SERVING, chat_health
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


def terminal_client(
    cwd: Path, env: dict[str, str], gateway_port: int, *args: str, typed: str | None = None
) -> str:
    """Run `chatmesh chat --address <gateway> ARGS` in `cwd` (whose .run/ holds the dev key), with `typed`
    as what the user types (None: nothing); its output."""
    command = [sys.executable, "-m", "chatmesh", "chat", "--address", f"127.0.0.1:{gateway_port}", *args]
    done = subprocess.run(
        command,
        cwd=cwd,
        env=env,
        input=typed,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def submit_job_and_wait(base: str, headers: dict[str, str], chat_id: str) -> dict[str, Any]:
    """POST a job over REST, then read it until it is finished (or a minute passed); the last read."""
    submitted = httpx.post(
        f"{base}/chat/{chat_id}/jobs",
        headers=headers,
        json={"content": "Goodbye!", "max_tokens": 4},
        timeout=10,
    )
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["job_id"]
    deadline = time.monotonic() + 60
    while True:
        job: dict[str, Any] = httpx.get(f"{base}/jobs/{job_id}", headers=headers, timeout=10).json()
        if job["state"] in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED") or time.monotonic() > deadline:
            return job
        time.sleep(0.1)  # polling another process's state: the loop ends on the condition


def listening_pid(port: int) -> int:
    """The pid of the process listening on `port`."""
    probe = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, check=True)
    return int(probe.stdout.split("pid=")[1].split(",")[0])


def read_until(mesh: subprocess.Popen[str], marker: str, timeout_s: float = 120) -> str:
    """The mesh's output up to and including the first line containing `marker`."""
    assert mesh.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (line := mesh.stdout.readline()):
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"no {marker!r} in the mesh's output:\n{''.join(seen)[-3000:]}")


def heal_after_a_crash(mesh: subprocess.Popen[str], ports: dict[str, int], headers: dict[str, str]) -> None:
    """SIGKILL the inference service: the mesh says so and restarts it; the chat replicas and the gateway
    keep serving meanwhile (reads work), and completions work again once it is back."""
    base = f"http://127.0.0.1:{ports['gateway']}"
    os.kill(listening_pid(ports["inference"]), signal.SIGKILL)
    read_until(mesh, "inference exited with code -9")
    assert httpx.get(f"{base}/chats", headers=headers, timeout=10).status_code == 200
    read_until(mesh, "inference is back")

    async def replicas_serving() -> bool:
        # They report SERVING again once their next check reaches the engine.
        replicas = (f"127.0.0.1:{ports['chat']}", f"127.0.0.1:{ports['chat'] + 10}")
        return all([await chat_health(replica) == {SERVING} for replica in replicas])

    asyncio.run(eventually(replicas_serving, "the chat replicas SERVING again with the engine back"))
    reply = httpx.post(
        f"{base}/chat", headers=headers, json={"content": "Hello again!", "max_tokens": 4}, timeout=60
    )
    assert reply.status_code == 200, reply.text
    assert '"finish_reason"' in reply.text


def chat_on_the_second_model(base: str, headers: dict[str, str]) -> None:
    """Both served models are listed, and a chat that names the second is answered by it."""
    listed = httpx.get(f"{base}/models", headers=headers, timeout=10).json()
    assert [model["name"] for model in listed["models"]] == ["gemma-3-270m", "smollm2-135m-instruct"]
    assert listed["default_model"] == "gemma-3-270m"
    body = {"content": "Hello!", "model": "smollm2-135m-instruct", "max_tokens": 4}
    reply = httpx.post(f"{base}/chat", headers=headers, json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    chat_id = json.loads(reply.text.split("data: ", 2)[1].splitlines()[0])["chat_id"]
    messages = httpx.get(f"{base}/chat/{chat_id}/messages", headers=headers, timeout=10).json()["messages"]
    assert [(m["role"], m.get("model", "")) for m in messages] == [
        ("ROLE_USER", ""),
        ("ROLE_ASSISTANT", "smollm2-135m-instruct"),
    ]


def stop_after_a_failure(mesh: subprocess.Popen[str]) -> None:
    """A check failed with the mesh still up: stop it as Ctrl-C would, so that it stops the services it
    started (they run in sessions of their own and would outlive a killed launcher)."""
    if mesh.poll() is not None:
        return
    mesh.send_signal(signal.SIGINT)
    try:
        mesh.wait(timeout=60)
    except subprocess.TimeoutExpired:
        mesh.kill()
        mesh.wait()


def scrape_every_metrics_endpoint(text: str, metrics: int, admin_port: int) -> None:
    """Every service's Prometheus metrics, at the addresses the mesh printed (`text`), and Envoy's."""
    for port in (metrics, metrics + 1, metrics + 2, metrics + 10):
        assert f"http://127.0.0.1:{port}/metrics" in text
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code == 200
    completions = httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=10).text
    # The one completion so far went to replica 1 (stop or length, as the model decides), answered by the
    # one model the mesh serves.
    assert re.search(
        r'chatmesh_chat_completions_total\{cached="false",gen_ai_request_model="gemma-3-270m",'
        r'outcome="(stop|length)"\} 1\.0',
        completions,
    )
    envoy = httpx.get(f"http://127.0.0.1:{admin_port}/stats/prometheus", timeout=10)
    assert envoy.status_code == 200
    # The names deploy/grafana/chatmesh.json queries (tests/unit/test_observability_files.py).
    for name in (
        "envoy_cluster_upstream_rq_xx",
        "envoy_cluster_membership_healthy",
        "envoy_cluster_membership_total",
    ):
        assert re.search(rf'^{name}{{[^}}]*envoy_cluster_name="chat"', envoy.text, re.MULTILINE), name


def assert_private(run_dir: Path) -> None:
    """Everything under `run_dir` (the JWT secret, Envoy's config with it, the database and its -wal/-shm,
    the vector index, NATS's streams, the logs) is its owner's alone: files 0600, directories 0700."""
    expected = {
        "jwt-secret",
        "envoy.json",
        "envoy.log",
        "chatmesh.db",
        "nats",
        "nats.log",
        "qdrant",
    }
    assert expected <= {path.name for path in run_dir.iterdir()}, sorted(p.name for p in run_dir.iterdir())
    assert any(path.name.startswith("llama-server") for path in run_dir.iterdir())
    opened = [run_dir, *run_dir.rglob("*")]
    assert any(path.name == "chatmesh.db-wal" for path in opened), "SQLite in WAL mode: its -wal file too"
    loose = loose_paths(run_dir)
    assert not loose, f"readable by others: {loose}"


def test_mesh_refuses_the_dev_sign_in_on_the_network_before_starting_anything(tmp_path: Path) -> None:
    # The variables written out: the refusal must name the ones a user sets.
    env = {**os.environ, "CHATMESH_MESH_GATEWAY_HOST": "0.0.0.0"}
    for name in [n for n in env if n.startswith("CHATMESH_CHAT_JWT")]:
        del env[name]
    done = subprocess.run(
        [sys.executable, "-m", "chatmesh", "run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert (
        "CHATMESH_MESH_GATEWAY_HOST=0.0.0.0" in done.stderr
        and "CHATMESH_MESH_DEV_SIGN_IN=false" in done.stderr
    )
    assert "starting the mesh" not in done.stdout
    assert not (tmp_path / ".run").exists()


def test_mesh_starts_serves_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("chat", "inference", "embedding", "gateway", "admin", "nats")}
    metrics = free_port_block([0, 1, 2, 10])  # chat-1, inference, embedding, chat-2
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        **env_for(
            MeshSettings,
            chat_port=ports["chat"],
            inference_port=ports["inference"],
            embedding_port=ports["embedding"],
            gateway_port=ports["gateway"],
            gateway_admin_port=ports["admin"],
            nats_port=ports["nats"],
            metrics_port=metrics,
            # Two light catalog models (pulled by `make test`): the launcher pulls what is missing, then
            # passes the list on to the inference service, which runs an engine for each.
            models="gemma-3-270m,smollm2-135m-instruct",
        ),
    }
    for variable in (env_name(InferenceServiceSettings, "models"), GGUF_PATH_VARIABLE):
        env.pop(variable, None)  # the user's own settings would win over the mesh's
    # Its own working directory: the embedded defaults (.run/chatmesh.db, .run/jwt-secret) land there.
    # A shell's usual umask (022): what the mesh writes must be private by its own doing.
    mesh = subprocess.Popen(
        [sys.executable, "-m", "chatmesh", "run"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        umask=0o022,
    )
    try:
        text = read_until(mesh, "Press Ctrl-C")
        assert "ready on" in text and "A dev token for user 'dev'" in text
        assert (
            "models     gemma-3-270m, smollm2-135m-instruct  (the first is the default; CHATMESH_MESH_MODELS;"
            in text
        )
        # The welcome says where Envoy really listens: this machine only, by default.
        assert f"listening on 127.0.0.1:{ports['gateway']}: reachable from this machine only" in text

        # The chat service works with a token from the dev key that the mesh created (through the SDK's
        # blocking client, as a script would use it).
        keys = JwtKeys.hs256(load_or_create_secret(tmp_path / ".run" / "jwt-secret"))
        token = issue_token(keys, "dev")
        with ChatClient(f"127.0.0.1:{ports['chat']}", token=token) as client:
            reply = client.complete("Hello!", max_tokens=4)
            assert reply.assistant_message_id
            assert [c.chat_id for c in client.iter_chats()] == [reply.chat_id]
        # ... and so does the REST API through the gateway, with the curl the mesh printed.
        assert f'curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:{ports["gateway"]}/chats' in text
        headers = {"Authorization": f"Bearer {token}"}
        chats = httpx.get(f"http://127.0.0.1:{ports['gateway']}/chats", headers=headers, timeout=10)
        assert chats.status_code == 200, chats.text
        assert [c["chat_id"] for c in chats.json()["chats"]] == [reply.chat_id]
        scrape_every_metrics_endpoint(text, metrics, ports["admin"])
        chat_on_the_second_model(f"http://127.0.0.1:{ports['gateway']}", headers)
        # ... and an asynchronous job, queued on the mesh's own NATS and answered by a replica.
        job = submit_job_and_wait(f"http://127.0.0.1:{ports['gateway']}", headers, reply.chat_id)
        assert job["state"] == "JOB_STATE_SUCCEEDED", job
        assert job["reply"]["message_id"]
        assert (tmp_path / ".run" / "nats").is_dir(), "the bundled NATS keeps its streams under .run"
        # A crashed service is restarted while the rest keep serving.
        heal_after_a_crash(mesh, ports, headers)
        # ... and the terminal client, through the gateway, with a dev token it signs itself.
        said = terminal_client(tmp_path, env, ports["gateway"], "-m", "Hi!").strip().splitlines()[-1]
        assert said.startswith("[chat "), said
        listed = terminal_client(tmp_path, env, ports["gateway"], "--list")
        assert said.removeprefix("[chat ").removesuffix("]") in listed
        # The mesh accounts by default: the reply above is in the user's usage, and no budget limits them.
        usage = terminal_client(tmp_path, env, ports["gateway"], typed="/usage\n")
        assert " completion tokens, 0 cached, 1 requests" in usage, usage
        assert "you, today: " in usage and "no limit" in usage, usage
        assert httpx.get(f"http://127.0.0.1:{ports['gateway']}/chats", timeout=10).status_code == 401
        assert (tmp_path / ".run" / "chatmesh.db").exists(), "the embedded SQLite default is used"
        assert_private(tmp_path / ".run")

        mesh.send_signal(signal.SIGINT)
        rest, _ = mesh.communicate(timeout=30)
        assert mesh.returncode == 0, rest[-3000:]
        assert "chatmesh: stopped" in rest
    finally:
        stop_after_a_failure(mesh)
    # Every service process is gone (each runs in its own session, so look them up by port owner).
    for port in ports.values():
        probe = subprocess.run(
            ["ss", "-ltn", f"sport = :{port}"], capture_output=True, text=True, check=False
        )
        assert str(port) not in probe.stdout, f"something still listens on {port}"
    assert not process_group_members(mesh.pid)
