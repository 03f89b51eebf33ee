// Conversations kept in the browser's local storage: the list, the one open, rename, delete,
// and export/import of all of them as one JSON file.

const STORAGE_KEY = "ropeway.conversations";
const OPEN_KEY = "ropeway.openConversation";
const EXPORT_FORMAT = "ropeway-conversations";
const ROLES = new Set(["user", "assistant"]);

// Form values as typed: an empty string means "the server's default".
export function defaultSettings() {
  return {
    system: "",
    temperature: "",
    top_p: "",
    max_tokens: "",
    policy: { type: "server", sinks: "4", window: "4096", landmarks: "64", retrieve: "0" },
    rope: { rope_type: "server", factor: "" },
  };
}

// crypto.randomUUID exists only in secure contexts, and a server on a LAN address over http is not one.
function newId() {
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
}

function newConversation(fields = {}) {
  const now = Date.now();
  return {
    id: newId(),
    title: "",
    created: now,
    updated: now,
    messages: [],
    stats: null,
    ...fields,
    settings: mergeSettings(fields.settings),
  };
}

function mergeSettings(settings = {}) {
  const defaults = defaultSettings();
  return {
    ...defaults,
    ...settings,
    policy: { ...defaults.policy, ...settings.policy },
    rope: { ...defaults.rope, ...settings.rope },
  };
}

export function conversationTitle(conversation) {
  if (conversation.title) return conversation.title;
  const first = conversation.messages.find((m) => m.role === "user");
  return first ? first.content.slice(0, 48) : "New conversation";
}

// A conversation read from a file or from storage, checked field by field; throws on a bad one.
function parseConversation(raw, where) {
  if (typeof raw !== "object" || raw === null || !Array.isArray(raw.messages)) {
    throw new Error(`${where}: not a conversation (no messages list)`);
  }
  const messages = raw.messages.map((message, index) => {
    if (!ROLES.has(message?.role) || typeof message.content !== "string") {
      throw new Error(`${where}, message ${index + 1}: needs a role (user or assistant) and text content`);
    }
    return { role: message.role, content: message.content, ...(message.stopped ? { stopped: true } : {}) };
  });
  return newConversation({
    title: typeof raw.title === "string" ? raw.title : "",
    created: Number(raw.created) || Date.now(),
    updated: Number(raw.updated) || Date.now(),
    messages,
    settings: typeof raw.settings === "object" && raw.settings !== null ? raw.settings : {},
    stats: typeof raw.stats === "object" ? raw.stats : null,
  });
}

export class ConversationStore {
  constructor() {
    let stored = [];
    try {
      stored = JSON.parse(localStorage.getItem(STORAGE_KEY) || "[]");
    } catch {
      stored = [];  // unreadable storage starts over rather than breaking the page
    }
    this.conversations = stored.flatMap((raw, index) => {
      try {
        const conversation = parseConversation(raw, `stored conversation ${index + 1}`);
        if (typeof raw.id === "string") conversation.id = raw.id;
        return [conversation];
      } catch (error) {
        console.warn("dropped an unreadable conversation:", error.message);
        return [];
      }
    });
    this.openId = localStorage.getItem(OPEN_KEY);
    if (!this.get(this.openId)) this.openId = this.conversations[0]?.id ?? this.create().id;
  }

  get(id) {
    return this.conversations.find((c) => c.id === id);
  }

  get open() {
    return this.get(this.openId);
  }

  // Most recently used first.
  list() {
    return [...this.conversations].sort((a, b) => b.updated - a.updated);
  }

  select(id) {
    this.openId = id;
    this.save();
  }

  create() {
    const conversation = newConversation();
    this.conversations.push(conversation);
    this.openId = conversation.id;
    this.save();
    return conversation;
  }

  rename(id, title) {
    this.get(id).title = title.trim();
    this.save();
  }

  remove(id) {
    this.conversations = this.conversations.filter((c) => c.id !== id);
    if (this.openId === id) this.openId = this.list()[0]?.id ?? this.create().id;
    this.save();
  }

  touch(conversation) {
    conversation.updated = Date.now();
    this.save();
  }

  save() {
    localStorage.setItem(STORAGE_KEY, JSON.stringify(this.conversations));
    localStorage.setItem(OPEN_KEY, this.openId);
  }

  exportJson() {
    return JSON.stringify({ format: EXPORT_FORMAT, version: 1, conversations: this.conversations }, null, 2);
  }

  // Adds the file's conversations (new ids, so importing twice keeps both copies); returns how many.
  importJson(text) {
    const file = JSON.parse(text);
    if (file?.format !== EXPORT_FORMAT || !Array.isArray(file.conversations)) {
      throw new Error(`not a ropeway conversations file (expected "format": "${EXPORT_FORMAT}")`);
    }
    const imported = file.conversations.map((raw, index) => parseConversation(raw, `conversation ${index + 1}`));
    this.conversations.push(...imported);
    if (imported.length) this.openId = imported[0].id;
    this.save();
    return imported.length;
  }
}
