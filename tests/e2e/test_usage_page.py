"""The page's account views in a real browser (Debian's Chromium, driven by playwright) against the real
mesh: Usage (own tokens by day and model, budgets), API keys (the secret shown once, revoked), and the
admin's team view (a chart per day, per user and group, budgets, a user's keys), with one user made an
admin by the chat service's settings (`CHATMESH_CHAT_ADMIN_USERS`).

The browser, page and helpers are tests/e2e/test_web_page.py's; the site is this module's own (the admin
setting, the session's standard engine).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from chatmesh.common.auth import DEV_SECRET_FILE
from tests.e2e import test_web_page as web
from tests.e2e.test_web_page import Site, last_reply, send, sign_in
from tests.support.databases import fresh_postgres_database
from tests.support.stack import chat_stack
from tests.support.waiting import eventually_sync

pytestmark = pytest.mark.e2e

ADMIN = "admin-user"

# The page module's browser and page fixtures, here by name (they take this module's `site`).
browser = web.browser
page = web.page


@pytest.fixture(scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory, inference_address: str) -> AsyncIterator[Site]:
    gateway = {
        "jwt_secret": None,
        "jwt_secret_file": DEV_SECRET_FILE,
        "dev_sign_in": True,
        # The edge's per-user rate limit is tested elsewhere; here it would only race the page's reads.
        "rate_limit_per_s": 0,
    }
    async with (
        fresh_postgres_database() as url,
        chat_stack(
            inference_address,
            url,
            envoy_dir=tmp_path_factory.mktemp("envoy"),
            gateway=gateway,
            dev_sign_in=True,
            jwt_secret=None,
            admin_users=[ADMIN],
        ) as stack,
    ):
        yield Site(stack.envoy, url)


def token_of(page: Page) -> str:
    return str(page.evaluate("localStorage.getItem('chatmesh.token')"))


def call(site: Site, method: str, path: str, token: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(
        method, site.envoy.base_url + path, headers={"authorization": f"Bearer {token}"}, **kwargs
    )


def chat_once(page: Page) -> str:
    """Sends a question and waits for the reply; the model that wrote it."""
    send(page, "Name a colour.")
    expect(last_reply(page)).to_have_attribute("data-state", "done", timeout=60_000)
    return last_reply(page).locator(".badge.model").text_content() or ""


def usage_of(site: Site, token: str) -> list[dict[str, Any]]:
    reply = call(site, "GET", "/usage", token)
    assert reply.status_code == 200, reply.text
    return list(reply.json().get("usage", []))


def sign_in_and_wait_for_the_account(page: Page, site: Site, user: str) -> None:
    """Signs in and waits for the page to have asked GET /usage who the user is (admin or not)."""
    with page.expect_response(lambda response: "/usage?" in response.url):
        sign_in(page, site, user)


def test_usage_shows_the_tokens_of_a_chat_by_day_and_model(page: Page, site: Site) -> None:
    sign_in(page, site, f"usage-{uuid.uuid4().hex[:6]}")
    model = chat_once(page)
    assert model
    token = token_of(page)
    # Recorded with the reply; waited for through the API, then shown by the page.
    eventually_sync(lambda: bool(usage_of(site, token)), "the chat's usage is recorded")
    [recorded] = usage_of(site, token)

    page.click("#nav-usage")
    expect(page.locator("#usage-view")).to_be_visible()
    expect(page.locator("#chat-view")).to_be_hidden()
    row = page.locator(f"#usage-table tbody tr[data-model='{model}']")
    expect(row).to_have_count(1)
    cells = row.locator("td")
    expect(cells.nth(0)).to_have_text(recorded["day"])
    prompt, completion, cached, requests = (
        int((cells.nth(i).text_content() or "").replace(",", "")) for i in range(2, 6)
    )
    assert prompt > 0 and completion > 0 and cached == 0 and requests == 1
    assert (prompt, completion) == (int(recorded["prompt_tokens"]), int(recorded["completion_tokens"]))
    # The mesh's default budgets are 0: each one the user has is shown without a limit.
    budgets = page.locator("#budgets .budget")
    expect(budgets.first).to_be_visible()
    for i in range(budgets.count()):
        expect(budgets.nth(i)).to_contain_text("no limit")
    # And back to the chat, which is still there.
    page.locator("#chat-list li .open").first.click()
    expect(page.locator("#chat-view")).to_be_visible()
    expect(page.locator("#messages .message.user")).to_have_text(["Name a colour."])


def test_a_key_is_shown_once_then_only_its_prefix_and_is_revoked(page: Page, site: Site) -> None:
    sign_in(page, site, f"keys-{uuid.uuid4().hex[:6]}")
    page.click("#nav-keys")
    expect(page.locator("#keys-empty")).to_be_visible()
    page.fill("#key-name", "laptop scripts")
    page.uncheck("input[name=key-scope][value=KEY_SCOPE_CHAT]")
    page.fill("#key-expiry", "30")
    page.click("#key-form button[type=submit]")

    expect(page.locator("#key-secret")).to_be_visible()
    expect(page.locator("#key-secret")).to_contain_text("shown only this once")
    secret = page.locator("#key-secret-value").text_content() or ""
    row = page.locator("#keys-table tbody tr")
    expect(row).to_have_count(1)
    expect(row.locator("td").nth(0)).to_have_text("laptop scripts")
    expect(row.locator("td").nth(2)).to_have_text("OpenAI, usage")
    expect(row).to_have_attribute("data-status", "active")
    prefix = (row.locator("td").nth(1).text_content() or "").removesuffix("…")
    assert prefix and secret.startswith(prefix) and len(secret) > len(prefix)
    # The secret shown is the key: it has the OpenAI API (its scope), not the chat API.
    assert call(site, "GET", "/v1/models", secret).status_code == 200
    assert call(site, "GET", "/chats", secret).status_code == 403
    page.click("#key-copy")
    expect(page.locator("#key-copy")).not_to_have_text("Copy")

    # After a reload: the key listed by its prefix, the secret nowhere.
    page.reload()
    expect(page.locator("#keys-view")).to_be_visible()
    expect(row).to_have_count(1)
    expect(row.locator("td").nth(1)).to_have_text(f"{prefix}…")
    expect(page.locator("#key-secret")).to_be_hidden()
    assert secret not in page.content()

    row.locator("button.revoke").click()  # confirmed by the page fixture's dialog handler
    expect(row).to_have_attribute("data-status", "revoked")
    expect(row.locator("button.revoke")).to_have_count(0)
    eventually_sync(
        lambda: call(site, "GET", "/v1/models", secret).status_code == 401, "the revoked key is refused"
    )


def test_a_non_admin_sees_no_admin_entry_and_is_refused_the_admin_api(page: Page, site: Site) -> None:
    sign_in_and_wait_for_the_account(page, site, f"user-{uuid.uuid4().hex[:6]}")
    expect(page.locator("#nav-usage")).to_be_visible()
    expect(page.locator("#nav-admin")).to_be_hidden()
    token = token_of(page)
    assert call(site, "GET", "/admin/usage", token).status_code == 403
    assert call(site, "GET", "/admin/budgets", token).status_code == 403
    # The view typed into the address bar shows the refusal, and no team data.
    page.goto(site.url + "#admin")
    expect(page.locator("#admin-error")).not_to_be_empty()
    expect(page.locator("#admin-users tbody tr")).to_have_count(0)
    expect(page.locator("#admin-chart svg")).to_have_count(0)


def chatted(page: Page, site: Site, user: str) -> tuple[str, dict[str, Any]]:
    """Signs `user` in and chats once: their token and the usage recorded."""
    sign_in(page, site, user)
    chat_once(page)
    token = token_of(page)
    eventually_sync(lambda: bool(usage_of(site, token)), "the chat's usage is recorded")
    [recorded] = usage_of(site, token)
    return token, recorded


def admin_page(browser: Browser, site: Site) -> tuple[BrowserContext, Page]:
    """The admin, signed in in a context of their own, on the admin view."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    admin = context.new_page()
    admin.on("dialog", lambda dialog: dialog.accept())  # the revoke's confirm
    sign_in_and_wait_for_the_account(admin, site, ADMIN)
    expect(admin.locator("#nav-admin")).to_be_visible()
    admin.click("#nav-admin")
    return context, admin


def test_the_admin_sees_the_team_chart_and_tables_and_revokes_a_users_key(
    page: Page, browser: Browser, site: Site
) -> None:
    user = f"team-{uuid.uuid4().hex[:6]}"
    user_token, recorded = chatted(page, site, user)
    key = call(site, "POST", "/keys", user_token, json={"name": "ci"})
    assert key.status_code == 200, key.text
    context, admin = admin_page(browser, site)
    try:
        # The chart: the day's stacked bars (prompt and completion tokens of the user's chat at least).
        bars = admin.locator(f"#admin-chart svg rect.bar[data-day='{recorded['day']}']")
        expect(bars.first).to_be_visible()
        series = {bars.nth(i).get_attribute("data-series") for i in range(bars.count())}
        assert series >= {"prompt", "completion"}, series
        expect(admin.locator("#chart-legend li")).to_have_text(["prompt", "completion", "cached"])
        admin.select_option("#chart-by", "user")
        expect(admin.locator(f"#admin-chart rect.bar[data-series='{user}']")).to_have_count(1)
        user_row = admin.locator(f"#admin-users tbody tr[data-user='{user}']")
        expect(user_row).to_have_count(1)
        expect(user_row.locator("td").nth(5)).to_have_text("1")
        expect(admin.locator("#admin-groups tbody tr").first).to_be_visible()

        # The user's keys, revoked by the admin.
        user_row.locator("button", has_text="Keys").click()
        key_row = admin.locator("#user-keys-table tbody tr")
        expect(key_row).to_have_count(1)
        expect(key_row).to_have_attribute("data-status", "active")
        key_row.locator("button.revoke").click()
        expect(key_row).to_have_attribute("data-status", "revoked")
        secret = key.json()["secret"]
        eventually_sync(lambda: call(site, "GET", "/v1/models", secret).status_code == 401, "key refused")
    finally:
        context.close()


def test_a_budget_the_admin_sets_stops_the_user_in_the_servers_words_until_cleared(
    page: Page, browser: Browser, site: Site
) -> None:
    user = f"budget-{uuid.uuid4().hex[:6]}"
    user_token, _ = chatted(page, site, user)
    context, admin = admin_page(browser, site)
    try:
        # A day budget of one token for the user: spent already.
        admin.select_option("#budget-scope", "BUDGET_SCOPE_USER")
        admin.fill("#budget-subject", user)
        admin.select_option("#budget-period", "BUDGET_PERIOD_DAY")
        admin.fill("#budget-limit", "1")
        admin.click("#budget-set")
        budget_row = admin.locator(
            f"#admin-budgets tbody tr[data-subject='{user}'][data-period='BUDGET_PERIOD_DAY']"
        )
        expect(budget_row).to_have_count(1)
        expect(budget_row).to_contain_text("set by an admin")

        # The user sees it spent, and their next turn is refused in the server's words.
        page.click("#nav-usage")
        card = page.locator("#budgets .budget[data-scope=BUDGET_SCOPE_USER][data-period=BUDGET_PERIOD_DAY]")
        expect(card).to_contain_text("of 1 tokens used, 0 left")
        expect(card.locator(".fill.spent")).to_have_count(1)
        expect(card.locator(".budget-reset")).to_contain_text("Resets")
        page.locator("#chat-list li .open").first.click()
        send(page, "Name another colour.")
        failure = last_reply(page).locator(".failure span")
        expect(failure).to_contain_text("budget")
        refused = call(site, "POST", "/chat", user_token, json={"content": "Name a fruit."})
        assert refused.status_code == 429, refused.text
        expect(failure).to_have_text(refused.json()["message"])

        # Cleared: the default (no limit) applies again, and the user's Retry goes through.
        budget_row.locator("button", has_text="Clear").click()
        expect(budget_row).to_have_count(0)
        last_reply(page).locator(".failure button").click()
        expect(last_reply(page)).to_have_attribute("data-state", "done", timeout=60_000)
    finally:
        context.close()
