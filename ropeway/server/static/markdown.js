// A small Markdown renderer for model output that builds DOM nodes and sets only text and
// http(s) link targets: nothing the model writes is ever parsed as HTML. It covers what chat
// models write: paragraphs, headings, lists, quotes, rules, fenced code (an unclosed fence, as
// mid-stream, runs to the end), inline code, bold, italics and links.

const FENCE = /^\s*(```|~~~)\s*([\w+#.-]*)/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^\s*>\s?(.*)$/;
const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;

// Earliest match wins; at one position, the first listed.
const INLINE = [
  { kind: "code", pattern: /`([^`\n]+)`/ },
  { kind: "link", pattern: /\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/ },
  { kind: "strong", pattern: /\*\*(?=\S)([^\n]*?\S)\*\*|__(?=\S)([^\n]*?\S)__/ },
  { kind: "em", pattern: /\*(?=[^\s*])([^*\n]*?[^\s*])\*|\b_(?=[^\s_])([^_\n]*?[^\s_])_\b/ },
];

function element(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

export function appendInline(parent, text) {
  while (text) {
    let best = null;
    for (const rule of INLINE) {
      const match = rule.pattern.exec(text);
      if (match && (best === null || match.index < best.match.index)) best = { rule, match };
    }
    if (best === null) {
      parent.append(document.createTextNode(text));
      return;
    }
    const { rule, match } = best;
    if (match.index > 0) parent.append(document.createTextNode(text.slice(0, match.index)));
    const inner = match[1] ?? match[2];
    if (rule.kind === "code") {
      const code = element("code");
      code.textContent = inner;
      parent.append(code);
    } else if (rule.kind === "link") {
      const link = element("a");
      link.href = match[2];  // the pattern admits http(s) URLs only
      link.rel = "noopener noreferrer";
      link.target = "_blank";
      appendInline(link, inner);
      parent.append(link);
    } else {
      const span = element(rule.kind);
      appendInline(span, inner);
      parent.append(span);
    }
    text = text.slice(match.index + match[0].length);
  }
}

// Lines of a paragraph keep their breaks, as chat output means them.
function appendLines(parent, lines) {
  lines.forEach((line, index) => {
    if (index > 0) parent.append(element("br"));
    appendInline(parent, line);
  });
}

function codeBlock(language, lines) {
  const pre = element("pre");
  const code = element("code");
  if (language) {
    code.dataset.language = language;
    const label = element("span", "code-language");
    label.textContent = language;
    pre.append(label);
  }
  code.textContent = lines.join("\n");
  pre.append(code);
  return pre;
}

export function renderMarkdown(container, text) {
  container.replaceChildren();
  const lines = text.split("\n");
  let paragraph = [];
  let list = null;
  let quote = null;

  const closeBlocks = () => {
    if (paragraph.length) {
      const p = element("p");
      appendLines(p, paragraph);
      container.append(p);
      paragraph = [];
    }
    list = null;
    if (quote) {
      const blockquote = element("blockquote");
      appendLines(blockquote, quote);
      container.append(blockquote);
      quote = null;
    }
  };

  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    let match;
    if ((match = FENCE.exec(line))) {
      closeBlocks();
      const body = [];
      for (i++; i < lines.length && !lines[i].trimStart().startsWith(match[1]); i++) body.push(lines[i]);
      container.append(codeBlock(match[2], body));
    } else if (!line.trim()) {
      closeBlocks();
    } else if ((match = HEADING.exec(line))) {
      closeBlocks();
      const heading = element(`h${Math.min(match[1].length + 2, 6)}`);  // below the page's own headings
      appendInline(heading, match[2]);
      container.append(heading);
    } else if (RULE.test(line)) {
      closeBlocks();
      container.append(element("hr"));
    } else if ((match = BULLET.exec(line)) || (match = NUMBERED.exec(line))) {
      const ordered = match.length === 3;
      const tag = ordered ? "ol" : "ul";
      if (!list || list.tagName.toLowerCase() !== tag) {
        closeBlocks();
        list = element(tag);
        if (ordered && match[1] !== "1") list.start = Number(match[1]);
        container.append(list);
      }
      const item = element("li");
      appendInline(item, ordered ? match[2] : match[1]);
      list.append(item);
    } else if ((match = QUOTE.exec(line))) {
      if (!quote) {
        closeBlocks();
        quote = [];
      }
      quote.push(match[1]);
    } else if (list && /^\s+\S/.test(line)) {
      const item = list.lastElementChild;  // a wrapped list item goes on
      item.append(element("br"));
      appendInline(item, line.trim());
    } else {
      if (list || quote) closeBlocks();
      paragraph.push(line);
    }
  }
  closeBlocks();
}
