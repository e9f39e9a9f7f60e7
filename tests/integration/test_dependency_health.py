"""The chat service's gRPC health follows its dependencies: NOT_SERVING while the inference service (or
the database: tests/integration/test_database_restart.py) does not answer, SERVING again once it does.
A real inference service, stopped and started again on the same address by the test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.support.processes import (
    LoggedProcess,
    free_port,
    log_entries,
    run_service,
    start_process,
    stop_process,
    wait_until_serving,
)
from tests.support.services import MODEL_STARTUP_TIMEOUT_S, NOT_SERVING, SERVING, chat_health
from tests.support.stack import chat_env, standard_engine_env
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


def start_engine(address: str) -> LoggedProcess:
    """An inference service on `address`, once it is SERVING."""
    engine = start_process([sys.executable, "-m", "inference_service"], standard_engine_env(address))
    try:
        wait_until_serving(engine, address, MODEL_STARTUP_TIMEOUT_S)
    except BaseException:
        stop_process(engine)
        raise
    return engine


async def test_health_is_not_serving_while_the_inference_service_is_down(tmp_path: Path) -> None:
    engine_address, chat = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    engine = start_engine(engine_address)
    try:
        env = chat_env(
            chat,
            f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}",
            engine_address,
            health_check_interval_s=0.1,
            health_check_timeout_s=1,
        )
        with run_service("chat_service", env, chat, 60) as chat_process:
            assert await chat_health(chat) == {SERVING}

            stop_process(engine)

            async def not_serving() -> bool:
                return await chat_health(chat) == {NOT_SERVING}

            await eventually(not_serving, "NOT_SERVING after the inference service stopped")
            unreachable = [
                entry
                for entry in log_entries(chat_process)
                if entry.get("msg", "").startswith("dependencies unreachable")
            ]
            assert unreachable and "inference" in unreachable[-1]["failing"]
            assert "database" not in unreachable[-1]["failing"]

            engine = start_engine(engine_address)

            async def serving() -> bool:
                return await chat_health(chat) == {SERVING}

            await eventually(serving, "SERVING again once the inference service is back")
    finally:
        stop_process(engine)
