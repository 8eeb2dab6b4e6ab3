// vlwatch web page: live overview (SSE), retry buttons, ask and compare.
// Plain JS, no build step, no dependencies.  Loaded with `defer` under a CSP of
// script-src 'self': no inline script, no eval.  Model text and file names are
// only ever put into the page as textContent; the one exception is the
// server's Markdown rendering (raw HTML escaped there) of a finished answer.
"use strict";

(function () {
  const $ = (sel, root) => (root || document).querySelector(sel);
  const $$ = (sel, root) => Array.from((root || document).querySelectorAll(sel));

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") node.textContent = v;
      else if (k === "cls") node.className = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function svgEl(tag, attrs) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  async function postJSON(url, body) {
    const r = await fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify(body || {}),
    });
    const data = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error((data.error && data.error.message) || ("HTTP " + r.status));
    return data;
  }

  async function getJSON(url) {
    const r = await fetch(url, {credentials: "same-origin"});
    const data = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error((data.error && data.error.message) || ("HTTP " + r.status));
    return data;
  }

  const fileURL = (path, w) => "/web/thumb?path=" + encodeURIComponent(path) + "&w=" + (w || 320);

  // ------------------------------------------------------------ live events

  const live = $("#live");
  let refreshTimer = null;
  const listeners = [];

  function startEvents() {
    if (!window.EventSource) return;
    const source = new EventSource("/api/v1/events");
    source.onopen = () => { live.textContent = "live"; live.className = "live on"; };
    source.onerror = () => { live.textContent = "reconnecting"; live.className = "live off"; };
    source.onmessage = (ev) => {
      let data = null;
      try { data = JSON.parse(ev.data); } catch (e) { return; }
      for (const fn of listeners) fn(data);
    };
    window.addEventListener("pagehide", () => source.close());
  }

  // ------------------------------------------------------------ overview

  function field(obj, path) {
    return path.split(".").reduce((o, k) => (o == null ? undefined : o[k]), obj);
  }

  function renderOverview(o) {
    for (const node of $$("[data-field]")) {
      const name = node.dataset.field;
      let value;
      if (name === "eta") value = o.eta_s ? "about " + (o.eta_s / 60).toFixed(1) + " min left" : "nothing waiting";
      else if (name === "daemon_text") value = o.daemon && o.daemon.pid ? "pid " + o.daemon.pid + " since " + o.daemon.since : "not running";
      else if (name === "model.state") value = (o.model.loaded ? "loaded" : "not loaded") + (o.model.since ? " since " + o.model.since : "");
      else if (name === "model.engine") value = o.model.engine || "—";
      else if (name === "model.device") value = o.model.device + (o.model.dtype ? " (" + o.model.dtype + ")" : "");
      else value = field(o, name);
      if (value !== undefined && value !== null) node.textContent = String(value);
    }
    const progress = $("#progress");
    if (progress) progress.value = o.progress.percent;
    const down = $("#backend-down");
    if (down) down.hidden = !(o.backend && o.backend.available === false);

    const gpus = $("#gpus");
    if (gpus) {
      gpus.hidden = !o.model.gpus.length;
      $("tbody", gpus).replaceChildren(...o.model.gpus.map(
        (g) => el("tr", {}, el("td", {text: g.name}), el("td", {text: g.state}), el("td", {text: g.detail || ""}))));
    }
    const extra = $("#model-extra");
    if (extra) {
      extra.replaceChildren(...Object.entries(o.model.extra).flatMap(([k, v]) => [el("dt", {text: k}), el("dd", {text: v})]));
    }
    const latest = $("#latest");
    if (latest) {
      latest.replaceChildren(...(o.latest.length ? o.latest.map((r) => el("li", {},
        el("a", {href: "/results#job-" + r.id, text: r.name}), " ", el("span", {cls: "tag", text: r.rule}), " ",
        el("time", {text: r.when}))) : [el("li", {cls: "muted", text: "nothing processed yet"})]));
    }
    const failures = $("#failures");
    if (failures) {
      failures.replaceChildren(...(o.failures.length ? o.failures.map((f) => el("li", {"data-job": f.id},
        el("strong", {text: f.name}), " ", el("span", {cls: "tag", text: f.rule}), " ", el("time", {text: f.when}), " ",
        el("span", {cls: "error", text: f.error}), " ",
        el("button", {type: "button", cls: "retry", "data-retry": f.id, text: "Retry"}))) :
        [el("li", {cls: "muted", text: "no failures"})]));
    }
  }

  function scheduleRefresh() {
    if (refreshTimer) return;
    refreshTimer = setTimeout(async () => {
      refreshTimer = null;
      try { renderOverview(await getJSON("/web/overview.json")); } catch (e) { /* next event retries */ }
    }, 300);
  }

  // ------------------------------------------------------------ retry

  document.addEventListener("click", async (ev) => {
    const button = ev.target.closest("button[data-retry], button[data-retry-all]");
    if (!button) return;
    button.disabled = true;
    const all = button.hasAttribute("data-retry-all");
    try {
      const body = all ? {all: true} : {ids: [parseInt(button.dataset.retry, 10)]};
      const result = await postJSON("/web/retry", body);
      const ids = new Set(result.requeued);
      for (const row of $$("[data-job]")) {
        if (ids.has(parseInt(row.dataset.job, 10))) {
          const b = $("button[data-retry]", row);
          if (b) b.replaceWith(el("span", {cls: "done-note", text: "requeued"}));
        }
      }
      if (all) button.replaceWith(el("span", {cls: "done-note", text: result.requeued.length + " requeued"}));
      else if (!ids.size) button.replaceWith(el("span", {cls: "muted", text: "not failed any more"}));
    } catch (e) {
      button.disabled = false;
      button.title = e.message;
    }
  });

  // ------------------------------------------------------------ ask

  function initAsk() {
    const root = $("#ask");
    const model = root.dataset.model;
    const state = {conv: null, history: [], tray: [], dataURLs: new Map(), busy: false};
    const messagesBox = $("#messages");
    const trayBox = $("#tray");
    const errorBox = $("#ask-error");

    function showError(text) { errorBox.textContent = text; errorBox.hidden = !text; }

    function imageSrc(url) {
      return url.startsWith("file://") ? fileURL(decodeURIComponent(url.slice(7)), 320) : url;
    }

    function renderTray() {
      trayBox.replaceChildren(...state.tray.map((item, i) => {
        const remove = el("button", {type: "button", title: "remove", text: "×"});
        remove.addEventListener("click", () => { state.tray.splice(i, 1); renderTray(); });
        return el("figure", {}, el("img", {src: imageSrc(item.url), alt: item.name}), remove);
      }));
    }

    function addFile(path) {
      if (state.tray.some((t) => t.path === path)) return;
      state.tray.push({url: "file://" + path.split("/").map(encodeURIComponent).join("/"), path: path, name: path.split("/").pop()});
      renderTray();
    }

    async function ensureConversation() {
      if (state.conv) return state.conv;
      const made = await postJSON("/web/conversations", {});
      state.conv = made.id;
      history.replaceState(null, "", "#c=" + made.id);
      return made.id;
    }

    function readAsDataURL(blob) {
      return new Promise((resolve, reject) => {
        const reader = new FileReader();
        reader.onload = () => resolve(reader.result);
        reader.onerror = () => reject(reader.error);
        reader.readAsDataURL(blob);
      });
    }

    async function upload(files) {
      showError("");
      for (const file of files) {
        if (!file.type.startsWith("image/")) { showError(file.name + " is not an image"); continue; }
        try {
          const cid = await ensureConversation();
          const r = await fetch("/web/conversations/" + cid + "/images", {
            method: "POST", credentials: "same-origin", body: file,
            headers: {"Content-Type": file.type, "X-Filename": encodeURIComponent(file.name)},
          });
          const data = await r.json();
          if (!r.ok) throw new Error(data.error ? data.error.message : "HTTP " + r.status);
          state.dataURLs.set(data.url, await readAsDataURL(file));
          state.tray.push({url: data.url, name: file.name});
          renderTray();
        } catch (e) { showError(file.name + ": " + e.message); }
      }
    }

    // The chat API takes data: URLs and file:// paths; an upload is sent as a data: URL.
    async function apiURL(url) {
      if (url.startsWith("file://")) return url;
      if (!state.dataURLs.has(url)) {
        const r = await fetch(url, {credentials: "same-origin"});
        state.dataURLs.set(url, await readAsDataURL(await r.blob()));
      }
      return state.dataURLs.get(url);
    }

    async function apiMessages(messages) {
      const out = [];
      for (const m of messages) {
        if (typeof m.content === "string") { out.push({role: m.role, content: m.content}); continue; }
        const parts = [];
        for (const p of m.content) {
          if (p.type === "text") parts.push(p);
          else parts.push({type: "image_url", image_url: {url: await apiURL(p.image_url.url)}});
        }
        out.push({role: m.role, content: parts});
      }
      return out;
    }

    function userBubble(content, when) {
      const text = typeof content === "string" ? content : content.filter((p) => p.type === "text").map((p) => p.text).join("\n");
      const imgs = typeof content === "string" ? [] : content.filter((p) => p.type === "image_url").map(
        (p) => el("img", {src: imageSrc(p.image_url.url), alt: "image"}));
      return el("div", {cls: "msg user"}, imgs.length ? el("div", {cls: "imgs"}, ...imgs) : null,
        el("div", {cls: "text", text: text}), when ? el("time", {text: when}) : null);
    }

    function drawBoxes(holder, rendered) {
      if (!rendered.boxes || !rendered.boxes.length || !rendered.image || !rendered.size) return;
      const [w, h] = rendered.size;
      const svg = svgEl("svg", {viewBox: "0 0 " + w + " " + h, preserveAspectRatio: "none", "class": "boxes-svg"});
      rendered.boxes.forEach((b, i) => {
        const [x1, y1, x2, y2] = b.bbox;
        const rect = svgEl("rect", {x: x1, y: y1, width: x2 - x1, height: y2 - y1, "class": "c" + (i % 8),
          "vector-effect": "non-scaling-stroke"});
        const title = svgEl("title", {});
        title.textContent = b.label;
        rect.append(title);
        svg.append(rect);
      });
      const fig = el("figure", {cls: "answer-figure"}, el("img", {src: imageSrc(rendered.image), alt: "image with boxes"}));
      fig.append(svg);
      const list = el("ol", {cls: "boxes"}, ...rendered.boxes.map((b, i) => el("li", {},
        el("span", {cls: "swatch c" + (i % 8)}), b.label + " (" + b.bbox.join(", ") + ")")));
      holder.append(fig, list);
    }

    function assistantBubble(text, rendered, when) {
      const body = el("div", {cls: "markdown"});
      if (rendered && rendered.html) body.innerHTML = rendered.html;  // server-rendered Markdown, raw HTML escaped
      else { body.className = "text"; body.textContent = text; }
      const bubble = el("div", {cls: "msg assistant"}, body, when ? el("time", {text: when}) : null);
      if (rendered) drawBoxes(bubble, rendered);
      return bubble;
    }

    function renderConversation(conv) {
      messagesBox.replaceChildren(...conv.messages.map((m) => m.role === "user" ?
        userBubble(m.content, m.when) : assistantBubble(m.content, m, m.when)));
    }

    async function loadList() {
      const data = await getJSON("/web/conversations");
      const list = $("#conv-list");
      list.replaceChildren(...data.conversations.map((c) => {
        const li = el("li", {cls: c.id === state.conv ? "current" : "", "data-conv": c.id},
          el("span", {text: c.title}), el("time", {text: c.when}));
        li.addEventListener("click", () => openConversation(c.id));
        return li;
      }));
    }

    async function openConversation(cid) {
      showError("");
      try {
        const conv = await getJSON("/web/conversations/" + cid);
        state.conv = conv.id;
        state.history = conv.messages.map((m) => ({role: m.role, content: m.content}));
        history.replaceState(null, "", "#c=" + conv.id);
        renderConversation(conv);
        await loadList();
      } catch (e) { showError(e.message); }
    }

    async function streamAnswer(messages, target) {
      const r = await fetch("/v1/chat/completions", {
        method: "POST", credentials: "same-origin", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({model: model, messages: messages, stream: true}),
      });
      if (!r.ok || !r.body) {
        const data = await r.json().catch(() => ({}));
        throw new Error((data.error && data.error.message) || ("HTTP " + r.status));
      }
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "", text = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const payload = line.slice(5).trim();
            if (payload === "[DONE]") return text;
            let chunk;
            try { chunk = JSON.parse(payload); } catch (e) { continue; }
            if (chunk.error) throw new Error(chunk.error.message || "the model failed");
            const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
            if (delta && delta.content) { text += delta.content; target.textContent = text; }
          }
        }
      }
      return text;
    }

    async function send(question) {
      if (state.busy) return;
      if (!question && !state.tray.length) { showError("Write a question (images are optional)."); return; }
      showError("");
      state.busy = true;
      $("#send").disabled = true;
      try {
        const cid = await ensureConversation();
        const content = state.tray.length ?
          [...state.tray.map((t) => ({type: "image_url", image_url: {url: t.url}})), {type: "text", text: question}] :
          question;
        const user = {role: "user", content: content};
        messagesBox.append(userBubble(content));
        const answerText = el("div", {cls: "text", text: "…"});
        const bubble = el("div", {cls: "msg assistant streaming"}, answerText);
        messagesBox.append(bubble);
        state.tray = [];
        renderTray();
        $("#question").value = "";
        const answer = await streamAnswer(await apiMessages([...state.history, user]), answerText);
        const saved = await postJSON("/web/conversations/" + cid + "/messages",
          {messages: [user, {role: "assistant", content: answer}]});
        // The user may have opened another conversation meanwhile: this turn belongs to its own.
        if (state.conv === cid) {
          state.history.push(user, {role: "assistant", content: answer});
          bubble.replaceWith(assistantBubble(answer, saved.messages[1]));
        }
        await loadList();
      } catch (e) {
        showError(e.message);
        const streaming = $(".msg.streaming", messagesBox);
        if (streaming) {
          // Not a "…" left hanging (issue 27): the turn says it failed, and the question comes back to resend.
          streaming.classList.replace("streaming", "failed");
          $(".text", streaming).textContent = "failed: " + e.message;
          if (!$("#question").value) $("#question").value = question;
        }
      } finally {
        state.busy = false;
        $("#send").disabled = false;
      }
    }

    $("#ask-form").addEventListener("submit", (ev) => { ev.preventDefault(); send($("#question").value.trim()); });
    $("#question").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); send($("#question").value.trim()); }
    });
    $("#file").addEventListener("change", (ev) => { upload(Array.from(ev.target.files)); ev.target.value = ""; });
    const drop = $("#drop");
    drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (ev) => {
      ev.preventDefault();
      drop.classList.remove("over");
      upload(Array.from(ev.dataTransfer.files));
    });
    for (const b of $$("button.pick")) b.addEventListener("click", () => addFile(b.dataset.path));
    for (const b of $$("button.example")) b.addEventListener("click", () => { $("#question").value = b.dataset.prompt; $("#question").focus(); });
    $("#new-conv").addEventListener("click", () => {
      state.conv = null; state.history = []; state.tray = [];
      history.replaceState(null, "", "/ask");
      messagesBox.replaceChildren();
      renderTray();
      loadList();
    });
    const clear = $("#clear-convs");
    clear.addEventListener("click", async () => {
      // Two clicks, so one slip does not forget everything (no confirm(): it blocks the page).
      if (clear.dataset.armed !== "1") {
        clear.dataset.armed = "1";
        clear.textContent = "Click again to forget all";
        setTimeout(() => { clear.dataset.armed = ""; clear.textContent = "Clear all"; }, 4000);
        return;
      }
      try {
        await postJSON("/web/conversations/clear", {});
        state.conv = null; state.history = [];
        messagesBox.replaceChildren();
        history.replaceState(null, "", "/ask");
        clear.dataset.armed = ""; clear.textContent = "Clear all";
        await loadList();
      } catch (e) { showError(e.message); }
    });
    for (const b of $$("button.pick.preset")) addFile(b.dataset.path);
    const m = location.hash.match(/^#c=(\d+)$/);
    if (m) openConversation(parseInt(m[1], 10)); else loadList().catch((e) => showError(e.message));
  }

  // ------------------------------------------------------------ start

  const page = document.body.dataset.page;
  if (page === "overview") listeners.push(scheduleRefresh);
  startEvents();
  if (page === "ask") initAsk();
})();
