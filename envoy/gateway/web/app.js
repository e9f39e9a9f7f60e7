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
}

function signOut() {
  localStorage.removeItem(TOKEN_KEY);
  localStorage.removeItem(USER_KEY);
  state.token = null;
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
  open.addEventListener("click", () => openChat(chat.chat_id));
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
$("new-chat").addEventListener("click", newChat);
$("toggle-sidebar").addEventListener("click", () => $("app").classList.toggle("sidebar-open"));

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
