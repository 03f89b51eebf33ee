// The settings form of the open conversation, and the request fields its values stand for.
// Inputs are named by their path in the settings object ("policy.window"); an empty value
// leaves the field out of the request, so the server's default applies.

function valueAt(settings, path) {
  return path.split(".").reduce((node, key) => node?.[key], settings) ?? "";
}

export function showSettings(form, settings) {
  for (const input of form.elements) {
    if (input.name) input.value = valueAt(settings, input.name);
  }
  showRelevantFields(form);
}

export function readSettings(form) {
  const settings = { policy: {}, rope: {} };
  for (const input of form.elements) {
    if (!input.name) continue;
    const [group, key] = input.name.split(".");
    if (key) settings[group][key] = input.value;
    else settings[group] = input.value;
  }
  return settings;
}

// Sizes only for the policies that have them; a factor only for a scaling that takes one.
export function showRelevantFields(form) {
  const policy = form.elements["policy.type"].value;
  const rope = form.elements["rope.rope_type"].value;
  for (const field of form.querySelectorAll("[data-for-policy]")) {
    field.hidden = !field.dataset.forPolicy.split(" ").includes(policy);
  }
  form.querySelector("[data-for-rope]").hidden = rope === "server" || rope === "none";
}

function number(value, name, integer) {
  if (String(value).trim() === "") return undefined;
  const parsed = Number(value);
  if (!Number.isFinite(parsed) || (integer && !Number.isInteger(parsed))) {
    throw new Error(`${name} must be ${integer ? "a whole number" : "a number"}, not "${value}"`);
  }
  return parsed;
}

function contextPolicy({ type, sinks, window, landmarks, retrieve }) {
  if (type === "server") return undefined;
  if (type === "none") return { type };
  const policy = {
    type,
    sinks: number(sinks, "sinks", true),
    window: number(window, "window", true),
  };
  if (type === "landmark") {
    policy.landmarks = number(landmarks, "landmarks", true);
    policy.retrieve = number(retrieve, "retrieve", true);
  }
  return policy;
}

function ropeScaling({ rope_type, factor }) {
  if (rope_type === "server") return undefined;
  if (rope_type === "none") return { rope_type };
  return { rope_type, factor: number(factor, "RoPE factor", false) };
}

// The request's sampling and long-context fields; throws, naming the field, on a value that is not a number.
export function requestFields(settings) {
  const fields = {
    temperature: number(settings.temperature, "temperature", false),
    top_p: number(settings.top_p, "top_p", false),
    max_tokens: number(settings.max_tokens, "max_tokens", true),
    context_policy: contextPolicy(settings.policy),
    rope_scaling: ropeScaling(settings.rope),
  };
  return Object.fromEntries(Object.entries(fields).filter(([, value]) => value !== undefined));
}

// The policy a request of this conversation runs under: its own, or the server's default.
export function effectivePolicy(settings, modelCard) {
  const own = contextPolicy(settings.policy);
  if (own) return { ...modelCard?.context_policy, ...own };
  return modelCard?.context_policy ?? null;
}
