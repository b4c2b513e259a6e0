// dpagg ComfyUI frontend extension: shows each dpagg node's public status (the privacy plan and the
// image set's budget: spent / total, remaining) under its widgets after it runs, and turns the node
// red when the next release would exceed the budget or a release was refused for budget.
//
// The data comes from the node's UI output (`ui.dpagg[0]` = {title, lines, warning, ...}), which
// holds public values only; nothing is added to the workflow JSON (the status is not a widget).
//
// One budget figure on screen (nodes/budget_status.py): a node's budget lines (`budget_lines`, the
// tail of `lines`) come with the public query that made them (`budget_query`; the Privacy Ledger's
// `ledger_query`). When the server announces a ledger change (websocket event "dpagg.ledger",
// after every release or raised budget) and when a queued prompt ends (a cached node re-sends its
// old message), every such node asks the read-only route /dpagg/ledger/status for fresh lines.
//
// The status area sits below the widgets; the node is sized to it, growing and shrinking back
// (dpaggFitSize), so the text is never clipped. The Privacy Accountant hides its `n` widget while
// an embedding set is connected (n then comes from the set and its status says so).
//
// The Privacy Ledger node gets a "Raise budget..." button: a dialog where the person at the machine
// types the dataset id, epsilon, delta and the confirmation 'raise <dataset> to <epsilon>', POSTed
// as JSON to the pack's route on ComfyUI's own server (/api/dpagg/ledger/budget, behind ComfyUI's
// middleware). Raising is never part of the graph: nothing of the dialog is a widget, so nothing
// of it is saved in a workflow or an image's metadata (DESIGN.md invariant 10).

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const DPAGG_NODES = new Set([
  "DpaggLoadPrivateImages",
  "DpaggPerImageTI",
  "DpaggClipEmbeddings",
  "DpaggPrivacyAccountant",
  "DpaggPublicBasis",
  "DpaggAggregate",
  "DpaggPrivacyLedger",
  "DpaggLoadPublicImages",
  "DpaggPublicStyle",
  "DpaggRehearse",
]);
const LEDGER_NODE = "DpaggPrivacyLedger";
const RAISE_ROUTE = "/dpagg/ledger/budget"; // api.fetchApi adds ComfyUI's /api prefix
const STATUS_ROUTE = "/dpagg/ledger/status"; // read-only: fresh budget lines for the page
const LEDGER_EVENT = "dpagg.ledger"; // sent by the server after a ledger change
const ACCOUNTANT_NODE = "DpaggPrivacyAccountant";
const RAISE_BUTTON = "Raise budget...";
const LINE_HEIGHT = 15;
const PAD = 6;
const WARN = { color: "#7a2a2a", bgcolor: "#5a1f1f" };

// Break a word wider than the line (a path, a dataset id) into pieces that fit.
function pieces(ctx, word, width) {
  const out = [];
  let piece = "";
  for (const ch of word) {
    if (piece && ctx.measureText(piece + ch).width > width) {
      out.push(piece);
      piece = ch;
    } else {
      piece += ch;
    }
  }
  out.push(piece);
  return out;
}

function wrap(ctx, text, width) {
  const out = [];
  for (const para of String(text).split("\n")) {
    let line = "";
    const words = para
      .split(" ")
      .flatMap((w) => (ctx.measureText(w).width > width ? pieces(ctx, w, width) : [w]));
    for (const word of words) {
      const next = line ? `${line} ${word}` : word;
      if (line && ctx.measureText(next).width > width) {
        out.push(line);
        line = word;
      } else {
        line = next;
      }
    }
    out.push(line);
  }
  return out;
}

function setWarning(node, on) {
  if (on && !node.dpaggSavedColors) {
    node.dpaggSavedColors = { color: node.color, bgcolor: node.bgcolor };
    node.color = WARN.color;
    node.bgcolor = WARN.bgcolor;
  } else if (!on && node.dpaggSavedColors) {
    node.color = node.dpaggSavedColors.color;
    node.bgcolor = node.dpaggSavedColors.bgcolor;
    node.dpaggSavedColors = null;
  }
}

function showStatus(node, status) {
  node.dpaggStatus = status;
  setWarning(node, !!status.warning);
  node.dpaggWrapped = null; // re-wrap on next draw
  dpaggFitSize(node);
  node.setDirtyCanvas(true, true);
}

let measureCtx = null;
function statusFont(ctx) {
  ctx.font = "12px monospace";
  return ctx;
}

// The status lines wrapped to the node's width (cached until the width or the status changes).
function wrappedLines(node, ctx) {
  const status = node.dpaggStatus;
  if (!status) return [];
  const width = node.size[0] - 2 * PAD;
  if (!node.dpaggWrapped || node.dpaggWrappedWidth !== width) {
    if (!ctx) {
      measureCtx ??= document.createElement("canvas").getContext("2d");
      ctx = measureCtx;
    }
    ctx.save();
    statusFont(ctx);
    node.dpaggWrapped = (status.lines || []).flatMap((l) => wrap(ctx, l, width));
    ctx.restore();
    node.dpaggWrappedWidth = width;
  }
  return node.dpaggWrapped;
}

const PROGRESS_TEXT = "$$node-text-preview"; // ComfyUI's progress text (a DOM widget)
const PROGRESS_TEXT_MAX = 64;

// Keep the frontend's growable widgets (the progress text) from taking the status area: without a
// maximum they get all the free height of the node, i.e. the room made for the status.
function capGrowableWidgets(node) {
  for (const w of node.widgets || []) {
    if (w.name === PROGRESS_TEXT && w.options && !w.options.getMaxHeight) {
      w.options.getMaxHeight = () => PROGRESS_TEXT_MAX;
    }
  }
}

// The bottom of the widgets as laid out (node coordinates), at least the computed minimum size.
function widgetsBottom(node) {
  let bottom = node.computeSize()[1];
  for (const w of node.widgets || []) {
    if (w.hidden || typeof w.y !== "number") continue;
    bottom = Math.max(bottom, w.y + (w.computedHeight ?? 0));
  }
  return bottom;
}

// Where the status text goes: below the widgets (node coordinates), and the height it needs.
function statusBox(node) {
  capGrowableWidgets(node);
  const lines = wrappedLines(node);
  const top = widgetsBottom(node);
  const height = lines.length ? lines.length * LINE_HEIGHT + 2 * PAD : 0;
  return { top, height, lines: lines.length };
}

// Size the node to its widgets plus its status: grow so nothing is clipped, shrink back when the
// status gets shorter (or goes away). The width is the user's: lines wrap to it.
function dpaggFitSize(node) {
  if (node.flags?.collapsed) return;
  const { top, height } = statusBox(node);
  const want = Math.max(top + height, node.computeSize()[1]);
  if (Math.abs(node.size[1] - want) > 0.5) node.setSize([node.size[0], want]);
}

function drawStatus(node, ctx) {
  const status = node.dpaggStatus;
  if (!status || node.flags?.collapsed) return;
  ctx.save();
  statusFont(ctx);
  const lines = wrappedLines(node, ctx);
  const { top } = statusBox(node);
  dpaggFitSize(node);
  ctx.fillStyle = status.warning ? "#ffb3b3" : "#b8d4ff";
  lines.forEach((line, i) => {
    ctx.fillText(line, PAD, top + PAD + (i + 1) * LINE_HEIGHT - 3);
  });
  ctx.restore();
}

// ------------------------------------------------------- one budget figure: refresh from the ledger

function dpaggNodes() {
  return (app.graph?._nodes || app.graph?.nodes || []).filter((n) => DPAGG_NODES.has(n.type));
}

// Replace the budget part of a node's status with the route's fresh lines.
function applyBudget(node, result) {
  const status = node.dpaggStatus;
  if (!status || result?.error) return;
  if (status.ledger_query) {
    showStatus(node, { ...status, lines: result.lines, datasets: result.datasets });
    return;
  }
  const old = status.budget_lines || [];
  const own = (status.lines || []).slice(0, (status.lines || []).length - old.length);
  const figures = result.figures || {};
  showStatus(node, {
    ...status,
    ...figures,
    lines: [...own, ...result.lines],
    budget_lines: result.lines,
    warning: !!status.own_warning || !!result.warning,
  });
}

let refreshTimer = null;
let refreshing = Promise.resolve();
// Ask the status route for every node's budget (debounced: events come in bursts).
function refreshBudgets(delay = 150) {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => {
    refreshing = refreshing.then(refreshNow, refreshNow);
  }, delay);
}

async function refreshNow() {
  const nodes = dpaggNodes().filter(
    (n) => n.dpaggStatus?.budget_query || n.dpaggStatus?.ledger_query,
  );
  if (!nodes.length) return;
  const asked = nodes.map((n) => n.dpaggStatus); // a status replaced meanwhile is left alone
  const queries = asked.map((s) => s.budget_query || s.ledger_query);
  try {
    const resp = await api.fetchApi(STATUS_ROUTE, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ queries }),
    });
    if (!resp.ok) return;
    const { results } = await resp.json();
    nodes.forEach((node, i) => {
      if (node.dpaggStatus === asked[i]) applyBudget(node, results?.[i]);
    });
    app.graph?.setDirtyCanvas?.(true, true);
  } catch (err) {
    console.warn("[dpagg] budget refresh failed", err);
  }
}

// ------------------------------------------------ Privacy Accountant: n comes from the set when linked

function syncAccountantN(node) {
  const widget = node.widgets?.find((w) => w.name === "n");
  if (!widget) return;
  const input = node.inputs?.find((i) => i.name === "embedding_set");
  const linked = input?.link != null;
  if (!!widget.hidden === linked) return;
  widget.hidden = linked; // n comes from the connected set: the status says "n = <set's n>"
  // The frontend still lays hidden widgets out; give it no height so no gap is left.
  if (linked) {
    widget.dpaggComputeSize = widget.computeSize;
    widget.computeSize = () => [0, -4];
  } else {
    if (widget.dpaggComputeSize) widget.computeSize = widget.dpaggComputeSize;
    else delete widget.computeSize;
  }
  node.dpaggWrapped = null;
  dpaggFitSize(node);
  node.setDirtyCanvas?.(true, true);
}

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "style") Object.assign(node.style, v);
    else node[k] = v;
  }
  for (const child of children) node.append(child);
  return node;
}

// The dataset to offer: the node's own dataset filter, else the only set it last showed.
function defaultDataset(node) {
  const typed = node.widgets?.find((w) => w.name === "dataset")?.value;
  if (typed && String(typed).trim()) return String(typed).trim();
  const sets = node.dpaggStatus?.datasets || [];
  return sets.length === 1 ? sets[0].dataset : "";
}

// The "Raise budget..." dialog (plain DOM: works with any ComfyUI frontend). Every value is typed
// here by the user; the server checks the confirmation against the dataset and epsilon sent.
function openRaiseDialog(node) {
  const field = { style: { width: "100%", boxSizing: "border-box", margin: "2px 0 8px" } };
  const dataset = el("input", { ...field, type: "text", value: defaultDataset(node) });
  dataset.placeholder = "ds-...";
  const epsilon = el("input", { ...field, type: "number", min: "0", step: "0.1" });
  const delta = el("input", { ...field, type: "number", min: "0", step: "any" });
  delta.placeholder = "0 or empty: keep the recorded delta";
  const confirm = el("input", { ...field, type: "text", autocomplete: "off" });
  const wanted = el("code");
  const message = el("div", { style: { color: "#ffb3b3", whiteSpace: "pre-wrap", minHeight: "1em" } });
  const cancel = el("button", { type: "button", textContent: "Cancel" });
  const submit = el("button", { type: "button", textContent: "Raise budget" });
  const label = (text) => el("div", { textContent: text, style: { fontSize: "12px" } });
  const dialog = el(
    "dialog",
    {
      style: {
        width: "32em",
        color: "var(--fg-color, #ddd)",
        background: "var(--comfy-menu-bg, #222)",
        border: "1px solid #666",
        borderRadius: "6px",
        padding: "14px",
      },
    },
    [
      el("h3", { textContent: "Raise a privacy budget", style: { marginTop: "0" } }),
      el("p", {
        textContent:
          "Sets the budget of one image set in the dpagg ledger. A raised budget lets more " +
          "releases spend privacy of these images; what is spent cannot be taken back.",
        style: { fontSize: "12px" },
      }),
      label("dataset id (as the Privacy Ledger node shows it)"),
      dataset,
      label("new budget epsilon"),
      epsilon,
      label("new budget delta (optional)"),
      delta,
      el("div", { style: { fontSize: "12px" } }, ["type to confirm: ", wanted]),
      confirm,
      message,
      el("div", { style: { display: "flex", gap: "8px", justifyContent: "flex-end" } }, [
        cancel,
        submit,
      ]),
    ],
  );
  const update = () => {
    wanted.textContent = `raise ${dataset.value.trim() || "<dataset>"} to ${epsilon.value || "<epsilon>"}`;
  };
  dataset.addEventListener("input", update);
  epsilon.addEventListener("input", update);
  update();
  // keys typed here are not canvas shortcuts (queue, delete node, ...)
  dialog.addEventListener("keydown", (e) => e.stopPropagation());
  dialog.addEventListener("close", () => dialog.remove());
  cancel.addEventListener("click", () => dialog.close());
  submit.addEventListener("click", async () => {
    message.textContent = "";
    submit.disabled = true;
    try {
      const body = {
        dataset: dataset.value.trim(),
        epsilon: epsilon.value === "" ? null : Number(epsilon.value),
        delta: delta.value === "" ? 0 : Number(delta.value),
        confirm: confirm.value,
      };
      const resp = await api.fetchApi(RAISE_ROUTE, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      let reply = {};
      try {
        reply = await resp.json();
      } catch {
        reply = { error: `HTTP ${resp.status}` };
      }
      if (!resp.ok || !reply.ok) {
        message.textContent = reply.error || `HTTP ${resp.status}`;
        return;
      }
      showStatus(node, { title: "Privacy Ledger", lines: reply.lines, datasets: reply.datasets });
      dialog.close();
    } catch (err) {
      message.textContent = String(err);
    } finally {
      submit.disabled = false;
    }
  });
  document.body.append(dialog);
  dialog.showModal();
  (dataset.value ? epsilon : dataset).focus();
}

app.registerExtension({
  name: "dpagg.privacyStatus",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!DPAGG_NODES.has(nodeData.name)) return;

    if (nodeData.name === ACCOUNTANT_NODE) {
      const onConnectionsChange = nodeType.prototype.onConnectionsChange;
      nodeType.prototype.onConnectionsChange = function () {
        const r = onConnectionsChange?.apply(this, arguments);
        syncAccountantN(this);
        return r;
      };
      const onConfigure = nodeType.prototype.onConfigure;
      nodeType.prototype.onConfigure = function () {
        const r = onConfigure?.apply(this, arguments);
        syncAccountantN(this); // a loaded workflow or template with the set already linked
        return r;
      };
    }

    if (nodeData.name === LEDGER_NODE) {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const r = onNodeCreated?.apply(this, arguments);
        const button = this.addWidget("button", RAISE_BUTTON, null, () => openRaiseDialog(this), {
          serialize: false,
        });
        button.serialize = false; // not in widgets_values (saved workflows, PNG metadata)
        button.options = { ...(button.options || {}), serialize: false }; // nor in the prompt
        return r;
      };
    }

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const status = message?.dpagg?.[0];
      if (status) {
        showStatus(this, status);
        // A node ComfyUI served from its cache re-sends its old message: re-read the ledger.
        if (status.budget_query || status.ledger_query) refreshBudgets(400);
      }
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      drawStatus(this, ctx);
    };
  },

  setup() {
    // One budget figure: after any release (this page's or another's) and when a prompt ends.
    api.addEventListener(LEDGER_EVENT, () => refreshBudgets());
    api.addEventListener("execution_success", () => refreshBudgets());
    api.addEventListener("execution_interrupted", () => refreshBudgets());
    api.addEventListener("execution_error", () => refreshBudgets());

    // A refused release raises BudgetExceeded on DP Aggregate: show it on the node (nothing spent).
    api.addEventListener("execution_error", ({ detail }) => {
      if (!DPAGG_NODES.has(detail?.node_type)) return;
      const node = app.graph?.getNodeById?.(Number(detail.node_id));
      if (!node) return;
      const budget = String(detail.exception_type || "").endsWith("BudgetExceeded");
      showStatus(node, {
        title: "error",
        warning: true,
        lines: [
          budget ? "REFUSED: over the privacy budget, nothing was spent" : "error:",
          String(detail.exception_message || "").slice(0, 2000),
        ],
      });
    });
  },
});
