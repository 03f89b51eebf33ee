// The chat page: conversations in the sidebar, the open one's messages, a reply streamed from
// /v1/chat/completions (stop, regenerate), per-conversation settings and the session's stats.

import { fetchModelCard, setApiKey, streamChatCompletion } from "./api.js";
import { ConversationStore, conversationTitle } from "./conversations.js";
import { renderMarkdown } from "./markdown.js";
import { effectivePolicy, readSettings, requestFields, showRelevantFields, showSettings } from "./settings.js";
import { showStats, TurnTimer, turnStats } from "./stats.js";

const SAVE_DELAY_MS = 300;  // a streaming reply is saved this often, so a reload keeps most of it

const $ = (id) => document.getElementById(id);
const store = new ConversationStore();
let modelCard = null;
// While a reply streams: its conversation, message, abort controller and the element showing it.
let streaming = null;
let saveTimer = null;

function saveSoon() {
  saveTimer ??= setTimeout(() => {
    saveTimer = null;
    store.save();
  }, SAVE_DELAY_MS);
}

function showNotice(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

// ----- the conversation list -----

function button(className, text, label, onClick) {
  const node = document.createElement("button");
  node.type = "button";
  node.className = className;
  node.textContent = text;
  if (label) {
    node.title = label;
    node.setAttribute("aria-label", label);
  }
  node.addEventListener("click", onClick);
  return node;
}

function renderList() {
  const list = $("conversation-list");
  list.replaceChildren();
  for (const conversation of store.list()) {
    const item = document.createElement("li");
    item.classList.toggle("open", conversation.id === store.openId);
    const title = button("title", conversationTitle(conversation), null, () => openConversation(conversation.id));
    item.append(
      title,
      button("rename", "✎", "Rename", () => startRename(title, conversation)),
      button("delete", "×", "Delete", () => deleteConversation(conversation)),
    );
    list.append(item);
  }
}

function startRename(title, conversation) {
  const input = document.createElement("input");
  input.className = "rename-input";
  input.value = conversationTitle(conversation);
  let done = false;
  const finish = (keep) => {
    if (done) return;
    done = true;
    if (keep && input.value.trim()) store.rename(conversation.id, input.value);
    renderAll();
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") finish(true);
    if (event.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
  title.replaceWith(input);
  input.select();
}

function deleteConversation(conversation) {
  if (!confirm(`Delete "${conversationTitle(conversation)}"?`)) return;
  if (streaming?.conversation === conversation) streaming.controller.abort();
  store.remove(conversation.id);
  renderAll();
}

function openConversation(id) {
  store.select(id);
  showNotice("");
  renderAll();
}

// ----- the open conversation -----

function messageElement(message) {
  const node = document.createElement("div");
  node.className = `message ${message.role}`;
  const content = document.createElement("div");
  content.className = "content";
  node.append(content);
  renderMessage(node, message);
  return node;
}

function renderMessage(node, message) {
  const content = node.querySelector(".content");
  if (message.role === "assistant") renderMarkdown(content, message.content);
  else content.textContent = message.content;  // the user's own words, as typed
  node.classList.toggle("stopped", Boolean(message.stopped));
}

function renderMessages() {
  const conversation = store.open;
  const list = $("messages");
  list.replaceChildren();
  for (const message of conversation.messages) {
    const node = messageElement(message);
    if (streaming?.message === message) streaming.node = node;
    list.append(node);
  }
  list.scrollTop = list.scrollHeight;
}

function renderStats() {
  const conversation = store.open;
  let policy = null;
  try {
    policy = effectivePolicy(conversation.settings, modelCard);
  } catch (error) {
    showNotice(error.message);
  }
  showStats(conversation.stats, modelCard, policy);
}

function renderControls() {
  const busy = streaming !== null;
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("regenerate").disabled = busy || !store.open.messages.some((m) => m.role === "user");
}

function renderAll() {
  $("conversation-title").textContent = conversationTitle(store.open);
  renderList();
  renderMessages();
  showSettings($("settings-form"), store.open.settings);
  renderStats();
  renderControls();
}

// ----- a reply -----

function requestMessages(conversation) {
  const messages = conversation.messages
    .filter((m) => m.content)  // a reply stopped before its first token says nothing
    .map(({ role, content }) => ({ role, content }));
  const system = conversation.settings.system.trim();
  return system ? [{ role: "system", content: system }, ...messages] : messages;
}

async function streamReply(conversation) {
  let fields;
  try {
    fields = requestFields(conversation.settings);
  } catch (error) {
    showNotice(error.message);
    return;
  }
  showNotice("");
  const body = {
    ...(modelCard ? { model: modelCard.id } : {}),
    messages: requestMessages(conversation),
    stream: true,
    stream_options: { include_usage: true },
    ...fields,
  };
  const message = { role: "assistant", content: "" };
  conversation.messages.push(message);
  streaming = { conversation, message, controller: new AbortController(), node: null };
  renderAll();
  const timer = new TurnTimer();
  let usage = null;
  try {
    for await (const chunk of streamChatCompletion(body, streaming.controller.signal)) {
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices[0]?.delta?.content;
      if (!delta) continue;
      message.content += delta;
      timer.onContent();
      if (streaming.node?.isConnected) {
        renderMessage(streaming.node, message);
        $("messages").scrollTop = $("messages").scrollHeight;
      }
      if (store.open === conversation) showStats({ ...turnStats(timer, null), ...previousCounts(conversation) },
                                                  modelCard, effectivePolicy(conversation.settings, modelCard));
      saveSoon();
    }
  } catch (error) {
    if (error.name === "AbortError") {
      message.stopped = true;
    } else {
      if (!message.content) conversation.messages.pop();
      showNotice(error.message);
      if (error.status === 401) askForApiKey();
    }
  } finally {
    streaming = null;
  }
  // A reply stopped before its first token measured nothing: the last turn's stats stand.
  if (usage || timer.ttftSeconds !== null) conversation.stats = turnStats(timer, usage);
  store.touch(conversation);
  renderAll();
}

// While a reply streams, the counts the server reports at its end still stand at the last turn's.
function previousCounts(conversation) {
  const { prompt_tokens, total_tokens, cached_tokens, evicted_tokens } = conversation.stats ?? {};
  return { prompt_tokens, total_tokens, cached_tokens, evicted_tokens };
}

function send(event) {
  event.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || streaming) return;
  const conversation = store.open;
  conversation.messages.push({ role: "user", content: text });
  $("prompt").value = "";
  streamReply(conversation);
}

function regenerate() {
  const conversation = store.open;
  if (streaming) return;
  while (conversation.messages.at(-1)?.role === "assistant") conversation.messages.pop();
  if (conversation.messages.length) streamReply(conversation);
}

// ----- the model and the API key -----

async function loadModelCard() {
  try {
    modelCard = await fetchModelCard();
    $("model-name").textContent = modelCard.id;
    renderStats();
  } catch (error) {
    if (error.status === 401) askForApiKey();
    else showNotice(`Could not reach the server: ${error.message}`);
  }
}

function askForApiKey() {
  const dialog = $("api-key-dialog");
  if (!dialog.open) dialog.showModal();
}

$("api-key-dialog").addEventListener("close", () => {
  setApiKey($("api-key-input").value.trim());
  showNotice("");
  loadModelCard();
});

// ----- wiring -----

$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) send(event);
});
$("stop").addEventListener("click", () => streaming?.controller.abort());
$("regenerate").addEventListener("click", regenerate);
$("new-conversation").addEventListener("click", () => {
  store.create();
  renderAll();
  $("prompt").focus();
});
$("settings-form").addEventListener("input", () => {
  const form = $("settings-form");
  store.open.settings = readSettings(form);
  store.save();
  showRelevantFields(form);
  renderStats();
});
$("toggle-settings").addEventListener("click", () => {
  const hidden = document.body.classList.toggle("settings-hidden");
  $("toggle-settings").setAttribute("aria-expanded", String(!hidden));
});
$("export-conversations").addEventListener("click", () => {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([store.exportJson()], { type: "application/json" }));
  link.download = "ropeway-conversations.json";
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);  // once the download has read it
});
$("import-conversations").addEventListener("change", async (event) => {
  const [file] = event.target.files;
  event.target.value = "";  // choosing the same file again is a new import
  if (!file) return;
  try {
    const count = store.importJson(await file.text());
    showNotice("");
    renderAll();
    showNotice(`Imported ${count} conversation${count === 1 ? "" : "s"}.`);
  } catch (error) {
    showNotice(`Import failed: ${error.message}`);
  }
});

renderAll();
loadModelCard();
