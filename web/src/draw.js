// The image preview: shows the chosen image with every mask tinted over it, and lets the
// user draw polygons with the mouse (or pen, or touch), or give prompts for the worker's
// segmenter instead: drag a box, click points on (+) or off (−) an object. Polygons and
// prompts are kept in image pixels (the upright image, EXIF applied, as the service counts).

export const PALETTE = [
  "#ff6b5a", "#4fa3ff", "#52d273", "#ffc24b", "#c77dff",
  "#2ed3c6", "#ff8bd1", "#a3e048", "#ff9f43", "#8c9eff",
];

export const colourOf = (index) => PALETTE[index % PALETTE.length];

const MAX_SIDE = 1600; // the preview canvas never holds more pixels than this per side
const CLOSE_PX = 10; // a click this close (screen pixels) to the first point closes

/** A decoded mask file as a boolean grid drawn into a tinted overlay. */
export async function readMaskPng(file) {
  const bitmap = await createImageBitmap(file, {
    colorSpaceConversion: "none",
    premultiplyAlpha: "none",
  });
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  const { data } = ctx.getImageData(0, 0, bitmap.width, bitmap.height);
  // The service's rule: a varying alpha channel means alpha > 0; otherwise the brightest
  // channel means > 0 when the mask's maximum is 1, else >= 128.
  let alphaVaries = false;
  let max = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i + 3] !== data[3]) alphaVaries = true;
    max = Math.max(max, data[i], data[i + 1], data[i + 2]);
  }
  const threshold = max <= 1 ? 1 : 128;
  const on = new Uint8Array(bitmap.width * bitmap.height);
  let area = 0;
  for (let p = 0, i = 0; p < on.length; p++, i += 4) {
    const value = alphaVaries
      ? data[i + 3] > 0
      : Math.max(data[i], data[i + 1], data[i + 2]) >= threshold;
    on[p] = value ? 1 : 0;
    area += on[p];
  }
  bitmap.close();
  return { width: canvas.width, height: canvas.height, on, area };
}

/** The mask as an image: its colour, translucent inside, opaque along its edge (so a
 * mask stays visible on an object of its own colour). */
function tint(mask, colour) {
  const { width: w, height: h, on } = mask;
  const image = new ImageData(w, h);
  const r = parseInt(colour.slice(1, 3), 16);
  const g = parseInt(colour.slice(3, 5), 16);
  const b = parseInt(colour.slice(5, 7), 16);
  const edge = Math.max(1, Math.round(Math.max(w, h) / 400));
  const off = (x, y) => x < 0 || y < 0 || x >= w || y >= h || !on[y * w + x];
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      if (!on[y * w + x]) continue;
      const i = (y * w + x) * 4;
      const border =
        off(x - edge, y) || off(x + edge, y) || off(x, y - edge) || off(x, y + edge);
      image.data[i] = border ? 255 : r;
      image.data[i + 1] = border ? 255 : g;
      image.data[i + 2] = border ? 255 : b;
      image.data[i + 3] = border ? 255 : 120;
    }
  }
  return createImageBitmap(image);
}

export class Drawing {
  /** `onChange()` is called whenever the set of closed polygons changes. */
  constructor(canvas, onChange) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.onChange = onChange;
    this.bitmap = null;
    this.width = 0;
    this.height = 0;
    this.scale = 1;
    this.polygons = []; // closed: [[x, y], ...] in image pixels
    this.current = []; // being drawn
    this.overlays = []; // ImageBitmaps: the mask files, tinted
    this.polygonColours = [];
    this.tool = "polygon"; // or "box", "on", "off" (prompts)
    this.prompts = []; // [{box?: [x0, y0, x1, y1], points?: [[x, y, 1 | 0], ...]}]
    this.open = -1; // the prompt clicks go to (-1: the next click starts one)
    this.dragFrom = null;
    this.dragTo = null;
    canvas.addEventListener("pointerdown", (e) => this.#dragStart(e));
    canvas.addEventListener("pointermove", (e) => this.#dragMove(e));
    canvas.addEventListener("pointerup", (e) => this.#dragEnd(e));
    canvas.addEventListener("click", (e) => this.#click(e));
    canvas.addEventListener("dblclick", (e) => {
      e.preventDefault();
      this.close();
    });
    canvas.addEventListener("keydown", (e) => this.#key(e));
  }

  async setImage(file) {
    const bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
    this.bitmap?.close();
    this.bitmap = bitmap;
    this.width = bitmap.width;
    this.height = bitmap.height;
    this.scale = Math.min(1, MAX_SIDE / Math.max(bitmap.width, bitmap.height));
    this.canvas.width = Math.round(bitmap.width * this.scale);
    this.canvas.height = Math.round(bitmap.height * this.scale);
    this.polygons = [];
    this.current = [];
    this.prompts = [];
    this.open = -1;
    this.redraw();
    this.onChange();
  }

  /** "polygon", or a prompt tool: "box", "on" (a point on the object), "off". */
  setTool(tool) {
    this.tool = tool;
    this.canvas.style.touchAction = tool === "box" ? "none" : ""; // a drag draws, not scrolls
    this.current = [];
    this.redraw();
  }

  /** The next click or box starts a new object. */
  nextObject() {
    this.open = -1;
    this.redraw();
  }

  removePrompt(index) {
    this.prompts.splice(index, 1);
    this.open = -1;
    this.redraw();
    this.onChange();
  }

  /** The prompts as the service takes them (coordinates rounded to 0.1 px). */
  promptsJson() {
    const r = (v) => Math.round(v * 10) / 10;
    return this.prompts.map((p) => ({
      ...(p.box ? { box: p.box.map(r) } : {}),
      ...(p.points ? { points: p.points.map(([x, y, on]) => [r(x), r(y), on]) } : {}),
    }));
  }

  /** Mask files to show over the image: [{mask from readMaskPng, colour}]. */
  async setOverlays(items) {
    const token = (this.overlayToken = (this.overlayToken || 0) + 1);
    const bitmaps = await Promise.all(
      items
        .filter((it) => it.mask && it.mask.width === this.width && it.mask.height === this.height)
        .map((it) => tint(it.mask, it.colour)),
    );
    if (token !== this.overlayToken) return; // a newer call won
    for (const old of this.overlays) old.close();
    this.overlays = bitmaps;
    this.redraw();
  }

  setPolygonColours(colours) {
    this.polygonColours = colours;
    this.redraw();
  }

  close() {
    if (this.current.length >= 3) {
      this.polygons.push(this.current);
      this.current = [];
      this.redraw();
      this.onChange();
    }
  }

  undo() {
    if (this.current.length) this.current.pop();
    else if (this.polygons.length) {
      this.current = this.polygons.pop();
      this.onChange();
    }
    this.redraw();
  }

  clear() {
    this.polygons = [];
    this.current = [];
    this.prompts = [];
    this.open = -1;
    this.redraw();
    this.onChange();
  }

  remove(index) {
    this.polygons.splice(index, 1);
    this.redraw();
    this.onChange();
  }

  /** Closed polygons as COCO flat polygons, in image pixels. */
  flatPolygons() {
    return this.polygons.map((poly) =>
      poly.flatMap(([x, y]) => [Math.round(x * 10) / 10, Math.round(y * 10) / 10]),
    );
  }

  /** One polygon rasterised as a PNG mask the size of the image. */
  async polygonPng(index) {
    const canvas = new OffscreenCanvas(this.width, this.height);
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, this.width, this.height);
    ctx.fillStyle = "#fff";
    ctx.beginPath();
    for (const [x, y] of this.polygons[index]) ctx.lineTo(x, y);
    ctx.closePath();
    ctx.fill();
    return canvas.convertToBlob({ type: "image/png" });
  }

  #toImage(event) {
    const rect = this.canvas.getBoundingClientRect();
    const x = ((event.clientX - rect.left) / rect.width) * this.width;
    const y = ((event.clientY - rect.top) / rect.height) * this.height;
    return [Math.min(Math.max(x, 0), this.width), Math.min(Math.max(y, 0), this.height)];
  }

  #screenDistance(a, b) {
    const rect = this.canvas.getBoundingClientRect();
    const k = rect.width / this.width;
    return Math.hypot((a[0] - b[0]) * k, (a[1] - b[1]) * k);
  }

  #dragStart(event) {
    if (!this.bitmap || this.tool !== "box") return;
    this.dragFrom = this.#toImage(event);
    this.dragTo = this.dragFrom;
    this.canvas.setPointerCapture?.(event.pointerId);
  }

  #dragMove(event) {
    if (!this.dragFrom) return;
    this.dragTo = this.#toImage(event);
    this.redraw();
  }

  #dragEnd(event) {
    if (!this.dragFrom) return;
    const a = this.dragFrom;
    const b = this.#toImage(event);
    this.dragFrom = this.dragTo = null;
    if (this.#screenDistance(a, b) >= 6) {
      const box = [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
      const open = this.prompts[this.open];
      if (open && !open.box) open.box = box; // clicks first, then their box: one object
      else {
        this.prompts.push({ box });
        this.open = this.prompts.length - 1;
      }
      this.onChange();
    }
    this.redraw();
  }

  #click(event) {
    if (!this.bitmap) return;
    if (this.tool === "box") return; // boxes are dragged
    if (this.tool === "on" || this.tool === "off") {
      const [x, y] = this.#toImage(event);
      const point = [x, y, this.tool === "on" ? 1 : 0];
      const open = this.prompts[this.open];
      if (open) (open.points ||= []).push(point);
      else {
        this.prompts.push({ points: [point] });
        this.open = this.prompts.length - 1;
      }
      this.redraw();
      this.onChange();
      return;
    }
    const point = this.#toImage(event);
    const last = this.current[this.current.length - 1];
    if (last && this.#screenDistance(point, last) < 4) return; // the 2nd click of a dblclick
    if (this.current.length >= 3 && this.#screenDistance(point, this.current[0]) < CLOSE_PX) {
      this.close();
      return;
    }
    this.current.push(point);
    this.redraw();
  }

  #key(event) {
    if (event.key === "Enter") {
      event.preventDefault();
      this.close();
    } else if (event.key === "Backspace") {
      event.preventDefault();
      this.undo();
    } else if (event.key === "Escape") {
      this.current = [];
      this.redraw();
    }
  }

  redraw() {
    const { ctx, canvas } = this;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!this.bitmap) return;
    ctx.drawImage(this.bitmap, 0, 0, canvas.width, canvas.height);
    for (const overlay of this.overlays) ctx.drawImage(overlay, 0, 0, canvas.width, canvas.height);
    const s = this.scale;
    const line = Math.max(2, canvas.width / 400);
    this.polygons.forEach((poly, i) => {
      const colour = this.polygonColours[i] || PALETTE[0];
      ctx.beginPath();
      for (const [x, y] of poly) ctx.lineTo(x * s, y * s);
      ctx.closePath();
      ctx.fillStyle = `${colour}70`;
      ctx.fill();
      ctx.lineWidth = line;
      ctx.strokeStyle = colour;
      ctx.stroke();
    });
    this.prompts.forEach((p, i) => {
      const colour = this.promptColours?.[i] || PALETTE[i % PALETTE.length];
      ctx.lineWidth = line;
      if (p.box) {
        const [x0, y0, x1, y1] = p.box;
        ctx.strokeStyle = colour;
        ctx.setLineDash(i === this.open ? [line * 3, line * 2] : []);
        ctx.strokeRect(x0 * s, y0 * s, (x1 - x0) * s, (y1 - y0) * s);
        ctx.setLineDash([]);
      }
      for (const [x, y, on] of p.points || []) {
        ctx.beginPath();
        ctx.arc(x * s, y * s, line * 3, 0, Math.PI * 2);
        ctx.fillStyle = on ? "#2ecc71" : "#e74c3c";
        ctx.fill();
        ctx.strokeStyle = colour;
        ctx.stroke();
      }
    });
    if (this.dragFrom && this.dragTo) {
      const [a, b] = [this.dragFrom, this.dragTo];
      ctx.strokeStyle = "#fff";
      ctx.setLineDash([line * 3, line * 2]);
      ctx.strokeRect(a[0] * s, a[1] * s, (b[0] - a[0]) * s, (b[1] - a[1]) * s);
      ctx.setLineDash([]);
    }
    if (this.current.length) {
      ctx.beginPath();
      for (const [x, y] of this.current) ctx.lineTo(x * s, y * s);
      ctx.lineWidth = line;
      ctx.strokeStyle = "#fff";
      ctx.setLineDash([line * 3, line * 2]);
      ctx.stroke();
      ctx.setLineDash([]);
      ctx.fillStyle = "#fff";
      for (const [x, y] of this.current) {
        ctx.beginPath();
        ctx.arc(x * s, y * s, line * 1.6, 0, Math.PI * 2);
        ctx.fill();
      }
    }
  }
}
