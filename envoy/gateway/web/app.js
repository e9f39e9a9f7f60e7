// The chat page: the REST API of the gateway it is served by, with the token in Authorization.
import { renderMarkdown } from "/markdown.js";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "chatmesh.token";
const USER_KEY = "chatmesh.user";
const PAGE = 20;

const state = {
  token: null,
  chatId: null, // null: a new chat, created by its first message
  chat: null,
  chats: new Map(), // chat id -> the chat as listed (or as last changed): its title, settings, model
  nextPage: "",
  running: null, // AbortController of the reply streaming now
  models: [], // the served models' names, the default first (GET /models)
  defaultModel: "",
  draft: null, // the new chat's settings, sent with its first message
  view: "chat", // what the main area shows: "chat", or an account view (ACCOUNT_VIEWS)
  admin: false, // whether GET /usage says this user may use the admin API
  teamUsage: null, // the admin view's usage: { days, usage rows }
};

function emptyDraft() {
  return { system_prompt: "", history_strategy: "HISTORY_STRATEGY_UNSPECIFIED", model: state.defaultModel };
}
state.draft = emptyDraft();

class ApiError extends Error {
  constructor(status, code, message, retryAfterMs) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfterMs = retryAfterMs;
  }
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: { authorization: `Bearer ${state.token}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw await apiError(response);
  const text = await response.text();
  return text ? JSON.parse(text) : {};
}

async function apiError(response) {
  let code = `HTTP ${response.status}`;
  let message = response.statusText;
  try {
    const body = await response.json();
    code = body.code || code;
    message = body.message || message;
  } catch {
    // not JSON: keep the status line
  }
  const retry = Number(response.headers.get("retry-after-ms")) || Number(response.headers.get("retry-after")) * 1000 || 0;
  if (response.status === 401) signOut();
  return new ApiError(response.status, code, describe(response.status, message, retry), retry);
}

function describe(status, message, retryAfterMs) {
  // A spent token budget: the server's words as they are (which budget, when it resets); a retry in a
  // few seconds would not help.
  if (status === 429 && /budget/i.test(message)) return message;
  if (status === 429) return `Too busy right now (${message}). Retry${retryAfterMs ? ` in ${Math.ceil(retryAfterMs / 1000)} s` : ""}.`;
  if (status === 503) return `The model engine is unavailable (${message}). Retry in a moment.`;
  return message;
}

// ---- sign-in ------------------------------------------------------------------------------------------

function signedIn(token, user) {
  state.token = token;
  localStorage.setItem(TOKEN_KEY, token);
  localStorage.setItem(USER_KEY, user);
  $("who").textContent = user;
  $("sign-in").hidden = true;
  $("app").hidden = false;
  newChat();
  loadModels();
  loadChats(true);
  loadAccount();
  route();
}

function signOut() {
  localStorage.removeItem(TOKEN_KEY);
  localStorage.removeItem(USER_KEY);
  state.token = null;
  state.admin = false;
  $("nav-admin").hidden = true;
  $("key-secret-value").textContent = "";
  $("key-secret").hidden = true;
  $("app").hidden = true;
  $("sign-in").hidden = false;
}

function userOf(token) {
  try {
    return JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/"))).sub || "";
  } catch {
    return "";
  }
}

$("sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("sign-in-error").textContent = "";
  const pasted = $("token-input").value.trim();
  if (!$("token-label").hidden && pasted) {
    signedIn(pasted, userOf(pasted));
    return;
  }
  const response = await fetch("/dev/sign-in", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ user: $("user-name").value.trim() }),
  });
  if (response.status === 404) {
    // A deployment: no dev sign-in. Tokens come from its identity provider.
    $("sign-in-dev").hidden = true;
    $("user-name").closest("label").hidden = true;
    $("user-name").required = false;
    $("sign-in-token").hidden = false;
    $("token-label").hidden = false;
    return;
  }
  if (!response.ok) {
    $("sign-in-error").textContent = (await apiError(response)).message;
    return;
  }
  const body = await response.json();
  signedIn(body.token, body.user);
});

$("sign-out").addEventListener("click", signOut);

// ---- models -------------------------------------------------------------------------------------------

async function loadModels() {
  let reply;
  try {
    reply = await api("GET", "/models");
  } catch (error) {
    // Not in the way of chatting: without the list, a new chat gets the server's default model (and the
    // picker stays hidden); the next sign-in or reload asks again.
    console.warn(`GET /models failed: ${error.message}`);
    return;
  }
  state.models = (reply.models || []).map((model) => model.name);
  state.defaultModel = reply.default_model || state.models[0] || "";
  for (const select of [$("model-picker"), $("chat-model")]) {
    select.replaceChildren(...state.models.map((name) => modelOption(name, name === state.defaultModel ? " (default)" : "")));
  }
  if (!state.draft.model) state.draft.model = state.defaultModel;
  fillSettings(state.chatId && state.chat ? state.chat : state.draft);
  showModel();
}

function modelOption(name, note) {
  const option = document.createElement("option");
  option.value = name;
  option.textContent = name + note;
  return option;
}

function selectModel(select, name) {
  // A chat may name a model this deployment no longer serves: it is shown, not silently replaced.
  if (name && ![...select.options].some((option) => option.value === name)) {
    select.append(modelOption(name, " (not served)"));
  }
  select.value = name || state.defaultModel;
}

// The header: a new chat's model picker, or the open chat's model.
function showModel() {
  const fresh = !state.chatId;
  $("model-picker-label").hidden = !fresh || state.models.length === 0;
  selectModel($("model-picker"), state.draft.model);
  const model = fresh ? "" : state.chat?.model || "";
  $("chat-model-name").hidden = !model;
  $("chat-model-name").textContent = model;
}

$("model-picker").addEventListener("change", () => {
  state.draft.model = $("model-picker").value;
  selectModel($("chat-model"), state.draft.model);
});

// ---- the chat list ------------------------------------------------------------------------------------

async function loadChats(fresh) {
  const query = new URLSearchParams({ page_size: String(PAGE) });
  if (!fresh && state.nextPage) query.set("page_token", state.nextPage);
  let page;
  try {
    page = await api("GET", `/chats?${query}`);
  } catch (error) {
    showBanner(error.message, () => loadChats(fresh));
    return;
  }
  if (fresh) $("chat-list").replaceChildren();
  for (const chat of page.chats || []) $("chat-list").append(chatItem(chat));
  state.nextPage = page.next_page_token || "";
  $("more-chats").hidden = !state.nextPage;
  markActive();
}

function chatItem(chat) {
  state.chats.set(chat.chat_id, chat);
  const item = document.createElement("li");
  item.dataset.chatId = chat.chat_id;
  const open = document.createElement("button");
  open.type = "button";
  open.className = "open";
  open.textContent = chat.title || "Untitled chat";
  open.addEventListener("click", () => {
    toChat();
    openChat(chat.chat_id);
  });
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "delete";
  remove.title = "Delete chat";
  remove.setAttribute("aria-label", `Delete ${chat.title || "chat"}`);
  remove.textContent = "✕";
  remove.addEventListener("click", () => deleteChat(chat.chat_id));
  item.append(open, remove);
  return item;
}

function markActive() {
  for (const item of $("chat-list").children) item.classList.toggle("active", item.dataset.chatId === state.chatId);
}

function putFirst(chat) {
  const existing = $("chat-list").querySelector(`li[data-chat-id="${CSS.escape(chat.chat_id)}"]`);
  existing?.remove();
  $("chat-list").prepend(chatItem(chat));
  markActive();
}

async function deleteChat(chatId) {
  if (!confirm("Delete this chat and its history?")) return;
  try {
    await api("DELETE", `/chat/${chatId}`);
  } catch (error) {
    showBanner(error.message, () => deleteChat(chatId));
    return;
  }
  $("chat-list").querySelector(`li[data-chat-id="${CSS.escape(chatId)}"]`)?.remove();
  if (state.chatId === chatId) newChat();
}

$("more-chats").addEventListener("click", () => loadChats(false));
$("new-chat").addEventListener("click", () => {
  toChat();
  newChat();
});
for (const button of document.querySelectorAll(".toggle-sidebar")) {
  button.addEventListener("click", () => $("app").classList.toggle("sidebar-open"));
}

// ---- one chat -----------------------------------------------------------------------------------------

function newChat() {
  stopReply();
  state.chatId = null;
  state.chat = null;
  state.draft = emptyDraft();
  $("chat-title").textContent = "New chat";
  $("messages").replaceChildren();
  fillSettings(state.draft);
  showModel();
  markActive();
  $("app").classList.remove("sidebar-open");
  $("prompt").focus();
}

async function openChat(chatId) {
  stopReply();
  state.chatId = chatId;
  state.chat = state.chats.get(chatId) || null;
  showModel();
  if (!$("settings").hidden && state.chat) fillSettings(state.chat);
  markActive();
  $("app").classList.remove("sidebar-open");
  $("messages").replaceChildren();
  const title = $("chat-list").querySelector(`li[data-chat-id="${CSS.escape(chatId)}"] .open`);
  $("chat-title").textContent = title ? title.textContent : "";
  const messages = [];
  let token = "";
  try {
    do {
      const query = new URLSearchParams({ page_size: "200" });
      if (token) query.set("page_token", token);
      const page = await api("GET", `/chat/${chatId}/messages?${query}`);
      messages.push(...(page.messages || []));
      token = page.next_page_token || "";
    } while (token);
  } catch (error) {
    showBanner(error.message, () => openChat(chatId));
    return;
  }
  if (state.chatId !== chatId) return; // another chat was opened meanwhile
  for (const message of messages) {
    if (message.role === "ROLE_USER") addUserMessage(message.content);
    else {
      const view = addAssistantMessage(message.model || "");
      view.text = message.content;
      finishView(view, message.finish_reason === "FINISH_REASON_CANCELLED" ? "stopped" : "done", false);
    }
  }
  scrollDown();
}

function fillSettings(settings) {
  $("system-prompt").value = settings.system_prompt || "";
  $("history-strategy").value = settings.history_strategy || "HISTORY_STRATEGY_UNSPECIFIED";
  selectModel($("chat-model"), settings.model || "");
}

$("toggle-settings").addEventListener("click", () => {
  $("settings").hidden = !$("settings").hidden;
  if (!$("settings").hidden) fillSettings(state.chatId && state.chat ? state.chat : state.draft);
});

$("settings").addEventListener("submit", async (event) => {
  event.preventDefault();
  const settings = { system_prompt: $("system-prompt").value, history_strategy: $("history-strategy").value };
  const model = $("chat-model").value;
  if (!state.chatId) {
    state.draft = { ...settings, model };
    showModel();
    $("settings").hidden = true;
    return;
  }
  // The model only when it changes: the next turn (the whole history) goes to the new one.
  if (model && model !== state.chat?.model) settings.model = model;
  try {
    const reply = await api("PATCH", `/chat/${state.chatId}`, settings);
    changed(reply.chat);
    $("settings").hidden = true;
  } catch (error) {
    showBanner(error.message);
  }
});

// The open chat as the server has it now.
function changed(chat) {
  if (chat.chat_id !== state.chatId) return;
  state.chat = chat;
  state.chats.set(chat.chat_id, chat);
  showModel();
}

$("rename-chat").addEventListener("click", async () => {
  if (!state.chatId) return;
  const title = prompt("Rename chat", $("chat-title").textContent);
  if (title === null || !title.trim()) return;
  try {
    const reply = await api("PATCH", `/chat/${state.chatId}`, { title: title.trim() });
    changed(reply.chat);
    $("chat-title").textContent = reply.chat.title;
    putFirst(reply.chat);
  } catch (error) {
    showBanner(error.message);
  }
});

// ---- messages -----------------------------------------------------------------------------------------

function addUserMessage(text) {
  const element = document.createElement("div");
  element.className = "message user";
  element.textContent = text;
  $("messages").append(element);
}

// `model`: the model writing (or that wrote) the reply, shown beside it ("": not known).
function addAssistantMessage(model = "") {
  const element = document.createElement("div");
  element.className = "message assistant";
  element.dataset.state = "streaming";
  const body = document.createElement("div");
  body.className = "body";
  const meta = document.createElement("div");
  meta.className = "meta";
  element.append(body, meta);
  $("messages").append(element);
  const view = { element, body, meta, text: "", scheduled: false, model: "" };
  setModel(view, model);
  return view;
}

function setModel(view, model) {
  view.model = model;
  view.element.dataset.model = model;
  view.meta.querySelector(".badge.model")?.remove();
  if (model) view.meta.prepend(badge(model, "model", "The model that wrote this reply"));
}

function paint(view) {
  // At most once a frame, however fast the tokens come.
  if (view.scheduled) return;
  view.scheduled = true;
  requestAnimationFrame(() => {
    view.scheduled = false;
    renderMarkdown(view.body, view.text);
    scrollDown();
  });
}

function finishView(view, how, cached) {
  renderMarkdown(view.body, view.text);
  view.element.dataset.state = how;
  view.meta.replaceChildren();
  setModel(view, view.model);
  if (cached) {
    view.element.dataset.cached = "true";
    view.meta.append(badge("cached", "cached", "Served from the semantic cache"));
  }
  if (how === "stopped") view.meta.append(badge("stopped", "", "Generation was stopped"));
}

function badge(text, kind, title) {
  const element = document.createElement("span");
  element.className = `badge ${kind}`;
  element.textContent = text;
  element.title = title;
  return element;
}

function failView(view, message, retry) {
  view.element.dataset.state = "error";
  renderMarkdown(view.body, view.text);
  const failure = document.createElement("div");
  failure.className = "failure";
  failure.setAttribute("role", "alert");
  const text = document.createElement("span");
  text.textContent = message;
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = "Retry";
  button.addEventListener("click", () => {
    failure.remove();
    retry();
  });
  failure.append(text, button);
  view.meta.replaceChildren(failure);
}

function showBanner(message, retry) {
  const view = addAssistantMessage();
  failView(view, message, () => {
    view.element.remove();
    retry?.();
  });
  if (!retry) view.meta.querySelector("button").remove();
}

function scrollDown() {
  const list = $("messages");
  list.scrollTop = list.scrollHeight;
}

// ---- sending and streaming ----------------------------------------------------------------------------

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});

$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});

$("stop").addEventListener("click", stopReply);

function stopReply() {
  state.running?.abort();
}

function send() {
  const content = $("prompt").value;
  if (!content.trim() || state.running) return;
  $("prompt").value = "";
  addUserMessage(content);
  // One id for the message and all its retries: the server stores it once whatever happens.
  stream(content, crypto.randomUUID());
}

async function stream(content, requestId) {
  // A new chat's model is the one it asks for (confirmed by its first event); a chat's, its own.
  const view = addAssistantMessage(state.chatId ? state.chat?.model || "" : state.draft.model);
  scrollDown();
  const controller = new AbortController();
  state.running = controller;
  $("send").hidden = true;
  $("stop").hidden = false;
  const chatId = state.chatId;
  const [path, body] = chatId
    ? [`/chat/${chatId}/completion`, { content, request_id: requestId }]
    : ["/chat", { content, request_id: requestId, title: content.trim().slice(0, 60), ...state.draft }];
  const retry = () => {
    view.element.remove();
    stream(content, requestId);
  };
  try {
    const response = await fetch(path, {
      method: "POST",
      headers: { authorization: `Bearer ${state.token}`, "content-type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      failView(view, (await apiError(response)).message, retry);
      return;
    }
    let finished = false;
    for await (const event of serverSentEvents(response.body)) {
      if (event.chat) {
        // The first event of a new chat: it exists now.
        state.chatId = event.chat.chat_id;
        state.chat = event.chat;
        $("chat-title").textContent = event.chat.title || "Untitled chat";
        putFirst(event.chat);
        showModel();
        setModel(view, event.chat.model || "");
      }
      if (event.delta) {
        view.text += event.delta;
        paint(view);
      }
      if (event.error) {
        failView(view, `The reply broke off: ${event.error.message}`, retry);
        return;
      }
      if (event.finish_reason) {
        finished = true;
        finishView(view, event.finish_reason === "FINISH_REASON_CANCELLED" ? "stopped" : "done", Boolean(event.cached));
      }
    }
    if (!finished) failView(view, "The connection closed before the reply finished.", retry);
  } catch (error) {
    if (controller.signal.aborted) finishView(view, "stopped", false);
    else failView(view, `Network error: ${error.message}`, retry);
  } finally {
    if (state.running === controller) state.running = null;
    $("send").hidden = false;
    $("stop").hidden = true;
  }
}

async function* serverSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (data) yield JSON.parse(data);
    }
  }
}

// ---- account views: usage, API keys, the admin's team view ---------------------------------------------
//
// Hash routes (#usage, #keys, #admin) over the same page: the chat view stays as it is (a reply streaming
// on meanwhile), hidden. The API's JSON is proto3 JSON: int64 numbers arrive as strings, zeros and empty
// fields may be absent, enums by name.

const ACCOUNT_VIEWS = ["usage", "keys", "admin"];
const SVG = "http://www.w3.org/2000/svg";
const SCOPE_NAMES = { KEY_SCOPE_CHAT: "chat", KEY_SCOPE_OPENAI: "OpenAI", KEY_SCOPE_USAGE: "usage" };
const KINDS = [
  ["prompt_tokens", "prompt"],
  ["completion_tokens", "completion"],
  ["cached_tokens", "cached"],
];
const SERIES_SHOWN = 7; // a chart by user, group or model: the largest seven, the rest as "other"

const num = (value) => Number(value || 0);
const fmt = (value) => num(value).toLocaleString();

function route() {
  const name = location.hash.slice(1);
  showView(ACCOUNT_VIEWS.includes(name) ? name : "chat");
}

window.addEventListener("hashchange", route);

function showView(name) {
  state.view = name;
  $("chat-view").hidden = name !== "chat";
  for (const view of ACCOUNT_VIEWS) $(`${view}-view`).hidden = view !== name;
  for (const view of ACCOUNT_VIEWS) {
    if (view === name) $(`nav-${view}`).setAttribute("aria-current", "page");
    else $(`nav-${view}`).removeAttribute("aria-current");
  }
  $("app").classList.remove("sidebar-open");
  if (!state.token) return;
  if (name === "usage") loadUsage();
  else if (name === "keys") loadKeys();
  else if (name === "admin") loadAdmin();
}

// Back to the chat from an account view (a chat opened or started in the sidebar).
function toChat() {
  if (state.view === "chat") return;
  history.pushState(null, "", location.pathname + location.search);
  showView("chat");
}

// Who the user is to the accounting: whether to offer the admin view.
async function loadAccount() {
  try {
    showAdminEntry(await api("GET", "/usage?days=1"));
  } catch (error) {
    console.warn(`GET /usage failed: ${error.message}`);
  }
}

function showAdminEntry(usage) {
  state.admin = Boolean(usage.admin);
  $("nav-admin").hidden = !state.admin;
}

function cell(text, className) {
  const element = document.createElement("td");
  element.textContent = text;
  if (className) element.className = className;
  return element;
}

function row(...cells) {
  const element = document.createElement("tr");
  element.append(...cells.map((value) => (value instanceof Node ? wrapCell(value) : cell(String(value)))));
  return element;
}

function wrapCell(node) {
  if (node.nodeName === "TD") return node;
  const element = document.createElement("td");
  element.append(node);
  return element;
}

function button(text, onClick, className = "") {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = text;
  if (className) element.className = className;
  element.addEventListener("click", onClick);
  return element;
}

function localTime(timestamp) {
  return timestamp ? new Date(timestamp).toLocaleString() : "";
}

function inAbout(timestamp) {
  const ms = new Date(timestamp) - Date.now();
  if (!(ms > 0)) return "now";
  const minutes = Math.round(ms / 60_000);
  if (minutes < 60) return `in ${minutes} min`;
  const hours = Math.round(minutes / 60);
  if (hours < 48) return `in ${hours} h`;
  return `in ${Math.round(hours / 24)} days`;
}

// ---- usage (the user's own) ---------------------------------------------------------------------------

async function loadUsage() {
  $("usage-error").textContent = "";
  let reply;
  try {
    reply = await api("GET", "/usage?days=30");
  } catch (error) {
    $("usage-error").textContent = error.message;
    return;
  }
  showAdminEntry(reply);
  $("usage-group").hidden = !reply.group;
  $("usage-group").textContent = reply.group ? `Your group: ${reply.group}` : "";
  showBudgets($("budgets"), reply.budgets || []);
  const rows = [...(reply.usage || [])].reverse(); // the newest day first
  const total = { prompt_tokens: 0, completion_tokens: 0, cached_tokens: 0, requests: 0 };
  const body = $("usage-table").tBodies[0];
  body.replaceChildren(
    ...rows.map((usage) => {
      for (const key of Object.keys(total)) total[key] += num(usage[key]);
      const line = row(usage.day || "", usage.model || "", ...usageNumbers(usage));
      line.dataset.day = usage.day || "";
      line.dataset.model = usage.model || "";
      return line;
    }),
  );
  $("usage-table").tFoot.replaceChildren(...(rows.length ? [row("Total", "", ...usageNumbers(total))] : []));
  $("usage-table").hidden = rows.length === 0;
  $("usage-empty").hidden = rows.length > 0;
}

function usageNumbers(usage) {
  return [usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.requests].map((value) =>
    cell(fmt(value), "number"),
  );
}

// Whose budget: `own` says "You" for the signed-in user's (their usage view).
function budgetName(budget, own = true) {
  const whose =
    budget.subject === "*"
      ? `Every ${budget.scope === "BUDGET_SCOPE_GROUP" ? "group" : "user"} (default)`
      : budget.scope === "BUDGET_SCOPE_GROUP"
        ? `Group ${budget.subject}`
        : own && budget.subject === localStorage.getItem(USER_KEY)
          ? "You"
          : `User ${budget.subject}`;
  return whose;
}

function periodName(budget) {
  return budget.period === "BUDGET_PERIOD_MONTH" ? "per month" : "per day";
}

function showBudgets(container, budgets) {
  if (!budgets.length) {
    const none = document.createElement("p");
    none.className = "note";
    none.textContent = "No budgets apply to you: no limit.";
    container.replaceChildren(none);
    return;
  }
  container.replaceChildren(...budgets.map(budgetCard));
}

function budgetCard(budget) {
  const limit = num(budget.limit_tokens);
  const used = num(budget.used_tokens);
  const card = document.createElement("div");
  card.className = "budget";
  card.dataset.scope = budget.scope || "";
  card.dataset.period = budget.period || "";
  const title = document.createElement("div");
  title.className = "budget-title";
  title.textContent = `${budgetName(budget)}, ${periodName(budget)}`;
  const figures = document.createElement("div");
  figures.className = "budget-figures";
  const bar = document.createElement("div");
  bar.className = "bar";
  if (limit > 0) {
    const remaining = num(budget.remaining_tokens);
    const share = Math.min(1, used / limit);
    const fill = document.createElement("div");
    fill.className = `fill${remaining <= 0 ? " spent" : share >= 0.8 ? " high" : ""}`;
    fill.style.width = `${(share * 100).toFixed(1)}%`; // CSSOM, not a style attribute: the CSP allows it
    bar.append(fill);
    bar.setAttribute("role", "progressbar");
    bar.setAttribute("aria-valuemin", "0");
    bar.setAttribute("aria-valuemax", String(limit));
    bar.setAttribute("aria-valuenow", String(Math.min(used, limit)));
    bar.setAttribute("aria-label", title.textContent);
    figures.textContent = `${fmt(used)} of ${fmt(limit)} tokens used, ${fmt(remaining)} left`;
  } else {
    bar.classList.add("unlimited");
    figures.textContent = `${fmt(used)} tokens used, no limit`;
  }
  const reset = document.createElement("div");
  reset.className = "budget-reset";
  if (budget.reset_time) {
    reset.textContent = `Resets ${localTime(budget.reset_time)} (${inAbout(budget.reset_time)})`;
    reset.title = `${budget.reset_time} (UTC)`;
  }
  card.append(title, bar, figures, reset);
  return card;
}

// ---- API keys -------------------------------------------------------------------------------------------

async function loadKeys() {
  $("key-error").textContent = "";
  let reply;
  try {
    reply = await api("GET", "/keys");
  } catch (error) {
    $("key-error").textContent = error.message;
    return;
  }
  showKeys($("keys-table"), $("keys-empty"), reply.keys || [], revokeOwnKey);
}

function keyStatus(key) {
  if (key.revoke_time) return ["revoked", `revoked ${localTime(key.revoke_time)}`];
  if (key.expire_time && new Date(key.expire_time) <= Date.now()) return ["expired", "expired"];
  return ["active", "active"];
}

function showKeys(table, empty, keys, revoke) {
  table.tBodies[0].replaceChildren(
    ...keys.map((key) => {
      const [status, statusText] = keyStatus(key);
      const prefix = document.createElement("code");
      prefix.textContent = `${key.prefix || ""}…`;
      const scopes = (key.scopes || []).map((scope) => SCOPE_NAMES[scope] || scope).join(", ") || "all";
      const action = status === "active" ? button("Revoke", () => revoke(key), "revoke") : "";
      const line = row(
        key.name || "",
        prefix,
        scopes,
        localTime(key.create_time),
        key.expire_time ? localTime(key.expire_time) : "never",
        cell(statusText, `status ${status}`),
        action || cell(""),
      );
      line.dataset.keyId = key.key_id;
      line.dataset.status = status;
      return line;
    }),
  );
  table.hidden = keys.length === 0;
  empty.hidden = keys.length > 0;
}

async function revokeOwnKey(key) {
  if (!confirm(`Revoke the key "${key.name}"? Whatever uses it stops working within seconds.`)) return;
  try {
    await api("DELETE", `/keys/${encodeURIComponent(key.key_id)}`);
  } catch (error) {
    $("key-error").textContent = error.message;
    return;
  }
  loadKeys();
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("key-error").textContent = "";
  const scopes = [...document.querySelectorAll("input[name=key-scope]:checked")].map((box) => box.value);
  if (!scopes.length) {
    $("key-error").textContent = "Choose at least one use for the key.";
    return;
  }
  const days = $("key-expiry").value.trim();
  const body = { name: $("key-name").value.trim(), scopes, expires_in_days: days ? Number(days) : 0 };
  let reply;
  try {
    reply = await api("POST", "/keys", body);
  } catch (error) {
    $("key-error").textContent = error.message;
    return;
  }
  // The secret lives in this element only (never in storage), until the user says it is copied.
  $("key-secret-value").textContent = reply.secret || "";
  $("key-copy").textContent = "Copy";
  $("key-secret").hidden = false;
  $("key-name").value = "";
  $("key-secret").scrollIntoView({ block: "nearest" });
  loadKeys();
});

$("key-copy").addEventListener("click", async () => {
  const secret = $("key-secret-value").textContent;
  try {
    await navigator.clipboard.writeText(secret);
    $("key-copy").textContent = "Copied";
  } catch {
    // No clipboard access (an insecure origin, or refused): select the key for the user to copy.
    const range = document.createRange();
    range.selectNodeContents($("key-secret-value"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    $("key-copy").textContent = "Selected: press Ctrl+C";
  }
});

$("key-secret-done").addEventListener("click", () => {
  $("key-secret-value").textContent = "";
  $("key-secret").hidden = true;
});

// ---- the admin's view -----------------------------------------------------------------------------------

async function loadAdmin() {
  $("admin-error").textContent = "";
  const days = Number($("admin-days").value) || 30;
  let usage;
  try {
    usage = (await api("GET", `/admin/usage?days=${days}`)).usage || [];
  } catch (error) {
    $("admin-error").textContent = error.message;
    return;
  }
  state.teamUsage = { days, usage };
  drawChart();
  showTeamTables(usage);
  loadAdminBudgets();
}

$("admin-refresh").addEventListener("click", loadAdmin);
$("admin-days").addEventListener("change", loadAdmin);
$("chart-by").addEventListener("change", drawChart);
$("usage-refresh").addEventListener("click", loadUsage);

function charged(usage) {
  return num(usage.prompt_tokens) + num(usage.completion_tokens);
}

function allTokens(usage) {
  return charged(usage) + num(usage.cached_tokens);
}

// The UTC days of the chart, oldest first, today last: days without usage too.
function chartDays(count) {
  const today = new Date();
  const days = [];
  for (let back = count - 1; back >= 0; back--) {
    const day = new Date(Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), today.getUTCDate() - back));
    days.push(day.toISOString().slice(0, 10));
  }
  return days;
}

// [series name, tokens of one usage row in it] for the chosen stacking.
function chartSeries(usage, by) {
  if (by === "kind") return KINDS.map(([key, name]) => [name, (row) => num(row[key])]);
  const keyOf = (row) => (by === "group" ? row.group || "(no group)" : by === "model" ? row.model || "" : row.user_id || "");
  const totals = new Map();
  for (const row of usage) totals.set(keyOf(row), (totals.get(keyOf(row)) || 0) + allTokens(row));
  const ranked = [...totals.keys()].sort((a, b) => totals.get(b) - totals.get(a));
  const shown = ranked.length > SERIES_SHOWN ? ranked.slice(0, SERIES_SHOWN - 1) : ranked;
  const series = shown.map((name) => [name, (row) => (keyOf(row) === name ? allTokens(row) : 0)]);
  if (shown.length < ranked.length) {
    const named = new Set(shown);
    series.push(["other", (row) => (named.has(keyOf(row)) ? 0 : allTokens(row))]);
  }
  return series;
}

function svg(name, attributes = {}) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  return element;
}

// Stacked bars of tokens per UTC day, drawn as SVG elements (no library, nothing inline for the CSP).
function drawChart() {
  const { days: count, usage } = state.teamUsage || { days: 30, usage: [] };
  const series = chartSeries(usage, $("chart-by").value);
  const days = chartDays(count);
  const stacks = new Map(days.map((day) => [day, series.map(() => 0)]));
  for (const usageRow of usage) {
    const stack = stacks.get(usageRow.day);
    if (stack) series.forEach(([, tokens], i) => (stack[i] += tokens(usageRow)));
  }
  const highest = Math.max(1, ...[...stacks.values()].map((stack) => stack.reduce((a, b) => a + b, 0)));
  const [width, height, left, right, bottom, top] = [760, 220, 56, 16, 22, 8];
  const plot = height - bottom - top;
  const step = (width - left - right) / days.length;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", class: "bars" });
  chart.setAttribute("aria-label", "Tokens per day");
  for (const fraction of [0, 0.5, 1]) {
    const y = top + plot * (1 - fraction);
    chart.append(svg("line", { x1: left, x2: width - right, y1: y, y2: y, class: "grid" }));
    const label = svg("text", { x: left - 6, y: y + 4, class: "axis", "text-anchor": "end" });
    label.textContent = compact(highest * fraction);
    chart.append(label);
  }
  const every = Math.ceil(days.length / 10);
  days.forEach((day, index) => {
    const x = left + index * step;
    let y = top + plot;
    stacks.get(day).forEach((tokens, i) => {
      if (!tokens) return;
      const barHeight = (tokens / highest) * plot;
      y -= barHeight;
      const bar = svg("rect", {
        x: (x + step * 0.15).toFixed(1),
        y: y.toFixed(1),
        width: (step * 0.7).toFixed(1),
        height: Math.max(barHeight, 0.5).toFixed(1),
        class: `bar s${i}`,
        "data-day": day,
        "data-series": series[i][0],
        "data-tokens": tokens,
      });
      const title = svg("title");
      title.textContent = `${day}, ${series[i][0]}: ${tokens.toLocaleString()} tokens`;
      bar.append(title);
      chart.append(bar);
    });
    if (index % every === 0 || index === days.length - 1) {
      const label = svg("text", { x: x + step / 2, y: height - 6, class: "axis", "text-anchor": "middle" });
      label.textContent = day.slice(5);
      chart.append(label);
    }
  });
  $("admin-chart").replaceChildren(chart);
  $("chart-legend").replaceChildren(
    ...series.map(([name], i) => {
      const item = document.createElement("li");
      const swatch = svg("svg", { viewBox: "0 0 10 10", class: "swatch" });
      swatch.append(svg("rect", { width: 10, height: 10, class: `s${i}` }));
      item.append(swatch, document.createTextNode(` ${name}`));
      return item;
    }),
  );
}

function compact(value) {
  if (value >= 1e6) return `${(value / 1e6).toFixed(1)}M`;
  if (value >= 1e3) return `${(value / 1e3).toFixed(1)}k`;
  return String(Math.round(value));
}

function sumBy(usage, keyOf) {
  const sums = new Map();
  for (const usageRow of usage) {
    const key = keyOf(usageRow);
    const sum = sums.get(key) || { prompt_tokens: 0, completion_tokens: 0, cached_tokens: 0, requests: 0, users: new Set(), group: "" };
    for (const field of ["prompt_tokens", "completion_tokens", "cached_tokens", "requests"]) sum[field] += num(usageRow[field]);
    sum.users.add(usageRow.user_id || "");
    sum.group = usageRow.group || sum.group;
    sums.set(key, sum);
  }
  return [...sums.entries()].sort(([, a], [, b]) => allTokens(b) - allTokens(a));
}

function showTeamTables(usage) {
  $("admin-users").tBodies[0].replaceChildren(
    ...sumBy(usage, (usageRow) => usageRow.user_id || "").map(([user, sum]) => {
      const keys = button("Keys", () => showUserKeys(user), "link");
      const line = row(user, sum.group, ...usageNumbers(sum), keys);
      line.dataset.user = user;
      return line;
    }),
  );
  $("admin-groups").tBodies[0].replaceChildren(
    ...sumBy(usage, (usageRow) => usageRow.group || "").map(([group, sum]) => {
      const line = row(group || "(no group)", cell(fmt(sum.users.size), "number"), ...usageNumbers(sum));
      line.dataset.group = group;
      return line;
    }),
  );
}

async function loadAdminBudgets() {
  $("budget-error").textContent = "";
  let budgets;
  try {
    budgets = (await api("GET", "/admin/budgets")).budgets || [];
  } catch (error) {
    $("budget-error").textContent = error.message;
    return;
  }
  $("admin-budgets").tBodies[0].replaceChildren(
    ...budgets.map((budget) => {
      const limit = num(budget.limit_tokens);
      const edit = button("Edit", () => fillBudgetForm(budget), "link");
      const actions = document.createElement("span");
      actions.className = "actions";
      actions.append(edit);
      const { scope, subject, period } = budget;
      if (budget.overridden) actions.append(button("Clear", () => setBudget({ scope, subject, period }, true), "link"));
      const line = row(
        budgetName(budget, false) + (budget.overridden ? " (set by an admin)" : budget.subject === "*" ? "" : " (default)"),
        periodName(budget),
        cell(limit ? fmt(limit) : "no limit", "number"),
        // A default's row stands for everyone: no one's use to show.
        cell(budget.subject === "*" ? "" : fmt(budget.used_tokens), "number"),
        cell(limit && budget.subject !== "*" ? fmt(budget.remaining_tokens) : "", "number"),
        budget.reset_time ? localTime(budget.reset_time) : "",
        actions,
      );
      line.dataset.subject = budget.subject || "";
      line.dataset.scope = budget.scope || "";
      line.dataset.period = budget.period || "";
      return line;
    }),
  );
}

function fillBudgetForm(budget) {
  $("budget-scope").value = budget.scope || "BUDGET_SCOPE_USER";
  $("budget-subject").value = budget.subject === "*" ? "" : budget.subject || "";
  $("budget-period").value = budget.period || "BUDGET_PERIOD_DAY";
  $("budget-limit").value = String(num(budget.limit_tokens));
  $("budget-subject").focus();
}

async function setBudget(budget, clear) {
  $("budget-error").textContent = "";
  try {
    await api("PUT", "/admin/budgets", { ...budget, clear });
  } catch (error) {
    $("budget-error").textContent = error.message;
    return;
  }
  loadAdminBudgets();
}

function budgetFromForm() {
  return {
    scope: $("budget-scope").value,
    subject: $("budget-subject").value.trim(),
    period: $("budget-period").value,
    limit_tokens: String(Math.max(0, Math.floor(Number($("budget-limit").value) || 0))),
  };
}

$("budget-form").addEventListener("submit", (event) => {
  event.preventDefault();
  setBudget(budgetFromForm(), false);
});

$("budget-clear").addEventListener("click", () => {
  if (!$("budget-form").reportValidity()) return;
  const { scope, subject, period } = budgetFromForm();
  setBudget({ scope, subject, period }, true);
});

$("user-keys-form").addEventListener("submit", (event) => {
  event.preventDefault();
  showUserKeys($("user-keys-user").value.trim());
});

async function showUserKeys(user) {
  $("user-keys-user").value = user;
  $("user-keys-error").textContent = "";
  let keys;
  try {
    keys = (await api("GET", `/admin/users/${encodeURIComponent(user)}/keys`)).keys || [];
  } catch (error) {
    $("user-keys-error").textContent = error.message;
    return;
  }
  showKeys($("user-keys-table"), $("user-keys-empty"), keys, (key) => revokeUserKeys(user, key));
  $("user-keys-revoke-all").hidden = !keys.some((key) => keyStatus(key)[0] === "active");
  $("user-keys-revoke-all").onclick = () => revokeUserKeys(user, null);
}

async function revokeUserKeys(user, key) {
  const what = key ? `the key "${key.name}" of ${user}` : `every key of ${user}`;
  if (!confirm(`Revoke ${what}? Whatever uses it stops working within seconds.`)) return;
  const query = key ? `?${new URLSearchParams({ key_id: key.key_id })}` : "";
  try {
    await api("DELETE", `/admin/users/${encodeURIComponent(user)}/keys${query}`);
  } catch (error) {
    $("user-keys-error").textContent = error.message;
    return;
  }
  showUserKeys(user);
}

// ---- a token from a link --------------------------------------------------------------------------------

// A link ending in #token=... signs in as whoever the token names, so anyone can send one: the user is
// asked before it replaces who is signed in (or signs in someone who was not), naming both users.
function takeTokenFromLink() {
  const fromLink = new URLSearchParams(location.hash.slice(1)).get("token");
  if (!fromLink) return false;
  // An identity provider (or a proxy in front) may hand the token over in the fragment, which never
  // reaches a server; it is taken out of the address bar at once.
  history.replaceState(null, "", location.pathname);
  const offered = userOf(fromLink);
  const current = state.token ? localStorage.getItem(USER_KEY) || userOf(state.token) : "";
  if (!offered) return false; // not a token: ignored
  if (offered === current) {
    signedIn(fromLink, offered); // the same user, with a fresh token
    return true;
  }
  askToSwitch(fromLink, offered, current);
  return true;
}

function askToSwitch(token, offered, current) {
  $("switch-new").textContent = offered;
  $("switch-new-again").textContent = offered;
  $("switch-accept-name").textContent = offered;
  $("switch-current").textContent = current;
  $("switch-current-line").hidden = !current;
  $("switch-nobody-line").hidden = Boolean(current);
  $("switch-cancel").textContent = current ? `Stay signed in as ${current}` : "Cancel";
  $("switch-title").textContent = current ? "Switch user?" : "Sign in from a link?";
  const before = { app: $("app").hidden, signIn: $("sign-in").hidden };
  $("app").hidden = true;
  $("sign-in").hidden = true;
  $("switch-user").hidden = false;
  const close = () => {
    $("switch-user").hidden = true;
    $("switch-accept").onclick = null;
    $("switch-cancel").onclick = null;
  };
  $("switch-accept").onclick = () => {
    close();
    signedIn(token, offered);
  };
  $("switch-cancel").onclick = () => {
    close();
    $("app").hidden = before.app;
    $("sign-in").hidden = before.signIn;
  };
  $("switch-cancel").focus();
}

window.addEventListener("hashchange", takeTokenFromLink);

// ---- start --------------------------------------------------------------------------------------------

function start() {
  const token = localStorage.getItem(TOKEN_KEY);
  if (token) signedIn(token, localStorage.getItem(USER_KEY) || userOf(token));
  else signOut();
  takeTokenFromLink();
}

start();
