// The masks a job was made from (its objects' COCO RLE), shown over the photo and offered
// as downloads: one PNG per object and all of them as JSON.

import { colourOf } from "./draw.js";

/** COCO compressed RLE counts (pycocotools' string form) as run lengths. */
export function rleCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let x = 0;
    let k = 0;
    let more = true;
    while (more) {
      const c = text.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = (c & 0x20) !== 0;
      p++;
      k++;
      if (!more && c & 0x10) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

/** An RLE {size: [h, w], counts} as a row-major 0/1 grid (RLE runs down columns). */
export function decodeRle(rle) {
  const [h, w] = rle.size;
  const counts = typeof rle.counts === "string" ? rleCounts(rle.counts) : rle.counts;
  const on = new Uint8Array(h * w);
  let i = 0;
  counts.forEach((run, n) => {
    if (n % 2) {
      for (let j = i; j < i + run; j++) on[(j % h) * w + Math.floor(j / h)] = 1;
    }
    i += run;
  });
  return { width: w, height: h, on };
}

function paint(ctx, mask, colour, alpha) {
  const image = ctx.getImageData(0, 0, mask.width, mask.height);
  const r = parseInt(colour.slice(1, 3), 16);
  const g = parseInt(colour.slice(3, 5), 16);
  const b = parseInt(colour.slice(5, 7), 16);
  for (let p = 0, i = 0; p < mask.on.length; p++, i += 4) {
    if (!mask.on[p]) continue;
    const d = image.data;
    d[i] = d[i] * (1 - alpha) + r * alpha;
    d[i + 1] = d[i + 1] * (1 - alpha) + g * alpha;
    d[i + 2] = d[i + 2] * (1 - alpha) + b * alpha;
    d[i + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
}

async function pngOf(mask) {
  const canvas = new OffscreenCanvas(mask.width, mask.height);
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(mask.width, mask.height);
  for (let p = 0, i = 0; p < mask.on.length; p++, i += 4) {
    const v = mask.on[p] ? 255 : 0;
    image.data[i] = image.data[i + 1] = image.data[i + 2] = v;
    image.data[i + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
  return canvas.convertToBlob({ type: "image/png" });
}

let urls = [];

/** Draw `objects` (each with mask.rle) into `canvas`, over `photo` (a File of the same size,
 * or null: a dark ground), and fill `list` with download links; returns how many. */
export async function showMasks(canvas, list, objects, photo, jobId) {
  for (const url of urls) URL.revokeObjectURL(url);
  urls = [];
  const withMasks = objects.filter((o) => o.mask && o.mask.rle);
  if (!withMasks.length) return 0;
  const masks = withMasks.map((o) => decodeRle(o.mask.rle));
  const { width, height } = masks[0];
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.fillStyle = "#222";
  ctx.fillRect(0, 0, width, height);
  if (photo) {
    try {
      const bitmap = await createImageBitmap(photo, { imageOrientation: "from-image" });
      if (bitmap.width === width && bitmap.height === height) ctx.drawImage(bitmap, 0, 0);
      bitmap.close();
    } catch {
      // not drawable here: the masks on the dark ground
    }
  }
  masks.forEach((mask, i) => paint(ctx, mask, colourOf(withMasks[i].index ?? i), 0.55));
  const items = [];
  for (const [i, mask] of masks.entries()) {
    const obj = withMasks[i];
    const url = URL.createObjectURL(await pngOf(mask));
    urls.push(url);
    const m = obj.mask;
    const about = [
      m.prompt !== undefined ? `prompt ${m.prompt}` : null,
      m.score !== undefined && m.score !== null ? `score ${m.score}` : null,
      m.area !== undefined ? `${m.area} px` : null,
      m.fallback ? `fallback: ${m.fallback}` : null,
    ].filter(Boolean);
    const li = document.createElement("li");
    const a = Object.assign(document.createElement("a"), {
      href: url,
      download: `${jobId}-mask-${obj.index ?? i}.png`,
      textContent: `Object ${obj.index ?? i} mask (PNG)`,
    });
    li.append(a, document.createTextNode(about.length ? ` — ${about.join(", ")}` : ""));
    if (m.notes && m.notes.length) {
      const note = document.createElement("span");
      note.className = "warn";
      note.textContent = ` ⚠ ${m.notes.join("; ")}`;
      li.append(note);
    }
    items.push(li);
  }
  const all = new Blob([JSON.stringify(withMasks.map((o) => ({ index: o.index, ...o.mask })), null, 1)], {
    type: "application/json",
  });
  const allUrl = URL.createObjectURL(all);
  urls.push(allUrl);
  const li = document.createElement("li");
  li.append(
    Object.assign(document.createElement("a"), {
      href: allUrl,
      download: `${jobId}-masks.json`,
      textContent: "All masks (COCO RLE, JSON)",
    }),
  );
  items.push(li);
  list.replaceChildren(...items);
  return masks.length;
}
