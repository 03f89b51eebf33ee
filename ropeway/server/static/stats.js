// What the session is doing: the last turn's timing, measured here as the reply streams in,
// and the server's counts from the usage of the stream's last chunk (stream_options.include_usage).

const integer = new Intl.NumberFormat("en-US");

export class TurnTimer {
  constructor() {
    this.started = performance.now();
    this.first = null;
    this.last = null;
    this.chunks = 0;
  }

  onContent() {
    this.last = performance.now();
    this.first ??= this.last;
    this.chunks += 1;
  }

  get ttftSeconds() {
    return this.first === null ? null : (this.first - this.started) / 1000;
  }

  // Tokens after the first over the time they took; chunks stand in for tokens until usage arrives.
  tokensPerSecond(tokens = this.chunks) {
    const seconds = (this.last - this.first) / 1000;
    return tokens > 1 && seconds > 0 ? (tokens - 1) / seconds : null;
  }
}

export function turnStats(timer, usage) {
  return {
    ttft: timer.ttftSeconds,
    tokens_per_second: timer.tokensPerSecond(usage ? usage.completion_tokens : timer.chunks),
    prompt_tokens: usage?.prompt_tokens ?? null,
    total_tokens: usage?.total_tokens ?? null,
    cached_tokens: usage?.prompt_tokens_details?.cached_tokens ?? null,
    evicted_tokens: usage?.ropeway?.evicted_tokens ?? null,
  };
}

function show(id, value, text) {
  const node = document.getElementById(id);
  node.dataset.value = value ?? "";
  node.textContent = value === null || value === undefined ? "—" : text;
}

function windowText(policy) {
  if (!policy) return "—";
  if (policy.type === "none") return "none: full attention";
  const landmarks = policy.type === "landmark"
    ? ` + ${integer.format(policy.landmarks)} landmarks${policy.retrieve ? ` + ${integer.format(policy.retrieve)} recalled` : ""}`
    : "";
  return `${integer.format(policy.sinks)} sinks${landmarks} + ${integer.format(policy.window)} window`;
}

// stats: a turn's (turnStats), or null before the first; policy: what the conversation runs under.
export function showStats(stats, modelCard, policy) {
  const trained = modelCard?.trained_context_len ?? null;
  const total = stats?.total_tokens ?? null;
  show("stat-conversation", total, `${integer.format(total)} tokens`);
  show("stat-trained", trained, `of ${integer.format(trained)} trained`);
  const meter = document.getElementById("stat-context-meter");
  meter.max = trained ?? 1;
  meter.value = Math.min(total ?? 0, meter.max);
  meter.classList.toggle("past-trained", total !== null && trained !== null && total > trained);
  const windowNode = document.getElementById("stat-window");
  windowNode.textContent = windowText(policy);
  windowNode.dataset.value = policy ? JSON.stringify(policy) : "";
  show("stat-evicted", stats?.evicted_tokens, integer.format(stats?.evicted_tokens));
  const cached = stats?.cached_tokens ?? null;
  show("stat-cached", cached,
       `${integer.format(cached)} of ${integer.format(stats?.prompt_tokens)} prompt tokens (${cached ? "hit" : "miss"})`);
  show("stat-ttft", stats?.ttft, `${stats?.ttft?.toFixed(2)} s`);
  show("stat-speed", stats?.tokens_per_second, `${stats?.tokens_per_second?.toFixed(1)} tokens/s`);
}
