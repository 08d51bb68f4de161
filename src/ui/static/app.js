// latchkey dashboard: the live tail (server-sent events) and a gentle refresh of the
// approvals page. Writes only textContent: nothing from the log is ever parsed as HTML.
"use strict";

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text == null ? "-" : String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
}

function startTail() {
  const body = document.getElementById("tail");
  const form = document.getElementById("filters");
  const state = document.getElementById("tail-state");
  if (!body || !form) return;
  let es = null;
  function connect() {
    if (es) es.close();
    while (body.firstChild) body.removeChild(body.firstChild);
    const q = new URLSearchParams(new FormData(form)).toString();
    es = new EventSource("/ui/events?" + q);
    es.onopen = () => { state.textContent = "live"; };
    es.onerror = () => { state.textContent = "reconnecting…"; };
    es.onmessage = (m) => {
      let e;
      try { e = JSON.parse(m.data); } catch (_) { return; }
      const tr = document.createElement("tr");
      tr.className = e.decision;
      if (e.kind === "approval") tr.classList.add("approval");
      cell(tr, e.ts);
      cell(tr, e.kind === "approval" ? "approval" : e.decision);
      cell(tr, e.agent + (e.on_behalf_of ? " (for " + e.on_behalf_of + ")" : ""));
      cell(tr, e.method + " " + e.host + e.path);
      cell(tr, e.status);
      cell(tr, e.route);
      cell(tr, e.reason);
      cell(tr, e.approval_id ? e.approval_id + (e.approver ? " by " + e.approver : "") : "");
      body.insertBefore(tr, body.firstChild);
      while (body.children.length > 500) body.removeChild(body.lastChild);
    };
  }
  form.addEventListener("submit", (ev) => { ev.preventDefault(); connect(); });
  form.addEventListener("change", connect);
  connect();
}

function refreshApprovals() {
  if (document.body.dataset.page !== "approvals") return;
  let touched = false;
  document.querySelectorAll("form.decide input").forEach((i) => {
    i.addEventListener("input", () => { touched = true; });
    i.addEventListener("focus", () => { touched = true; });
  });
  setInterval(() => { if (!touched) location.replace("/ui/approvals"); }, 3000);
}

document.addEventListener("DOMContentLoaded", () => {
  startTail();
  refreshApprovals();
});
