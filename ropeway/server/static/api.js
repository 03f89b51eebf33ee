// The server's API as the page uses it: the model card and streamed chat completions, sent with
// the API key once the user has given one (the server asks for it with a 401).

const KEY_STORAGE = "ropeway.apiKey";

export class ApiError extends Error {
  constructor(status, message, param) {
    super(message);
    this.status = status;
    this.param = param;
  }
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

function requestHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = localStorage.getItem(KEY_STORAGE);
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  let param = null;
  try {
    const body = await response.json();
    if (body.error) ({ message, param } = body.error);
  } catch {
    // Not OpenAI's error object (a proxy's page, say): the status line says enough.
  }
  return new ApiError(response.status, message, param);
}

export async function fetchModelCard() {
  const response = await fetch("/v1/models", { headers: requestHeaders() });
  if (!response.ok) throw await errorOf(response);
  return (await response.json()).data[0];
}

// Yields each chunk of a streamed chat completion; an error frame mid-stream is thrown.
export async function* streamChatCompletion(body, signal) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: requestHeaders(), body: JSON.stringify(body), signal,
  });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    pending += value;
    const lines = pending.split("\n");
    pending = lines.pop();  // an incomplete line waits for the rest of it
    for (const line of lines) {
      if (!line.startsWith("data:")) continue;  // event separators and keep-alive comments
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(0, chunk.error.message, chunk.error.param);
      yield chunk;
    }
  }
}
