"""Envoy routes around a chat replica whose database is down: the replica reports NOT_SERVING (its
dependency checks), Envoy's active health checks see it, and every call goes to the other replica until
the database is back. Real Envoy, two chat replicas on two PostgreSQL servers (one private, stopped and
started by the test), the session's inference service."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway import run_envoy
from tests.e2e.test_gateway import host_stats, new_user
from tests.support.chat import bearer
from tests.support.databases import PrivatePostgres, fresh_postgres_database, private_postgres
from tests.support.services import NOT_SERVING, SERVING, chat_health
from tests.support.stack import chat_service, gateway_settings
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e


@pytest.fixture
def postgres() -> Iterator[PrivatePostgres]:
    with private_postgres() as server:
        yield server


async def test_envoy_routes_around_a_replica_whose_database_is_down(
    postgres: PrivatePostgres, inference_address: str, tmp_path: Path
) -> None:
    async with fresh_postgres_database() as shared_url:
        with (
            chat_service(shared_url, inference_address, health_check_interval_s=0.1) as steady_replica,
            chat_service(postgres.url, inference_address, health_check_interval_s=0.1) as doomed_replica,
        ):
            steady, doomed = steady_replica.address, doomed_replica.address
            settings = gateway_settings([steady, doomed], rate_limit_per_s=0)
            async with (
                run_envoy(settings, tmp_path / "envoy") as envoy,
                httpx.AsyncClient(base_url=envoy.base_url, timeout=30) as http,
            ):
                headers = bearer(new_user())

                async def envoy_sees(address: str, healthy: bool) -> bool:
                    flags = (await host_stats(envoy)).get(address, {}).get("health_flags", "")
                    return ("failed_active_hc" not in flags) is healthy

                postgres.stop()
                await eventually(lambda: chat_health_is(doomed, NOT_SERVING), "the replica says NOT_SERVING")
                await eventually(lambda: envoy_sees(doomed, False), "Envoy marks the replica unhealthy")
                before = (await host_stats(envoy))[doomed].get("rq_total", "0")
                for _ in range(20):
                    listed = await http.get("/chats", headers=headers)
                    assert listed.status_code == 200, listed.text
                assert (await host_stats(envoy))[doomed].get("rq_total", "0") == before, "none went to it"

                postgres.start()
                await eventually(lambda: chat_health_is(doomed, SERVING), "SERVING once the database is back")
                await eventually(
                    lambda: envoy_sees(doomed, True), "Envoy takes the replica back", timeout_s=30
                )


async def chat_health_is(address: str, status: int) -> bool:
    return await chat_health(address) == {status}
