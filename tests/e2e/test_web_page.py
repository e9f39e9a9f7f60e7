"""The chat web page in a real browser (Debian's Chromium, driven by playwright) against the real mesh:
Envoy serving the page and the API, a chat replica with the dev sign-in, the session's two-model engine
(tests/e2e/conftest.py).

Set CHATMESH_UPDATE_SCREENSHOT=1 to write docs/screenshot.png from the conversation test.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Dialog, Locator, Page, expect, sync_playwright

from chat_service.domain import FinishReason, HistoryStrategy
from chat_service.storage.base import Lease
from chat_service.storage.sql import open_sql_store
from chatmesh.common.auth import DEV_SECRET_FILE
from gateway import EnvoyProcess
from tests.e2e.conftest import DEFAULT_MODEL, SECOND_MODEL
from tests.support.databases import fresh_postgres_database
from tests.support.processes import LoggedProcess
from tests.support.services import COUNTING_SYSTEM_PROMPT
from tests.support.stack import chat_stack
from tests.support.waiting import eventually_sync

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("CHATMESH_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "screenshot.png"
XSS = "Look: <img src=x onerror=alert(1)> and [click me](javascript:alert(2)) <script>alert(3)</script>"


@dataclass
class Site:
    envoy: EnvoyProcess
    database_url: str

    @property
    def url(self) -> str:
        return self.envoy.base_url + "/"


@pytest.fixture(scope="module")
async def site(
    tmp_path_factory: pytest.TempPathFactory,
    embedding_service: tuple[str, LoggedProcess],
    two_models_address: str,
) -> AsyncIterator[Site]:
    # The two-model engine: a model picker with a choice, and replies as long as under `make run` (the
    # session's standard engine stops at 24 tokens, too soon to press Stop in the middle of one).
    gateway = {
        "jwt_secret": None,
        "jwt_secret_file": DEV_SECRET_FILE,
        "dev_sign_in": True,
        # A test's page loads, lists and completions stay well within the burst; a spent bucket
        # refills slowly enough for the page to meet the 429.
        "rate_limit_per_s": 2,
        "rate_limit_burst": 20,
    }
    async with (
        fresh_postgres_database() as url,
        chat_stack(
            two_models_address,
            url,
            envoy_dir=tmp_path_factory.mktemp("envoy"),
            gateway=gateway,
            dev_sign_in=True,
            # The dev sign-in runs only with the mesh's own dev secret, as under `make run`.
            jwt_secret=None,
            # The semantic cache on, as under `make run` (its own collection).
            cache_address=embedding_service[0],
            cache_collection=f"web_{uuid.uuid4().hex[:8]}",
        ) as stack,
    ):
        yield Site(stack.envoy, url)


@pytest.fixture(scope="module")
def browser(site: Site) -> Iterator[Browser]:
    # After `site`: playwright's sync API keeps an event loop of its own running in this thread, in
    # which the async fixture could not be set up.
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make install-test` installs Debian's chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    dialogs: list[str] = []

    def on_dialog(dialog: Dialog) -> None:
        # Only the page's own confirm (delete) and prompt (rename, answered by its test) are expected;
        # an alert is a failure.
        dialogs.append(f"{dialog.type}: {dialog.message}")
        if dialog.type == "alert":
            dialog.dismiss()
        elif dialog.type == "confirm":
            dialog.accept()

    page.on("dialog", on_dialog)
    yield page
    assert not [d for d in dialogs if d.startswith("alert")], dialogs
    context.close()


def sign_in(page: Page, site: Site, user: str) -> None:
    page.goto(site.url)
    page.fill("#user-name", user)
    page.click("#sign-in-form button[type=submit]")
    expect(page.locator("#who")).to_have_text(user)


def last_reply(page: Page) -> Locator:
    return page.locator("#messages .message.assistant").last


def send(page: Page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


RECORD_GROWTH = """() => {
  window.__growth = [];
  const messages = document.getElementById("messages");
  new MutationObserver(() => {
    const reply = messages.querySelector(".message.assistant:last-of-type");
    if (reply) window.__growth.push([reply.dataset.state, reply.querySelector(".body").textContent.length]);
  }).observe(messages, { subtree: true, childList: true, characterData: true, attributes: true });
}"""


def test_the_page_is_served_with_a_policy_that_forbids_inline_scripts(site: Site) -> None:
    reply = httpx.get(site.url)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/html")
    policy = reply.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    # No inline script or event-handler attribute for the policy to have to allow.
    assert "<script>" not in reply.text and not re.search(r"\son[a-z]+\s*=", reply.text)
    script = httpx.get(site.envoy.base_url + "/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    # The sign-in endpoint needs no token; the API does.
    assert httpx.post(site.envoy.base_url + "/dev/sign-in", json={"user": "x y"}).status_code == 400
    assert httpx.get(site.envoy.base_url + "/chats").status_code == 401


def test_a_conversation_streams_stops_and_survives_a_reload(page: Page, site: Site) -> None:
    user = f"web-{uuid.uuid4().hex[:6]}"
    sign_in(page, site, user)
    send(page, "What is the capital of France?")
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-state", "done", timeout=60_000)
    # textContent, what to_have_text compares below (inner_text adds line breaks between paragraphs).
    first_answer = reply.locator(".body").text_content() or ""
    assert first_answer.strip()
    expect(page.locator("#chat-list li")).to_have_count(1)
    expect(page.locator("#chat-title")).to_have_text("What is the capital of France?")

    # A long reply, stopped half-way: the partial answer stays, marked stopped.
    page.click("#new-chat")
    page.click("#toggle-settings")
    page.fill("#system-prompt", COUNTING_SYSTEM_PROMPT)
    page.click("#settings button[type=submit]")
    page.evaluate(RECORD_GROWTH)
    send(page, "Count to 300.")
    reply = last_reply(page)
    page.wait_for_function(
        "() => { const b = document.querySelector('#messages .message.assistant:last-of-type .body');"
        " return b && b.textContent.trim().length > 20; }",
        timeout=60_000,
    )
    growth = page.evaluate("window.__growth")
    streaming = sorted({length for state, length in growth if state == "streaming" and length > 0})
    assert len(streaming) >= 2, f"the reply grew in several steps while streaming: {growth}"
    page.click("#stop")
    expect(reply).to_have_attribute("data-state", "stopped")
    # Trimmed on both sides of the comparison: inner_text drops the trailing space that textContent has
    # after "7," while the next number is on its way.
    partial = reply.locator(".body").inner_text()
    assert len(partial.strip()) > 20
    expect(page.locator("#chat-list li")).to_have_count(2)
    stopped_chat = page.locator("#chat-list li").first.get_attribute("data-chat-id")
    token = page.evaluate("localStorage.getItem('chatmesh.token')")

    def reply_stored() -> bool:
        messages = httpx.get(
            f"{site.envoy.base_url}/chat/{stopped_chat}/messages",
            headers={"authorization": f"Bearer {token}"},
        ).json()["messages"]
        return len(messages) == 2 and messages[1].get("finish_reason") == "FINISH_REASON_CANCELLED"

    eventually_sync(reply_stored, "the server stores the stopped reply")

    # After a reload the history is there: the newest chat first, its stopped reply kept by the server.
    page.reload()
    titles = page.locator("#chat-list li .open")
    expect(titles).to_have_count(2)
    expect(titles.first).to_have_text("Count to 300.")
    titles.first.click()
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-state", "stopped")
    assert reply.locator(".body").inner_text().startswith(partial[:20])
    # And the other chat holds its own conversation.
    titles.nth(1).click()
    expect(page.locator("#messages .message.user")).to_have_text(["What is the capital of France?"])
    expect(last_reply(page).locator(".body")).to_have_text(first_answer)

    if os.environ.get("CHATMESH_UPDATE_SCREENSHOT"):
        send(page, "Write a Python function that adds two numbers, in a code block.")
        expect(last_reply(page)).to_have_attribute("data-state", "done", timeout=60_000)
        page.screenshot(path=str(SCREENSHOT))


def test_a_chat_on_the_second_model_is_labelled_with_it_and_switched_in_its_settings(
    page: Page, site: Site
) -> None:
    sign_in(page, site, f"web-{uuid.uuid4().hex[:6]}")
    picker = page.locator("#model-picker")
    # Filled from GET /models, the default chosen.
    expect(picker.locator("option")).to_have_count(2)
    expect(picker).to_have_value(DEFAULT_MODEL)
    picker.select_option(SECOND_MODEL)
    send(page, "Name a colour.")
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-state", "done", timeout=60_000)
    expect(reply.locator(".badge.model")).to_have_text(SECOND_MODEL)
    # The chat exists now: its model is shown, and the picker for a new chat is gone.
    expect(page.locator("#chat-model-name")).to_have_text(SECOND_MODEL)
    expect(page.locator("#model-picker-label")).to_be_hidden()

    # Switched in the chat's settings: the next reply is the default model's.
    page.click("#toggle-settings")
    expect(page.locator("#chat-model")).to_have_value(SECOND_MODEL)
    page.select_option("#chat-model", DEFAULT_MODEL)
    page.click("#settings button[type=submit]")
    expect(page.locator("#settings")).to_be_hidden()
    expect(page.locator("#chat-model-name")).to_have_text(DEFAULT_MODEL)
    send(page, "Name another colour.")
    expect(last_reply(page)).to_have_attribute("data-state", "done", timeout=60_000)
    expect(last_reply(page).locator(".badge.model")).to_have_text(DEFAULT_MODEL)

    # After a reload each stored reply names the model that wrote it; a new chat starts on the default.
    page.reload()
    expect(page.locator("#model-picker")).to_have_value(DEFAULT_MODEL)
    page.locator("#chat-list li .open").first.click()
    expect(page.locator("#messages .message.assistant .badge.model")).to_have_text(
        [SECOND_MODEL, DEFAULT_MODEL]
    )
    expect(page.locator("#chat-model-name")).to_have_text(DEFAULT_MODEL)


def test_an_answer_from_the_cache_wears_a_badge(page: Page, site: Site) -> None:
    sign_in(page, site, f"web-{uuid.uuid4().hex[:6]}")
    question = "Which is the largest ocean on Earth?"

    def asked_until_cached() -> bool:
        # The first answer is stored in the cache in the background; ask again in a new chat until the
        # cache serves it (an answer cut off by its length is never stored: then every try generates).
        page.click("#new-chat")
        send(page, question)
        reply = last_reply(page)
        expect(reply).not_to_have_attribute("data-state", "streaming", timeout=60_000)
        return reply.get_attribute("data-cached") == "true"

    eventually_sync(asked_until_cached, "an answer served from the cache", timeout_s=60)
    expect(last_reply(page).locator(".badge.cached")).to_have_text("cached")


def test_rename_and_delete_a_chat(page: Page, site: Site) -> None:
    sign_in(page, site, f"web-{uuid.uuid4().hex[:6]}")
    for question in ("Name a colour.", "Name a fruit."):
        page.click("#new-chat")
        send(page, question)
        expect(last_reply(page)).to_have_attribute("data-state", "done", timeout=60_000)
    chats = page.locator("#chat-list li")
    expect(chats).to_have_count(2)
    page.once("dialog", lambda dialog: dialog.accept("Fruit talk"))
    page.click("#rename-chat")
    expect(page.locator("#chat-title")).to_have_text("Fruit talk")
    expect(chats.first.locator(".open")).to_have_text("Fruit talk")
    chats.first.hover()
    chats.first.locator(".delete").click()  # confirmed by the page fixture's dialog handler
    expect(chats).to_have_count(1)
    expect(page.locator("#chat-title")).to_have_text("New chat")
    page.reload()
    expect(page.locator("#chat-list li .open")).to_have_text(["Name a colour."])


async def _store_tricky_chat(database_url: str, user: str) -> None:
    async with open_sql_store(database_url, migrate=False) as store:
        chat, _ = await store.create_chat(user, "Tricky reply", "", HistoryStrategy.FULL)
        question, _ = await store.add_user_message(user, chat.id, "Say something tricky.", 5, None)
        await store.add_assistant_message(user, chat.id, question.id, XSS, 20, FinishReason.STOP)


def test_markup_in_a_reply_is_shown_as_text_and_runs_nothing(page: Page, site: Site) -> None:
    user = f"web-{uuid.uuid4().hex[:6]}"
    # A reply as the model could write it, stored in the real database (the model cannot be made to).
    # In a thread of its own: playwright's sync API keeps an event loop running in this one.
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, _store_tricky_chat(site.database_url, user)).result()
    sign_in(page, site, user)
    page.click("#chat-list li .open")
    body = last_reply(page).locator(".body")
    expect(body).to_contain_text("<img src=x onerror=alert(1)>")
    expect(body).to_contain_text("<script>alert(3)</script>")
    assert body.locator("img, script").count() == 0
    assert page.locator("a[href^='javascript']").count() == 0
    expect(body).to_contain_text("[click me](javascript:alert(2))")


async def _hold_completion_slots(database_url: str, user: str, count: int) -> list[uuid.UUID]:
    """Take `count` of the user's concurrent-completion slots, as completions running on another replica
    would hold them (leased rows in the shared database)."""
    async with open_sql_store(database_url, migrate=False) as store:
        held = [uuid.uuid4() for _ in range(count)]
        for slot in held:
            assert await store.take_generation_slot(user, slot, Lease("replica-elsewhere", 600), count)
        return held


async def _release_completion_slot(database_url: str, slot: uuid.UUID) -> None:
    async with open_sql_store(database_url, migrate=False) as store:
        await store.release_generation_slot(slot)


def test_errors_show_in_place_with_a_retry(page: Page, site: Site) -> None:
    user = f"web-{uuid.uuid4().hex[:6]}"
    sign_in(page, site, user)
    # The user already runs as many completions as the per-user limit allows (the default, 2), so the
    # page's question is refused with 429 whatever the timing. (Spending the edge's rate-limit bucket
    # instead raced its refill: on a loaded machine the page's request came after a token was back.)
    # In a thread of its own: playwright's sync API keeps an event loop running in this one.
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        held = thread.submit(asyncio.run, _hold_completion_slots(site.database_url, user, 2)).result()
        send(page, "Name a planet.")
        failure = last_reply(page).locator(".failure")
        expect(failure).to_contain_text("Too busy")
        expect(failure).to_contain_text("CHATMESH_CHAT_MAX_CONCURRENT_COMPLETIONS_PER_USER")
        thread.submit(asyncio.run, _release_completion_slot(site.database_url, held[0])).result()

    last_reply(page).locator(".failure button").click()
    expect(last_reply(page)).to_have_attribute("data-state", "done", timeout=60_000)
    expect(page.locator("#messages .message.user")).to_have_count(1)


def test_a_phone_width_screen_keeps_the_chats_behind_a_button(browser: Browser, site: Site) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    page = context.new_page()
    try:
        sign_in(page, site, f"web-{uuid.uuid4().hex[:6]}")
        expect(page.locator("#sidebar")).not_to_be_in_viewport()
        page.click("#toggle-sidebar")
        expect(page.locator("#new-chat")).to_be_in_viewport()
        page.click("#new-chat")
        expect(page.locator("#sidebar")).not_to_be_in_viewport()
        expect(page.locator("#prompt")).to_be_in_viewport()
    finally:
        context.close()


def test_shift_enter_makes_a_new_line_and_enter_sends(page: Page, site: Site) -> None:
    sign_in(page, site, f"web-{uuid.uuid4().hex[:6]}")
    page.fill("#prompt", "first line")
    page.press("#prompt", "Shift+Enter")
    page.type("#prompt", "second line")
    expect(page.locator("#messages .message")).to_have_count(0)
    page.press("#prompt", "Enter")
    expect(page.locator("#messages .message.user")).to_have_text(["first line\nsecond line"])
    expect(last_reply(page)).to_have_attribute("data-state", "done", timeout=60_000)


def dev_token(site: Site, user: str) -> str:
    reply = httpx.post(site.envoy.base_url + "/dev/sign-in", json={"user": user})
    assert reply.status_code == 200, reply.text
    return str(reply.json()["token"])


def test_a_link_with_another_users_token_asks_before_switching_users(page: Page, site: Site) -> None:
    alice, mallory = (f"web-{uuid.uuid4().hex[:6]}" for _ in range(2))
    sign_in(page, site, alice)
    expect(page.locator(".signed-in-as")).to_have_text(f"Signed in as {alice}")
    alices_token = page.evaluate("localStorage.getItem('chatmesh.token')")
    # A link someone else made, with a token of theirs (login CSRF): opened in the signed-in tab.
    page.goto(f"{site.url}#token={dev_token(site, mallory)}")
    dialog = page.locator("#switch-user")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text(f"sign you in as {mallory}")
    expect(dialog).to_contain_text(f"You are signed in as {alice}")
    expect(page.locator("#switch-cancel")).to_have_text(f"Stay signed in as {alice}")
    expect(page.locator("#switch-accept")).to_have_text(f"Sign in as {mallory}")
    # Nothing is switched while the question is open, and the token left the address bar.
    assert page.evaluate("localStorage.getItem('chatmesh.token')") == alices_token
    assert "token=" not in page.url
    page.click("#switch-cancel")
    expect(dialog).to_be_hidden()
    expect(page.locator("#who")).to_have_text(alice)
    assert page.evaluate("localStorage.getItem('chatmesh.token')") == alices_token
    # After a reload too: still alice.
    page.reload()
    expect(page.locator("#who")).to_have_text(alice)

    # A link followed on purpose: the user says yes, and the page says who is signed in now.
    page.goto(f"{site.url}#token={dev_token(site, mallory)}")
    page.click("#switch-accept")
    expect(page.locator("#who")).to_have_text(mallory)
    expect(page.locator(".signed-in-as")).to_have_text(f"Signed in as {mallory}")
    assert page.evaluate("localStorage.getItem('chatmesh.user')") == mallory


def test_a_link_with_a_token_asks_before_signing_in_someone_who_was_not(browser: Browser, site: Site) -> None:
    context = browser.new_context()
    page = context.new_page()
    try:
        bob = f"web-{uuid.uuid4().hex[:6]}"
        page.goto(f"{site.url}#token={dev_token(site, bob)}")
        expect(page.locator("#switch-user")).to_contain_text(f"sign you in as {bob}")
        expect(page.locator("#switch-current-line")).to_be_hidden()
        assert page.evaluate("localStorage.getItem('chatmesh.token')") is None
        page.click("#switch-cancel")
        expect(page.locator("#sign-in")).to_be_visible()
        assert page.evaluate("localStorage.getItem('chatmesh.token')") is None
        # A fresh token of the user already signed in is taken without a question.
        sign_in(page, site, bob)
        page.goto(f"{site.url}#token={dev_token(site, bob)}")
        expect(page.locator("#switch-user")).to_be_hidden()
        expect(page.locator("#who")).to_have_text(bob)
    finally:
        context.close()


def test_chromium_is_the_one_make_installs() -> None:
    assert shutil.which("chromium") or Path(CHROMIUM).exists()
