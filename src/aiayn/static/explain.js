// The walk of `aiayn explain` as a page: kind / layer / head selectors, one heatmap per matrix,
// the value of a cell on hover. Used by the self-contained page of `aiayn explain --html` and by
// the server's web page. No dependencies, no network.
"use strict";

const EXPLAIN_STYLE = `
.explain .controls label { margin-right: 1em; }
.explain .step { margin: 1.2em 0; }
.explain .step h3 { font-size: 1em; margin: 0 0 .3em 0; }
.explain .step code { color: #555; font-size: .9em; }
.explain table.heat { border-collapse: collapse; font-size: 11px; }
.explain table.heat td, .explain table.heat th { padding: 1px 4px; text-align: right; white-space: nowrap; }
.explain table.heat th { font-weight: normal; color: #444; }
.explain table.heat td { min-width: 2.2em; color: transparent; }
.explain table.heat.values td { color: #000; }
.explain .note { color: #555; font-size: .9em; }`;

// data: `aiayn.explain.page_data`; a layer that is null is asked for with fetchLayer(kind, layer),
// which returns a page_data holding it (the server sends one layer at a time).
function renderExplanation(root, data, fetchLayer = null) {
  if (!document.getElementById("explain-style")) {
    const style = document.createElement("style");
    style.id = "explain-style";
    style.textContent = EXPLAIN_STYLE;
    document.head.append(style);
  }
  root.classList.add("explain");
  const KIND_NAMES = {
    encoder: "encoder self-attention",
    decoder: "decoder masked self-attention",
    cross: "encoder-decoder attention",
  };
  root.innerHTML = "";
  const el = (tag, attrs = {}, text = "") => {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
    if (text) node.textContent = text;
    return node;
  };
  const summary = el("p");
  summary.append(el("b", {}, "source: "), data.source_tokens.join(" "), el("br"),
                 el("b", {}, "translation: "), data.translation);
  root.append(summary);

  const controls = el("div", { class: "controls" });
  const select = (name, options) => {
    const label = el("label", {}, name + " ");
    const box = el("select", { id: "explain-" + name });
    for (const [value, text] of options) box.append(el("option", { value: String(value) }, text));
    label.append(box);
    controls.append(label);
    return box;
  };
  const kindBox = select("kind", Object.entries(KIND_NAMES));
  const layerBox = select("layer", data.kinds.encoder.map((_, i) => [i, String(i)]));
  const headBox = select("head", Array.from({ length: data.n_heads }, (_, i) => [i, String(i)]));
  const valuesLabel = el("label", {}, "numbers ");
  const valuesBox = el("input", { type: "checkbox", id: "explain-values" });
  valuesLabel.append(valuesBox);
  controls.append(valuesLabel);
  root.append(controls);
  const steps = el("div", { id: "explain-steps" });
  root.append(steps);

  // Signed matrices: blue (negative) - white - red (positive), scaled by the largest |value|;
  // weights and masks: white - blue from 0 to 1.
  function color(value, scale, unit) {
    if (value === "-inf" || value === null) return "#bbb";
    if (unit) {
      const t = Math.max(0, Math.min(1, value));
      return `rgb(${Math.round(255 - 200 * t)},${Math.round(255 - 150 * t)},255)`;
    }
    const t = scale > 0 ? Math.max(-1, Math.min(1, value / scale)) : 0;
    return t >= 0 ? `rgb(255,${Math.round(255 - 180 * t)},${Math.round(255 - 180 * t)})`
                  : `rgb(${Math.round(255 + 180 * t)},${Math.round(255 + 180 * t)},255)`;
  }

  function heatmap(matrix, rowLabels, columnLabels, unit) {
    const table = el("table", { class: "heat" + (valuesBox.checked ? " values" : "") });
    let scale = 0;
    for (const row of matrix) for (const v of row) if (typeof v === "number") scale = Math.max(scale, Math.abs(v));
    const head = el("tr");
    head.append(el("th"));
    columnLabels.forEach((label) => head.append(el("th", {}, label)));
    table.append(head);
    matrix.forEach((row, i) => {
      const tr = el("tr");
      tr.append(el("th", {}, rowLabels[i]));
      row.forEach((v, j) => {
        const shown = typeof v === "boolean" ? (v ? "1" : "0") : String(v);
        const numeric = typeof v === "boolean" ? (v ? 1 : 0) : v;
        const td = el("td", { title: `${rowLabels[i]} / ${columnLabels[j]}: ${shown}` }, shown);
        td.style.background = color(numeric, scale, unit);
        tr.append(td);
      });
      table.append(tr);
    });
    return table;
  }

  function step(number, title, code, matrix, rows, columns, unit = false, note = "") {
    const box = el("div", { class: "step" });
    const heading = el("h3", {}, `${number}. ${title} `);
    if (code) heading.append(el("code", {}, code));
    if (matrix) heading.append(el("span", { class: "note" }, ` [${matrix.length} x ${matrix[0].length}]`));
    box.append(heading);
    if (note) box.append(el("div", { class: "note" }, note));
    if (matrix) box.append(heatmap(matrix, rows, columns, unit));
    steps.append(box);
  }

  const dims = (n, prefix) => Array.from({ length: n }, (_, j) => prefix + j);

  function render() {
    const kind = kindBox.value;
    const layers = data.kinds[kind];
    if (layerBox.options.length !== layers.length) {  // encoder and decoder stacks may differ in depth
      const keep = Math.min(Number(layerBox.value), layers.length - 1);
      layerBox.innerHTML = "";
      layers.forEach((_, i) => layerBox.append(el("option", { value: String(i) }, String(i))));
      layerBox.value = String(keep);
    }
    const layer = Number(layerBox.value);
    const head = Number(headBox.value);
    const walk = layers[layer];
    if (!walk) {
      steps.innerHTML = "";
      steps.removeAttribute("data-kind");
      steps.append(el("p", { class: "note" }, fetchLayer ? "computing this layer..." : "this layer is not included"));
      if (fetchLayer) {
        fetchLayer(kind, layer).then((fresh) => {
          data.kinds[kind][layer] = fresh.kinds[kind][layer];
          render();
        }).catch((error) => { steps.textContent = String(error.message || error); });
      }
      return;
    }
    const h = walk.heads[head];
    const side = kind === "encoder" ? "source" : "target";
    const tokens = side === "source" ? data.source_tokens : data.target_input_tokens;
    const cut = `first ${data.columns_shown} of ${data.d_model} dimensions`;
    const wide = (m) => dims(m[0].length, "d");
    steps.innerHTML = "";
    steps.setAttribute("data-kind", kind);
    steps.setAttribute("data-layer", String(layer));
    steps.setAttribute("data-head", String(head));
    if (layer === 0) {
      step(1, `embedding x sqrt(d_model) of each ${side} piece`, "embedding(tokens)", data.embeddings[side],
           tokens, wide(data.embeddings[side]), false, cut);
      if (data.positions[side]) {
        step(2, `${data.positional_encoding} positional encoding`, "positions(length)", data.positions[side],
             tokens, wide(data.positions[side]), false, cut);
      } else {
        step(2, `no position table (${data.positional_encoding}): positions act inside self-attention, or nowhere`,
             "", null);
      }
    }
    step(3, `X: the input of ${kind === "encoder" ? "encoder" : "decoder"} layer ${layer}`, "x",
         walk.layer_input, tokens, wide(walk.layer_input), false, cut);
    if (kind === "cross") {
      step("3b", "queries: the decoder after its masked self-attention (Add & Norm)", "", walk.input,
           h.query_tokens, wide(walk.input), false, cut);
    }
    step(4, `Q = X W^Q (head ${head})`, "in_proj.query", h.query, h.query_tokens, dims(h.d_k, "q"));
    const keySource = kind === "cross" ? "memory" : "X";
    step(5, `K = ${keySource} W^K`, "in_proj.key_value", h.key, h.key_tokens, dims(h.d_k, "k"));
    step(6, `V = ${keySource} W^V`, "in_proj.key_value", h.value, h.key_tokens, dims(h.d_k, "v"));
    step(7, "scores = Q K^T", "query @ key.T", h.scores, h.query_tokens, h.key_tokens);
    step(8, `scaled = scores / sqrt(d_k) = scores / ${Math.sqrt(h.d_k).toFixed(3)}`, "", h.scaled,
         h.query_tokens, h.key_tokens);
    if (h.bias) step("8b", `+ position bias (${data.positional_encoding})`, "position_bias", h.bias, h.query_tokens,
                     h.key_tokens);
    if (h.mask) step(9, "look-ahead mask (1 = may attend)", "causal_mask(T)", h.mask, h.query_tokens, h.key_tokens, true);
    else step(9, "mask: none needed (one sentence, no padding)", "", null);
    step(10, "softmax of each row: where each query looks", "softmax(scaled)", h.weights, h.query_tokens,
         h.key_tokens, true);
    step(11, "head output = weights x V", "weights @ value", h.output, h.query_tokens, dims(h.d_k, "o"));
    step(12, `Concat(head_1 .. head_${data.n_heads})`, "cat(heads)", walk.concat, h.query_tokens,
         wide(walk.concat), false, cut);
    step(13, "x W^O", "out_proj", walk.projected, h.query_tokens, wide(walk.projected), false, cut);
    step(14, "Add & Norm: LayerNorm(x + Sublayer(x))", "", walk.add_norm, h.query_tokens,
         wide(walk.add_norm), false, cut);
    step(15, "feed-forward hidden layer max(0, x W1 + b1)", "linear1 + relu", walk.ffn_hidden, h.query_tokens,
         dims(walk.ffn_hidden[0].length, "h"), false, `first ${data.columns_shown} of ${data.d_ff} units`);
    step(16, "FFN(x) = hidden W2 + b2", "linear2", walk.ffn_output, h.query_tokens, wide(walk.ffn_output),
         false, cut);
    step(17, `Add & Norm: the output of layer ${layer}`, "", walk.output, h.query_tokens, wide(walk.output),
         false, cut);
    if (kind !== "encoder") {
      const box = el("div", { class: "step" });
      box.append(el("h3", {}, "18. softmax over the vocabulary: the next piece at each step"));
      const table = el("table", { class: "heat values", id: "explain-next" });
      data.next_pieces.forEach((candidates, t) => {
        const tr = el("tr");
        tr.append(el("th", {}, `${data.target_input_tokens[t]} -> ${data.target_tokens[t]}`));
        for (const [piece, p] of candidates) {
          const td = el("td", { title: String(p) }, `${piece} ${p.toFixed(3)}`);
          td.style.background = color(p, 1, true);
          tr.append(td);
        }
        table.append(tr);
      });
      box.append(table);
      steps.append(box);
    }
  }
  for (const box of [kindBox, layerBox, headBox, valuesBox]) box.addEventListener("change", render);
  render();
}

if (typeof module !== "undefined") module.exports = { renderExplanation };
