// The console: plain JavaScript over the service's own JSON API (no build step).
"use strict";

const $ = (selector) => document.querySelector(selector);
const keyInput = $("#api-key");
keyInput.value = localStorage.getItem("baft-api-key") || "";
keyInput.addEventListener("change", () => { localStorage.setItem("baft-api-key", keyInput.value); refresh(); });

async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (keyInput.value) headers.Authorization = `Bearer ${keyInput.value}`;
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.reason || `${response.status} ${response.statusText}`);
  return data;
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  return node;
}

function showError(where, error) {
  where.replaceChildren(element("span", { class: "error" }, error.message));
}

// Every row of a paged list, newest first.
async function newest(path, count) {
  const first = await api("GET", `${path}?limit=1`);
  const offset = Math.max(0, first.total - count);
  const page = await api("GET", `${path}?limit=${count}&offset=${offset}`);
  return { items: page.items.reverse(), total: first.total };
}

const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

async function loadVersions() {
  const { items } = await newest("/versions", 200);
  const current = items[0];
  const list = $("#versions");
  list.replaceChildren(...items.map((v) => {
    const what = v.kind === "restore" ? `restore of v${v.restored_from}`
      : v.kind === "base" ? "base model" : `${v.kind}: ${v.edits.length === 1 ? "edit" : "edits"} ${v.edits.join(", ")}`;
    const item = element("li", { class: v === current ? "current" : "", "data-version": v.id },
      element("strong", {}, `v${v.id}`),
      element("span", { class: "what" }, what, element("span", { class: "muted" }, ` · ${plural(v.edit_count, "edit")} · ${new Date(v.created_at).toLocaleString()}`)),
      v === current ? element("span", { class: "muted" }, "current")
        : element("button", { class: "restore", type: "button", onclick: () => restore(v.id) }, "restore"));
    return item;
  }));
  for (const [select, pick] of [[$("#version-a"), items[1] || current], [$("#version-b"), current]]) {
    const chosen = select.value;
    select.replaceChildren(...items.map((v) => element("option", { value: v.id }, `v${v.id} (${v.kind}, ${plural(v.edit_count, "edit")})`)));
    select.value = chosen && items.some((v) => String(v.id) === chosen) ? chosen : pick.id;
  }
}

async function restore(id) {
  $("#notice").textContent = `restoring v${id}…`;
  try {
    const out = await api("POST", `/versions/${id}/restore`, {});
    $("#notice").textContent = out.status === "done" ? `v${id} restored as v${out.version}` : `restore of v${id} ${out.status}`;
  } catch (error) { showError($("#notice"), error); }
  await refresh();
}

async function loadEdits() {
  const { items } = await newest("/edits", 100);
  $("#edits tbody").replaceChildren(...items.map((e) => element("tr", { "data-edit": e.id, onclick: (event) => showMetrics(e, event.currentTarget) },
    element("td", {}, e.id),
    element("td", { class: `status-${e.status}` }, e.status, e.error ? element("div", { class: "muted" }, e.error) : ""),
    element("td", {}, `${e.prompt} → ${e.object}`),
    element("td", {}, e.version ? `v${e.version}` : ""),
    element("td", {}, e.train_seconds == null ? "" : e.train_seconds.toFixed(2)))));
}

const METRICS = ["reliability", "generality", "locality", "portability", "reliability_em", "generality_em", "answer_repeated", "steps", "loss"];

async function showMetrics(edit, row) {
  document.querySelectorAll("#edits tr.selected").forEach((r) => r.classList.remove("selected"));
  row.classList.add("selected");
  const box = $("#metrics");
  if (edit.status !== "applied") { box.textContent = `Edit ${edit.id} is ${edit.status}.`; return; }
  try {
    const m = await api("GET", `/edits/${edit.id}/metrics`);
    const cell = (name) => m[name] == null ? "–" : name === "steps" ? m[name] : m[name].toFixed(3);
    box.replaceChildren(element("h3", {}, `Edit ${edit.id} on v${m.version} (${m.measured.replace("_", " ")})`),
      element("dl", {}, ...METRICS.flatMap((name) => [element("dt", {}, name.replace("_", " ")), element("dd", {}, cell(name))])));
  } catch (error) { showError(box, error); }
}

async function compare(event) {
  event.preventDefault();
  const prompt = $("#prompt").value;
  const max_new_tokens = Number($("#max-tokens").value);
  const sides = [["#version-a", "#answer-a", "#answer-a-title"], ["#version-b", "#answer-b", "#answer-b-title"]];
  // Both requests at once: the server decodes them in one batch.
  await Promise.all(sides.map(async ([select, answer, title]) => {
    const version = Number($(select).value);
    $(title).textContent = `v${version}`;
    $(answer).textContent = "…";
    try {
      const out = await api("POST", "/generate", { prompt, max_new_tokens, version });
      $(answer).textContent = prompt + out.text;
      $(title).textContent = `v${out.version} · ${out.tokens} tokens in ${out.seconds.toFixed(2)} s`;
    } catch (error) { showError($(answer), error); }
  }));
}

async function submitEdit(event) {
  event.preventDefault();
  try {
    const out = await api("POST", "/edits", { subject: $("#edit-subject").value, relation: $("#edit-relation").value, object: $("#edit-object").value });
    $("#notice").textContent = `edit ${out.id} ${out.status}`;
    event.target.reset();
  } catch (error) { showError($("#notice"), error); }
  await refresh();
}

async function refresh() {
  try {
    const ready = await fetch("/ready").then((r) => r.json());
    $("#status").textContent = ready.ready ? "ready" : `not ready: ${JSON.stringify(ready.checks)}`;
    await Promise.all([loadVersions(), loadEdits()]);
    document.body.dataset.loaded = "true";
  } catch (error) { showError($("#status"), error); }
}

$("#compare").addEventListener("submit", compare);
$("#new-edit").addEventListener("submit", submitEdit);
$("#refresh").addEventListener("click", refresh);
refresh();
// Edits move from queued to applied on their own: poll while any is pending.
setInterval(() => { if (document.querySelector(".status-queued, .status-applying")) refresh(); }, 2000);
