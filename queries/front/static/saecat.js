// saecat's pages: keyboard paging (left/right arrows, or j/k) between features and pages, and the
// SQL console's highlighting (pieces cut by the server's sqlglot tokenizer) and Ctrl+Enter.
"use strict";
document.addEventListener("keydown", (event) => {
  if (event.altKey || event.ctrlKey || event.metaKey || event.shiftKey) return;
  const typing = event.target.closest("input, textarea, select, [contenteditable]");
  if (typing) return;
  const rel = { ArrowLeft: "prev", k: "prev", ArrowRight: "next", j: "next" }[event.key];
  const target = rel && document.querySelector(`a[rel=${rel}], button[rel=${rel}]`);
  if (!target) return;
  event.preventDefault();
  if (target.tagName === "A") window.location.assign(target.href);
  else target.click(); // the SQL console pages by posting its query again
});

const editor = document.getElementById("editor");
if (editor) {
  const query = document.getElementById("query");
  const view = document.getElementById("query-view");
  const dialect = document.getElementById("dialect");
  let latest = 0;
  const paint = async () => {
    const asked = ++latest;
    const params = new URLSearchParams({ query: query.value, dialect: dialect.value });
    const reply = await fetch(`/ui/sql/pieces?${params}`, { credentials: "same-origin" }).catch(() => null);
    if (asked !== latest) return; // a later keystroke's answer wins
    if (!reply || !reply.ok) { // no highlighting (a query too long for a URL): the textarea's own text shows
      editor.classList.remove("highlighting");
      return;
    }
    const pieces = (await reply.json()).map(([text, kind]) => {
      if (!kind) return document.createTextNode(text);
      const span = document.createElement("span");
      span.className = kind;
      span.textContent = text;
      return span;
    });
    view.replaceChildren(...pieces, "\n");
    view.scrollTop = query.scrollTop;
    editor.classList.add("highlighting");
  };
  query.addEventListener("input", paint);
  dialect.addEventListener("change", paint);
  query.addEventListener("scroll", () => { view.scrollTop = query.scrollTop; });
  query.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      query.form.requestSubmit();
    }
  });
  editor.classList.add("highlighting"); // the text shows through the textarea only once JS paints it
}
