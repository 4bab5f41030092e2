// A small, safe renderer for the markdown the server returns (layout.cells_to_markdown).
//
// Written by hand because the page must work offline with no third-party code. It never assigns
// innerHTML: text becomes text nodes, and the only HTML it accepts (the model writes tables as
// <table> HTML) is parsed into an inert document by DOMParser and copied element by element
// through an allow-list, without any attribute except colspan / rowspan.

const ALLOWED_TAGS = new Set([
  "TABLE", "THEAD", "TBODY", "TFOOT", "TR", "TD", "TH", "CAPTION", "B", "STRONG", "I", "EM",
  "U", "SUB", "SUP", "BR", "P", "SPAN", "DIV", "UL", "OL", "LI",
]);
const ALLOWED_ATTRIBUTES = new Set(["colspan", "rowspan"]);

/** Copy an untrusted HTML fragment through the allow-list; returns a DocumentFragment. */
export function sanitizeHtml(html) {
  const inert = new DOMParser().parseFromString(`<body>${html}</body>`, "text/html");
  const out = document.createDocumentFragment();
  for (const node of inert.body.childNodes) copyNode(node, out);
  return out;
}

function copyNode(node, parent) {
  if (node.nodeType === Node.TEXT_NODE) {
    parent.appendChild(document.createTextNode(node.textContent));
    return;
  }
  if (node.nodeType !== Node.ELEMENT_NODE) return;
  if (!ALLOWED_TAGS.has(node.tagName)) {
    // drop the tag, keep its text (except for script-like containers)
    if (["SCRIPT", "STYLE", "IFRAME", "OBJECT", "TEMPLATE"].includes(node.tagName)) return;
    for (const child of node.childNodes) copyNode(child, parent);
    return;
  }
  const element = document.createElement(node.tagName.toLowerCase());
  for (const attribute of node.attributes) {
    const name = attribute.name.toLowerCase();
    if (ALLOWED_ATTRIBUTES.has(name) && /^\d{1,3}$/.test(attribute.value)) {
      element.setAttribute(name, attribute.value);
    }
  }
  for (const child of node.childNodes) copyNode(child, element);
  parent.appendChild(element);
}

/** Inline markdown: **bold**, *italic*, `code`, $math$ (shown as code). Returns nodes. */
function inline(text, parent) {
  const pattern = /(\*\*[^*]+\*\*|`[^`]+`|\$[^$\n]+\$|\*[^*\s][^*]*\*)/g;
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    if (match.index > last) parent.appendChild(document.createTextNode(text.slice(last, match.index)));
    const token = match[0];
    let element;
    if (token.startsWith("**")) {
      element = document.createElement("strong");
      element.textContent = token.slice(2, -2);
    } else if (token.startsWith("`")) {
      element = document.createElement("code");
      element.textContent = token.slice(1, -1);
    } else if (token.startsWith("$")) {
      element = document.createElement("code");
      element.className = "math";
      element.textContent = token;
    } else {
      element = document.createElement("em");
      element.textContent = token.slice(1, -1);
    }
    parent.appendChild(element);
    last = match.index + token.length;
  }
  if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
}

function element(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

/**
 * Render markdown into `container` (emptied first).
 * `pictureFor(name)` may return an element for `![Picture](name)` (e.g. a crop of the page).
 */
export function renderMarkdown(markdown, container, pictureFor = () => null) {
  container.replaceChildren();
  const blocks = String(markdown ?? "").split(/\n{2,}/);
  for (const raw of blocks) {
    const block = raw.trim();
    if (!block) continue;
    container.appendChild(renderBlock(block, pictureFor));
  }
}

function renderBlock(block, pictureFor) {
  if (/^<(table|div|p)[\s>]/i.test(block)) {
    const wrapper = element("div", "html-block");
    wrapper.appendChild(sanitizeHtml(block));
    return wrapper;
  }
  if (block.startsWith("$$") && block.endsWith("$$")) {
    const pre = element("pre", "math");
    pre.textContent = block;
    return pre;
  }
  if (block.startsWith("```")) {
    const pre = element("pre");
    pre.textContent = block.replace(/^```[^\n]*\n?/, "").replace(/\n?```$/, "");
    return pre;
  }
  const picture = block.match(/^!\[([^\]]*)\]\(([^)\s]+)\)$/);
  if (picture) {
    const figure = element("figure", "picture");
    const shown = pictureFor(picture[2]);
    if (shown) figure.appendChild(shown);
    const caption = element("figcaption");
    caption.textContent = `${picture[1] || "Picture"} (${picture[2].startsWith("data:") ? "embedded" : picture[2]})`;
    figure.appendChild(caption);
    return figure;
  }
  const heading = block.match(/^(#{1,6})\s+(.*)$/s);
  if (heading) {
    const node = element(`h${Math.min(6, heading[1].length + 1)}`);
    inline(heading[2], node);
    return node;
  }
  const lines = block.split("\n");
  if (lines.every((line) => /^\s*([-*+]|\d+[.)])\s+/.test(line))) {
    const ordered = /^\s*\d/.test(lines[0]);
    const list = element(ordered ? "ol" : "ul");
    for (const line of lines) {
      const item = element("li");
      inline(line.replace(/^\s*([-*+]|\d+[.)])\s+/, ""), item);
      list.appendChild(item);
    }
    return list;
  }
  if (lines.length >= 2 && /^\s*\|?\s*:?-{3,}/.test(lines[1]) && lines[0].includes("|")) {
    return pipeTable(lines);
  }
  const paragraph = element("p");
  lines.forEach((line, index) => {
    if (index) paragraph.appendChild(element("br"));
    inline(line, paragraph);
  });
  return paragraph;
}

function pipeTable(lines) {
  const cells = (line) => line.trim().replace(/^\||\|$/g, "").split("|").map((c) => c.trim());
  const table = element("table");
  const head = element("thead");
  const headRow = element("tr");
  for (const cell of cells(lines[0])) {
    const th = element("th");
    inline(cell, th);
    headRow.appendChild(th);
  }
  head.appendChild(headRow);
  table.appendChild(head);
  const body = element("tbody");
  for (const line of lines.slice(2)) {
    const row = element("tr");
    for (const cell of cells(line)) {
      const td = element("td");
      inline(cell, td);
      row.appendChild(td);
    }
    body.appendChild(row);
  }
  table.appendChild(body);
  return table;
}
