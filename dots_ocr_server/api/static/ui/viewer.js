// The page view: the page image, layout boxes (original-image pixels) coloured by category with a
// hover card, scene-text quadrilaterals, a drag rectangle for grounding OCR, and the attention
// heatmap over the image-token grid.

const FALLBACK_COLOR = [255, 0, 255]; // until the server's colours arrive (layout.FALLBACK_COLOR)
const SVG_NS = "http://www.w3.org/2000/svg";
const MIN_DRAG_PX = 6; // a smaller movement is a click, not a region

export class PageViewer {
  constructor({ stage, image, boxes, heatmap, selection, tooltip }) {
    Object.assign(this, { stage, image, boxes, heatmap, selection, tooltip });
    this.size = null; // [width, height] of the page in original pixels
    this.cells = [];
    this.spots = [];
    this.colors = {};
    this.fallback = FALLBACK_COLOR;
    this.onRegion = () => {};
    this.onCell = () => {};
    this.drag = null;
    stage.addEventListener("pointerdown", (event) => this.startDrag(event));
    stage.addEventListener("pointermove", (event) => this.moveDrag(event));
    stage.addEventListener("pointerup", (event) => this.endDrag(event));
    stage.addEventListener("pointercancel", () => this.cancelDrag());
    boxes.addEventListener("pointerover", (event) => this.hover(event));
    boxes.addEventListener("pointerout", () => { this.tooltip.hidden = true; });
  }

  /** Show a page (an image URL) whose original size is [width, height]. */
  async show(url, width, height) {
    this.size = [width, height];
    this.clearLayout();
    this.clearHeatmap();
    this.image.src = url;
    await this.image.decode().catch(() => {});
    this.stage.hidden = false;
    this.stage.style.aspectRatio = `${width} / ${height}`;
  }

  setColors(colors, fallback) {
    this.colors = colors || {};
    this.fallback = fallback || FALLBACK_COLOR;
  }

  colorOf(category) {
    return this.colors[category] || this.fallback;
  }

  percent(value, total) {
    return `${(100 * value) / total}%`;
  }

  place(element, [x1, y1, x2, y2]) {
    const [width, height] = this.size;
    element.style.left = this.percent(x1, width);
    element.style.top = this.percent(y1, height);
    element.style.width = this.percent(x2 - x1, width);
    element.style.height = this.percent(y2 - y1, height);
  }

  /** Draw the layout cells (bbox in original pixels). */
  showLayout(cells) {
    this.clearLayout();
    this.cells = cells || [];
    this.cells.forEach((cell, index) => {
      if (!Array.isArray(cell.bbox) || cell.bbox.length !== 4) return;
      const box = document.createElement("div");
      box.className = "box";
      box.dataset.index = String(index);
      const [r, g, b] = this.colorOf(cell.category);
      box.style.borderColor = `rgb(${r}, ${g}, ${b})`;
      box.style.backgroundColor = `rgba(${r}, ${g}, ${b}, 0.12)`;
      const label = document.createElement("span");
      label.className = "box-label";
      label.style.backgroundColor = `rgb(${r}, ${g}, ${b})`;
      label.textContent = `${index} ${cell.category ?? ""}`;
      box.appendChild(label);
      this.place(box, cell.bbox);
      this.boxes.appendChild(box);
    });
  }

  /** Draw scene-text spots (``quad``: four [x, y] corners in original pixels), their text on hover. */
  showSpots(spots) {
    this.spots = spots || [];
    const [width, height] = this.size;
    // one SVG over the page in original-pixel coordinates, stretched with the page
    const overlay = document.createElementNS(SVG_NS, "svg");
    overlay.setAttribute("class", "spots");
    overlay.setAttribute("viewBox", `0 0 ${width} ${height}`);
    overlay.setAttribute("preserveAspectRatio", "none");
    this.spots.forEach((spot, index) => {
      if (!Array.isArray(spot.quad) || spot.quad.length !== 4) return;
      const polygon = document.createElementNS(SVG_NS, "polygon");
      polygon.setAttribute("class", "spot");
      polygon.dataset.spot = String(index);
      polygon.setAttribute("points", spot.quad.map(([x, y]) => `${x},${y}`).join(" "));
      overlay.appendChild(polygon);
    });
    this.boxes.appendChild(overlay);
  }

  /** A grounding region with its answer, kept on the page until the next full run. */
  addRegion(bbox, text) {
    const box = document.createElement("div");
    box.className = "box region";
    box.dataset.region = "1";
    box.dataset.text = text;
    this.place(box, bbox);
    this.boxes.appendChild(box);
    return box;
  }

  clearLayout() {
    this.cells = [];
    this.spots = [];
    this.boxes.replaceChildren();
    this.tooltip.hidden = true;
  }

  selectCell(index) {
    for (const box of this.boxes.querySelectorAll(".box.selected")) box.classList.remove("selected");
    const box = this.boxes.querySelector(`.box[data-index="${index}"]`);
    if (box) box.classList.add("selected");
  }

  hover(event) {
    const box = event.target.closest(".box, [data-spot]");
    if (!box) return;
    const card = this.tooltip;
    card.replaceChildren();
    const title = document.createElement("strong");
    const body = document.createElement("div");
    body.className = "tooltip-text";
    if (box.dataset.spot !== undefined) {
      const spot = this.spots[Number(box.dataset.spot)];
      title.textContent = `Text #${box.dataset.spot}`;
      body.textContent = typeof spot.text === "string" && spot.text ? spot.text : "(no text)";
    } else if (box.dataset.region) {
      title.textContent = "Grounding OCR";
      body.textContent = box.dataset.text || "(no text)";
    } else {
      const cell = this.cells[Number(box.dataset.index)];
      title.textContent = `#${box.dataset.index} ${cell.category ?? "?"}`;
      const text = typeof cell.text === "string" ? cell.text : "";
      body.textContent = text ? (text.length > 400 ? `${text.slice(0, 400)}…` : text) : "(no text)";
      const confidence = describeConfidence(cell.confidence);
      if (confidence) {
        const line = document.createElement("div");
        line.className = "tooltip-confidence";
        line.textContent = confidence;
        card.append(title, line, body);
        this.positionTooltip(box);
        return;
      }
    }
    card.append(title, body);
    this.positionTooltip(box);
  }

  /** The card just below `box`: its coordinates are relative to its positioned container. */
  positionTooltip(box) {
    const card = this.tooltip;
    const rect = box.getBoundingClientRect();
    card.hidden = false;
    const origin = (card.offsetParent || document.body).getBoundingClientRect();
    card.style.left = `${rect.left - origin.left}px`;
    card.style.top = `${rect.bottom - origin.top + 4}px`;
  }

  // -- drag a rectangle -------------------------------------------------------------------------

  pointIn(event) {
    const rect = this.stage.getBoundingClientRect();
    const x = Math.min(Math.max(event.clientX - rect.left, 0), rect.width);
    const y = Math.min(Math.max(event.clientY - rect.top, 0), rect.height);
    return { x, y, rect };
  }

  startDrag(event) {
    if (!this.size || event.button !== 0) return;
    event.preventDefault();
    this.stage.setPointerCapture(event.pointerId);
    this.drag = { start: this.pointIn(event), target: event.target };
  }

  moveDrag(event) {
    if (!this.drag) return;
    const { x, y } = this.pointIn(event);
    const { start } = this.drag;
    const style = this.selection.style;
    this.selection.hidden = Math.abs(x - start.x) < MIN_DRAG_PX && Math.abs(y - start.y) < MIN_DRAG_PX;
    style.left = `${Math.min(x, start.x)}px`;
    style.top = `${Math.min(y, start.y)}px`;
    style.width = `${Math.abs(x - start.x)}px`;
    style.height = `${Math.abs(y - start.y)}px`;
  }

  endDrag(event) {
    if (!this.drag) return;
    const { start, target } = this.drag;
    const { x, y, rect } = this.pointIn(event);
    this.cancelDrag();
    if (Math.abs(x - start.x) < MIN_DRAG_PX && Math.abs(y - start.y) < MIN_DRAG_PX) {
      const box = target.closest && target.closest(".box[data-index]");
      if (box) this.onCell(Number(box.dataset.index));
      return;
    }
    const [width, height] = this.size;
    const sx = width / rect.width;
    const sy = height / rect.height;
    const bbox = [
      Math.round(Math.min(x, start.x) * sx), Math.round(Math.min(y, start.y) * sy),
      Math.round(Math.max(x, start.x) * sx), Math.round(Math.max(y, start.y) * sy),
    ];
    this.onRegion(bbox);
  }

  cancelDrag() {
    this.drag = null;
    this.selection.hidden = true;
  }

  // -- attention heatmap ------------------------------------------------------------------------

  /**
   * Paint `grid` (rows of numbers over the image-token grid) over the page. The grid covers the
   * whole page: the model input is the page resized, so cell (r, c) is the same fraction of both.
   */
  showHeatmap(grid) {
    const rows = grid.length;
    const cols = rows ? grid[0].length : 0;
    const canvas = this.heatmap;
    canvas.width = cols;
    canvas.height = rows;
    const values = grid.flat();
    const low = values.reduce((a, b) => Math.min(a, b), Infinity);
    const range = Math.max(values.reduce((a, b) => Math.max(a, b), -Infinity) - low, 1e-12); // min-max scaling, as the README figure
    const context = canvas.getContext("2d");
    const pixels = context.createImageData(cols, rows);
    grid.forEach((row, r) => row.forEach((value, c) => {
      const t = Math.min(1, (value - low) / range);
      const [red, green, blue] = heatColor(t);
      const at = 4 * (r * cols + c);
      pixels.data.set([red, green, blue, Math.round(255 * t)], at);
    }));
    context.putImageData(pixels, 0, 0);
    canvas.hidden = false;
  }

  clearHeatmap() {
    this.heatmap.hidden = true;
  }
}

/**
 * A cell's confidence as text, or "" when it has none: a number, or {min, mean} (the
 * probabilities of the cell's tokens, from the server's logprobs postprocessing).
 */
export function describeConfidence(confidence) {
  const shown = (value) => (typeof value === "number" && Number.isFinite(value) ? value.toFixed(3) : null);
  if (typeof confidence === "number") return shown(confidence) ? `confidence ${shown(confidence)}` : "";
  if (!confidence || typeof confidence !== "object") return "";
  const parts = [];
  if (shown(confidence.mean)) parts.push(`mean ${shown(confidence.mean)}`);
  if (shown(confidence.min)) parts.push(`min ${shown(confidence.min)}`);
  return parts.length ? `confidence: ${parts.join(", ")}` : "";
}

// Black-red-yellow-white ramp (a plain "hot" colour map), t in [0, 1].
function heatColor(t) {
  const stops = [[0, 0, 0], [190, 20, 20], [255, 200, 0], [255, 255, 230]];
  const scaled = t * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(scaled));
  const f = scaled - i;
  return stops[i].map((a, k) => Math.round(a + f * (stops[i + 1][k] - a)));
}
