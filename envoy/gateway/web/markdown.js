// Markdown for model replies, rendered by building DOM nodes from text: a reply is never parsed as HTML,
// so markup in it (<img onerror=...>, <script>) shows as the text it is. Links keep only http(s) and
// mailto targets; anything else (javascript:, data:) stays plain text.

const SAFE_LINK = /^(https?:\/\/|mailto:)/i;

/** Replace the children of `container` with `text` rendered as Markdown. */
export function renderMarkdown(container, text) {
  const fragment = document.createDocumentFragment();
  const parts = text.split(/^```/m);
  parts.forEach((part, index) => {
    if (index % 2 === 1) {
      // A fenced code block: the first line names the language.
      const newline = part.indexOf("\n");
      const language = newline >= 0 ? part.slice(0, newline).trim() : "";
      const code = newline >= 0 ? part.slice(newline + 1) : "";
      const pre = document.createElement("pre");
      const element = document.createElement("code");
      if (/^[\w+-]{1,20}$/.test(language)) element.dataset.language = language;
      element.textContent = code.replace(/\n$/, "");
      pre.append(element);
      fragment.append(pre);
    } else {
      blocks(part, fragment);
    }
  });
  container.replaceChildren(fragment);
}

function blocks(text, parent) {
  let list = null;
  let paragraph = null;
  for (const line of text.split("\n")) {
    const heading = /^(#{1,6})\s+(.*)$/.exec(line);
    const bullet = /^\s*[-*+]\s+(.*)$/.exec(line);
    const numbered = /^\s*\d+[.)]\s+(.*)$/.exec(line);
    if (!line.trim()) {
      list = null;
      paragraph = null;
    } else if (heading) {
      list = paragraph = null;
      const element = document.createElement(`h${Math.min(6, heading[1].length + 2)}`);
      inline(heading[2], element);
      parent.append(element);
    } else if (bullet || numbered) {
      paragraph = null;
      const kind = bullet ? "ul" : "ol";
      if (!list || list.localName !== kind) {
        list = document.createElement(kind);
        parent.append(list);
      }
      const item = document.createElement("li");
      inline((bullet || numbered)[1], item);
      list.append(item);
    } else {
      list = null;
      if (paragraph) paragraph.append(document.createElement("br"));
      else {
        paragraph = document.createElement("p");
        parent.append(paragraph);
      }
      inline(line, paragraph);
    }
  }
}

// `code`, **bold**, *italic* or _italic_, [text](url)
const INLINE = /(`[^`]+`)|(\*\*[^*]+\*\*)|(\*[^*\s][^*]*\*)|(_[^_\s][^_]*_)|(\[[^\]]+\]\([^)\s]+\))/;

function inline(text, parent) {
  let rest = text;
  while (rest) {
    const match = INLINE.exec(rest);
    if (!match) {
      parent.append(document.createTextNode(rest));
      return;
    }
    if (match.index > 0) parent.append(document.createTextNode(rest.slice(0, match.index)));
    const token = match[0];
    if (match[1]) {
      const code = document.createElement("code");
      code.textContent = token.slice(1, -1);
      parent.append(code);
    } else if (match[2]) {
      const strong = document.createElement("strong");
      inline(token.slice(2, -2), strong);
      parent.append(strong);
    } else if (match[3] || match[4]) {
      const em = document.createElement("em");
      inline(token.slice(1, -1), em);
      parent.append(em);
    } else {
      const [, label, url] = /^\[([^\]]+)\]\(([^)\s]+)\)$/.exec(token);
      if (SAFE_LINK.test(url)) {
        const link = document.createElement("a");
        link.href = url;
        link.rel = "noopener noreferrer nofollow";
        link.target = "_blank";
        link.textContent = label;
        parent.append(link);
      } else {
        parent.append(document.createTextNode(token));
      }
    }
    rest = rest.slice(match.index + token.length);
  }
}
