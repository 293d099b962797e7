// The gateway's upload page: no framework, no build step. Served by Envoy (services/edge/envoy.py).
"use strict";

const TOKEN_KEY = "gridstor.token";
const STATUS_WAIT = 30; // seconds one long poll of a job waits
const $ = (id) => document.getElementById(id);

function mode() {
  return document.body.dataset.mode || "public";
}

function token() {
  return $("token").value.trim();
}

function authHeaders() {
  return mode() === "public" || !token() ? {} : { authorization: "Bearer " + token() };
}

// An error reply of the REST API is JSON {code, message, details}; anything else is shown as text.
function errorText(status, text) {
  try {
    const body = JSON.parse(text);
    if (body && body.message) return `${status}: ${body.message}`;
  } catch (e) { /* not JSON */ }
  return `${status}: ${text || "no answer"}`;
}

async function getToken() {
  const out = $("auth-status");
  out.textContent = "asking for a token...";
  const resp = await fetch("/v1/auth", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ secret: $("secret").value }),
  });
  const text = await resp.text();
  if (!resp.ok) {
    out.textContent = errorText(resp.status, text);
    out.className = "error";
    return;
  }
  const reply = JSON.parse(text);
  $("token").value = reply.token;
  sessionStorage.setItem(TOKEN_KEY, reply.token);
  out.className = "";
  out.textContent = "token valid until " + new Date(Number(reply.expires_at) * 1000).toLocaleString();
}

// POST the file's bytes as the request body (no form envelope), with progress.
function send(file, row) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    const query = new URLSearchParams({ name: file.name, declared_size: String(file.size) });
    xhr.open("POST", "/v1/files?" + query.toString());
    xhr.setRequestHeader("content-type", file.type || "application/octet-stream");
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) row.progress.value = e.loaded / e.total;
    };
    xhr.onload = () => {
      if (xhr.status === 200) resolve(JSON.parse(xhr.responseText));
      else reject(new Error(errorText(xhr.status, xhr.responseText)));
    };
    xhr.onerror = () => reject(new Error("the upload failed (network error)"));
    xhr.send(file);
  });
}

// Long-poll the job until it is stored (DONE) or failed.
async function waitStored(job) {
  for (;;) {
    const resp = await fetch(`/v1/jobs/${job}?wait=true&timeout_seconds=${STATUS_WAIT}`);
    const text = await resp.text();
    if (!resp.ok) throw new Error(errorText(resp.status, text));
    const status = JSON.parse(text);
    if (status.state === "JOB_STATE_DONE") return status;
    if (status.state === "JOB_STATE_ERROR") throw new Error(status.error);
  }
}

function addRow(file) {
  const li = document.createElement("li");
  const name = document.createElement("div");
  name.textContent = `${file.name} (${file.size} bytes)`;
  const progress = document.createElement("progress");
  progress.max = 1;
  progress.value = 0;
  const state = document.createElement("div");
  state.className = "state";
  li.append(name, progress, state);
  $("uploads").append(li);
  return { li, progress, state };
}

function showStored(row, status, note) {
  row.progress.value = 1;
  row.state.textContent = "";
  const link = document.createElement("a");
  link.href = "/v1/files/" + status.file_id;
  link.textContent = status.file_id;
  link.className = "file-link";
  row.state.append("stored: ", link, status.deduplicated ? " (already stored before)" : "");
  if (note) {
    const p = document.createElement("div");
    p.className = "note";
    p.textContent = note;
    row.state.append(p);
  }
}

async function upload(file) {
  const row = addRow(file);
  try {
    row.state.textContent = "uploading...";
    const reply = await send(file, row);
    row.state.textContent = "storing...";
    showStored(row, await waitStored(reply.job), reply.note);
  } catch (e) {
    row.state.textContent = e.message;
    row.state.className = "state error";
  }
}

async function uploadAll(files) {
  for (const file of files) await upload(file);
}

function setUp() {
  if (mode() !== "public") {
    $("auth").hidden = false;
    $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
    $("token").addEventListener("change", () => sessionStorage.setItem(TOKEN_KEY, token()));
    if (mode() === "secret") {
      $("secret-login").hidden = false;
      $("get-token").addEventListener("click", () => getToken().catch((e) => { $("auth-status").textContent = e.message; }));
    }
  }
  const drop = $("drop");
  $("file").addEventListener("change", (e) => uploadAll(Array.from(e.target.files)));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    uploadAll(Array.from(e.dataTransfer.files));
  });
}

setUp();
