// dpagg ComfyUI frontend extension: shows each dpagg node's public status (the privacy plan and the
// image set's budget: spent / total, remaining) under its widgets after it runs, and turns the node
// red when the next release would exceed the budget or a release was refused for budget.
//
// The data comes from the node's UI output (`ui.dpagg[0]` = {title, lines, warning, ...}), which
// holds public values only; nothing is added to the workflow JSON (the status is not a widget).
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
]);
const LEDGER_NODE = "DpaggPrivacyLedger";
const RAISE_ROUTE = "/dpagg/ledger/budget"; // api.fetchApi adds ComfyUI's /api prefix
const RAISE_BUTTON = "Raise budget...";
const LINE_HEIGHT = 15;
const PAD = 6;
const WARN = { color: "#7a2a2a", bgcolor: "#5a1f1f" };

function wrap(ctx, text, width) {
  const out = [];
  for (const para of String(text).split("\n")) {
    let line = "";
    for (const word of para.split(" ")) {
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
  node.setDirtyCanvas(true, true);
}

function drawStatus(node, ctx) {
  const status = node.dpaggStatus;
  if (!status || node.flags?.collapsed) return;
  ctx.save();
  ctx.font = "12px monospace";
  const width = node.size[0] - 2 * PAD;
  if (!node.dpaggWrapped || node.dpaggWrappedWidth !== width) {
    node.dpaggWrapped = (status.lines || []).flatMap((l) => wrap(ctx, l, width));
    node.dpaggWrappedWidth = width;
  }
  const lines = node.dpaggWrapped;
  const top = node.computeSize()[1];
  const needed = top + lines.length * LINE_HEIGHT + 2 * PAD;
  if (node.size[1] < needed) node.setSize([node.size[0], needed]);
  ctx.fillStyle = status.warning ? "#ffb3b3" : "#b8d4ff";
  lines.forEach((line, i) => {
    ctx.fillText(line, PAD, top + PAD + (i + 1) * LINE_HEIGHT - 3);
  });
  ctx.restore();
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
      if (status) showStatus(this, status);
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      drawStatus(this, ctx);
    };
  },

  setup() {
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
          String(detail.exception_message || "").slice(0, 600),
        ],
      });
    });
  },
});
