// dpagg ComfyUI frontend extension: shows each dpagg node's public status (the privacy plan and the
// image set's budget: spent / total, remaining) under its widgets after it runs, and turns the node
// red when the next release would exceed the budget or a release was refused for budget.
//
// The data comes from the node's UI output (`ui.dpagg[0]` = {title, lines, warning, ...}), which
// holds public values only; nothing is added to the workflow JSON (the status is not a widget).

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const DPAGG_NODES = new Set([
  "DpaggLoadPrivateImages",
  "DpaggPerImageTI",
  "DpaggClipEmbeddings",
  "DpaggPrivacyAccountant",
  "DpaggPublicBasis",
  "DpaggAggregate",
]);
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

app.registerExtension({
  name: "dpagg.privacyStatus",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!DPAGG_NODES.has(nodeData.name)) return;

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
