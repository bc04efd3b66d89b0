// The try-it page: pick an image, ask the server, show the answer.
// Plain browser JavaScript, no build step and nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  skill: "caption",
  imageUrl: null,      // the image as a data: URL, sent as image_url
  controller: null,    // AbortController of the request in flight
  chat: [],            // the chat tab's conversation so far, as OpenAI messages
};

// ------------------------------------------------------------------ image
function loadImageFile(file) {
  if (!file || !file.type.startsWith("image/")) {
    showError("That is not an image file.");
    return;
  }
  const reader = new FileReader();
  reader.onload = () => setImage(reader.result, `${file.name || "pasted image"}, ${Math.round(file.size / 1024)} KiB`);
  reader.readAsDataURL(file);
}

function setImage(dataUrl, info) {
  state.imageUrl = dataUrl;
  newChat();  // a conversation is about one image
  const img = $("preview");
  img.onload = () => {
    // The canvas gets the image's own pixel size; CSS stretches both alike,
    // so normalised coordinates map straight onto it.
    const canvas = $("overlay");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    clearOverlay();
    $("image-info").textContent = `${info} — ${img.naturalWidth}×${img.naturalHeight}`;
    $("image-stage").dataset.loaded = "true";
  };
  $("image-stage").dataset.loaded = "false";
  img.src = dataUrl;
  $("image-stage").hidden = false;
  $("drop-hint").hidden = true;
}

function setupImageInput() {
  const zone = $("drop-zone");
  $("image-input").addEventListener("change", (e) => loadImageFile(e.target.files[0]));
  zone.addEventListener("click", (e) => {
    if (e.target.tagName !== "LABEL" && e.target.tagName !== "INPUT") $("image-input").click();
  });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    loadImageFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...e.clipboardData.items].find((it) => it.type.startsWith("image/"));
    if (item) loadImageFile(item.getAsFile());
  });
}

// ------------------------------------------------------------------ overlay
function clearOverlay() {
  const canvas = $("overlay");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  canvas.dataset.boxes = "0";
  canvas.dataset.points = "0";
}

function drawBoxes(objects) {
  const canvas = $("overlay");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.lineWidth = Math.max(2, Math.round(Math.min(w, h) / 150));
  ctx.strokeStyle = "#ff2d55";
  ctx.fillStyle = "rgba(255, 45, 85, 0.12)";
  for (const o of objects) {
    const x = o.x_min * w, y = o.y_min * h;
    const bw = (o.x_max - o.x_min) * w, bh = (o.y_max - o.y_min) * h;
    ctx.fillRect(x, y, bw, bh);
    ctx.strokeRect(x, y, bw, bh);
  }
  canvas.dataset.boxes = String(objects.length);
}

function drawPoints(points) {
  const canvas = $("overlay");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  const r = Math.max(4, Math.round(Math.min(w, h) / 60));
  for (const p of points) {
    ctx.beginPath();
    ctx.arc(p.x * w, p.y * h, r, 0, 2 * Math.PI);
    ctx.fillStyle = "#ff2d55";
    ctx.fill();
    ctx.lineWidth = Math.max(2, r / 3);
    ctx.strokeStyle = "#ffffff";
    ctx.stroke();
  }
  canvas.dataset.points = String(points.length);
}

// ------------------------------------------------------------------ tabs
function selectSkill(skill) {
  state.skill = skill;
  for (const tab of document.querySelectorAll("#tabs button")) {
    tab.setAttribute("aria-selected", String(tab.dataset.skill === skill));
  }
  for (const panel of document.querySelectorAll(".panel")) {
    panel.hidden = panel.dataset.skill !== skill;
  }
}

// ------------------------------------------------------------------ requests
function readSettings() {
  const settings = {};
  for (const name of ["temperature", "top_p", "max_tokens", "max_objects"]) {
    const raw = $(`setting-${name}`).value.trim();
    if (raw !== "") settings[name] = Number(raw);
  }
  return Object.keys(settings).length ? settings : undefined;
}

// ------------------------------------------------------------------ chat
function newChat() {
  state.chat = [];
  $("chat-log").replaceChildren();
  $("chat-log").dataset.turns = "0";
}

function addChatMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("chat-log").append(div);
  div.scrollIntoView({ block: "nearest" });
  return div;
}

// A turn shows in the transcript only: the user's message, then the reply as it streams in.
function startChatTurn(request) {
  return { finish: null, reply: "", bubbles: [addChatMessage("user", request.userText), addChatMessage("assistant", "")] };
}

// The next user message: the image goes with the first one (Moondream sees one per conversation).
function buildChatRequest() {
  const text = $("chat-message").value.trim();
  if (!text) return { error: "Write a message first." };
  const content = state.chat.length === 0 && state.imageUrl
    ? [{ type: "image_url", image_url: { url: state.imageUrl } }, { type: "text", text }]
    : text;
  const s = readSettings() || {};
  const body = {
    messages: [...state.chat, { role: "user", content }],
    stream: true, stream_options: { include_usage: true },
    temperature: s.temperature, top_p: s.top_p, max_completion_tokens: s.max_tokens,
  };
  return { body, path: "/v1/chat/completions", userText: text };
}

// One chat.completion.chunk (or the usage chunk, or an error).
function onChatEvent(e, turn) {
  if (e.error) { showError(e.error.message); return false; }
  const choice = (e.choices || [])[0];
  if (choice && choice.delta.content) {
    turn.reply += choice.delta.content;
    turn.bubbles[1].textContent = turn.reply;
    turn.bubbles[1].scrollIntoView({ block: "nearest" });
    $("result").dataset.chunks = String(Number($("result").dataset.chunks) + 1);
  }
  if (choice && choice.delta.reasoning) showReasoning(choice.delta.reasoning);
  if (choice && choice.finish_reason) turn.finish = choice.finish_reason;
  if (e.usage) {
    $("metrics").textContent = `${e.usage.prompt_tokens} in / ${e.usage.completion_tokens} out tokens`
      + ` · finish: ${turn.finish} · ${e.model}`;
  }
  return true;
}

function finishChatTurn(request, turn) {
  state.chat.push(request.body.messages.at(-1), { role: "assistant", content: turn.reply });
  $("chat-log").dataset.turns = String(state.chat.length / 2);
  $("chat-message").value = "";
}

function buildRequest() {
  if (state.skill === "chat") return buildChatRequest();
  const body = { settings: readSettings() };
  switch (state.skill) {
    case "caption":
      Object.assign(body, { length: $("caption-length").value, stream: true });
      break;
    case "query":
      Object.assign(body, {
        question: $("query-question").value,
        reasoning: $("query-reasoning").checked,
        stream: true,
      });
      break;
    default:
      body.object = $(`${state.skill}-object`).value;
  }
  if ($("model").options.length > 1) body.model = $("model").value; // several models served: the one picked
  const variant = $("variant").value.trim();
  if (variant) body.variant = variant; // a fine-tuned variant; empty: the base model
  if (state.imageUrl) body.image_url = state.imageUrl;
  else if (state.skill !== "query") return { error: "Choose an image first." };
  return { body };
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["X-Moondream-Auth"] = key;
  return h;
}

// Reads a text/event-stream body and calls onEvent with each parsed data line.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        // "[DONE]" ends an OpenAI stream; every other event is JSON.
        if (line.startsWith("data: ") && line !== "data: [DONE]") onEvent(JSON.parse(line.slice(6)));
      }
    }
  }
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error.message}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function showMetrics(final) {
  const m = final.metrics;
  if (!m) return;
  const parts = [];
  if (m.input_tokens !== undefined) parts.push(`${m.input_tokens} in / ${m.output_tokens} out tokens`);
  if (m.ttft_ms !== undefined) parts.push(`first token ${Math.round(m.ttft_ms)} ms`);
  if (m.decode_time_ms !== undefined) parts.push(`decode ${Math.round(m.decode_time_ms)} ms`);
  if (final.finish_reason) parts.push(`finish: ${final.finish_reason}`);
  if (final.request_id) parts.push(`id ${final.request_id}`);
  $("metrics").textContent = parts.join(" · ");
}

function showReasoning(reasoning) {
  if (!reasoning) return;
  $("reasoning").textContent = typeof reasoning === "string" ? reasoning : (reasoning.text ?? JSON.stringify(reasoning, null, 2));
  $("reasoning-box").hidden = false;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("result").dataset.state = "error";
}

function resetResult() {
  $("error").hidden = true;
  $("output").textContent = "";
  $("result").dataset.chunks = "0";
  $("result").dataset.requestId = "";
  $("metrics").textContent = "";
  $("reasoning-box").hidden = true;
  $("reasoning").textContent = "";
  clearOverlay();
}

async function run(event) {
  event.preventDefault();
  if (state.controller) return;
  resetResult();
  const request = buildRequest();
  const { body, error } = request;
  if (error) { showError(error); return; }

  const skill = state.skill;
  state.controller = new AbortController();
  $("run").disabled = true;
  $("stop").disabled = false;
  $("result").dataset.state = "running";
  try {
    const response = await fetch(request.path || `/v1/${skill}`, {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
    });
    // Shown with the metrics and kept on #result: the id to quote in a bug report.
    $("result").dataset.requestId = response.headers.get("X-Request-ID") || "";
    if (!response.ok) { showError(await errorMessage(response)); return; }

    if (skill === "chat") {
      const turn = startChatTurn(request);
      let failed = false, finished = false;
      try {
        await readEvents(response, (e) => { failed = !onChatEvent(e, turn) || failed; });
        finished = !failed;
      } finally {
        if (!finished) turn.bubbles.forEach((b) => b.remove());  // an error or Stop: the turn did not happen
      }
      if (finished) { finishChatTurn(request, turn); $("result").dataset.state = "done"; }
      return;
    }
    if (response.headers.get("Content-Type").startsWith("text/event-stream")) {
      let failed = false;
      await readEvents(response, (e) => {
        if (e.error) { showError(e.error.message); failed = true; return; }
        if (e.chunk) {
          $("output").textContent += e.chunk;
          $("result").dataset.chunks = String(Number($("result").dataset.chunks) + 1);
        }
        if (e.completed) { showMetrics(e); showReasoning(e.reasoning); }
      });
      if (!failed) $("result").dataset.state = "done";
      return;
    }

    const result = await response.json();
    if (skill === "detect") {
      drawBoxes(result.objects);
      $("output").textContent = `${result.objects.length} object(s) found`;
    } else if (skill === "point") {
      drawPoints(result.points);
      $("output").textContent = `${result.points.length} point(s) found`;
    } else {
      $("output").textContent = result.caption ?? result.answer;
      showMetrics(result);
      showReasoning(result.reasoning);
    }
    $("result").dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") { $("result").dataset.state = "stopped"; }
    else showError(`Request failed: ${e.message}`);
  } finally {
    state.controller = null;
    $("run").disabled = false;
    $("stop").disabled = true;
  }
}

// ------------------------------------------------------------------ health
async function refreshHealth() {
  let ready = false;
  try {
    const response = await fetch("/health");
    const h = await response.json();
    ready = h.ready;
    $("health").dataset.status = h.status;
    $("health-status").textContent = h.status;
    const m = h.model || {};
    const where = [m.device, m.dtype].filter(Boolean).join(", ");
    $("health-model").textContent = `${m.name ?? "?"} @ ${m.revision ?? "?"}${where ? ` (${where})` : ""}`;
    $("test-model-banner").hidden = !m.test_model;
    $("api-key-field").dataset.required = String(Boolean(h.auth_required));
    showVariants((m.variants && m.variants.available) || []);
    showModels(h.models || []);
  } catch {
    $("health").dataset.status = "unavailable";
    $("health-status").textContent = "unreachable";
  }
  // Poll often while the model loads, rarely once it is up.
  setTimeout(refreshHealth, ready ? 30000 : 3000);
}

// The models served (MOONDREAM_MODELS): a picker, shown only when there is a choice.  The
// selection survives the health poll's refresh.
function showModels(models) {
  const select = $("model");
  const chosen = select.value;
  select.replaceChildren(...models.map((m) => Object.assign(document.createElement("option"),
    { value: m.id, textContent: m.ready ? m.id : `${m.id} (loading)` })));
  if (models.some((m) => m.id === chosen)) select.value = chosen;
  $("model-field").hidden = models.length < 2;
}

// The variants the server has files for, offered as suggestions in the variant field.
function showVariants(ids) {
  const list = $("variant-list");
  list.replaceChildren(...ids.map((id) => Object.assign(document.createElement("option"), { value: id })));
}

// ------------------------------------------------------------------ batch jobs
// The jobs of the Batch API, each with a progress bar and (once it has results) a
// download link.  The link fetches with the API key, so it is a click handler, not a plain href.
function batchRow(job) {
  const row = document.createElement("tr");
  row.dataset.jobId = job.id;
  row.dataset.status = job.status;
  const p = job.progress;
  const done = p.completed + p.failed;
  const cells = [job.id.slice(0, 12), job.status, "", (job.created_at || "").replace("T", " "), ""];
  for (const text of cells) {
    const cell = document.createElement("td");
    cell.textContent = text;
    row.appendChild(cell);
  }
  const bar = document.createElement("progress");
  bar.max = p.total || 1;
  bar.value = done;
  row.cells[2].append(bar, ` ${done}/${p.total}` + (p.failed ? ` (${p.failed} failed)` : ""));
  if (job.error) {  // the job failed as a whole (a file that is not JSONL, too many lines): say why
    const why = document.createElement("div");
    why.className = "batch-reason";
    why.textContent = `${job.error.code}: ${job.error.message}`;
    row.cells[1].append(why);
  }
  for (const output of job.outputs) {
    const link = document.createElement("a");
    link.href = output.url;
    link.textContent = job.outputs.length > 1 ? `part ${output.index + 1}` : "download";
    link.className = "batch-download";
    link.addEventListener("click", (event) => { event.preventDefault(); downloadResults(output.url, job.id, output.index); });
    row.cells[4].append(link, " ");
  }
  return row;
}

async function downloadResults(url, jobId, index) {
  const response = await fetch(url, { headers: headers() });
  if (!response.ok) return showBatchError(await errorMessage(response));
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = `${jobId}-${index}.jsonl`;
  link.click();
  URL.revokeObjectURL(link.href);
}

function showBatchError(message) {
  $("batch-error").hidden = !message;
  $("batch-error").textContent = message || "";
}

async function refreshBatchJobs() {
  let running = false;
  try {
    const response = await fetch("/v1/batch?limit=20", { headers: headers() });
    if (!response.ok) {
      showBatchError(response.status === 401 ? "Enter the API key to see batch jobs." : await errorMessage(response));
    } else {
      const jobs = (await response.json()).data;
      showBatchError("");
      $("batch-jobs").tBodies[0].replaceChildren(...jobs.map(batchRow));
      $("batch-empty").hidden = jobs.length > 0;
      running = jobs.some((job) => job.status === "processing" || job.status === "chunking");
    }
  } catch {
    showBatchError("The server is not answering.");
  }
  setTimeout(refreshBatchJobs, running ? 2000 : 10000);
}

// ------------------------------------------------------------------ start
setupImageInput();
for (const tab of document.querySelectorAll("#tabs button")) {
  tab.addEventListener("click", () => selectSkill(tab.dataset.skill));
}
$("ask-form").addEventListener("submit", run);
$("chat-new").addEventListener("click", newChat);
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("api-key").value = sessionStorage.getItem("moondream-api-key") || "";
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem("moondream-api-key", $("api-key").value);
  refreshBatchJobs();
});
refreshHealth();
refreshBatchJobs();
