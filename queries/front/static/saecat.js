// saecat's pages: keyboard paging (left/right arrows, or j/k) between features and pages.
"use strict";
document.addEventListener("keydown", (event) => {
  if (event.altKey || event.ctrlKey || event.metaKey || event.shiftKey) return;
  const typing = event.target.closest("input, textarea, select, [contenteditable]");
  if (typing) return;
  const rel = { ArrowLeft: "prev", k: "prev", ArrowRight: "next", j: "next" }[event.key];
  const link = rel && document.querySelector(`a[rel=${rel}]`);
  if (link) {
    event.preventDefault();
    window.location.assign(link.href);
  }
});
