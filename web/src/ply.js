// Splitting scene.ply into one PLY per object. scene.ply holds every object's splats, in
// object order and already in the scene frame; cutting it by the per-object splat counts of
// the manifest gives each object its own splats with no transform to apply.

const SIZES = {
  char: 1, uchar: 1, int8: 1, uint8: 1,
  short: 2, ushort: 2, int16: 2, uint16: 2,
  int: 4, uint: 4, int32: 4, uint32: 4, float: 4, float32: 4,
  double: 8, float64: 8,
};

const END = "end_header\n";

function headerEnd(bytes) {
  const limit = Math.min(bytes.length, 1 << 16);
  const text = new TextDecoder("latin1").decode(bytes.subarray(0, limit));
  const at = text.indexOf(END);
  return at < 0 ? -1 : at + END.length;
}

/** The header of a binary little-endian PLY with one `vertex` element, or null. */
export function parseHeader(bytes) {
  const end = headerEnd(bytes);
  if (end < 0) return null;
  const text = new TextDecoder("latin1").decode(bytes.subarray(0, end));
  const lines = text.split("\n").map((l) => l.trim());
  if (lines[0] !== "ply" || !lines.includes("format binary_little_endian 1.0")) return null;
  let count = -1;
  let stride = 0;
  let element = null;
  for (const line of lines) {
    const words = line.split(/\s+/);
    if (words[0] === "element") {
      if (element !== null || words[1] !== "vertex") return null; // only a vertex element
      element = words[1];
      count = Number(words[2]);
    } else if (words[0] === "property") {
      if (words[1] === "list" || !(words[1] in SIZES)) return null;
      stride += SIZES[words[1]];
    }
  }
  if (!(count >= 0) || stride === 0 || end + count * stride > bytes.length) return null;
  return { text, end, count, stride };
}

/** One PLY (Uint8Array) per object, or null when the counts do not match the file. */
export function splitPly(buffer, counts) {
  const bytes = new Uint8Array(buffer);
  const header = parseHeader(bytes);
  if (!header) return null;
  const total = counts.reduce((a, b) => a + b, 0);
  if (counts.some((n) => !Number.isInteger(n) || n < 0) || total !== header.count) return null;
  const encoder = new TextEncoder();
  const parts = [];
  let offset = header.end;
  for (const n of counts) {
    const head = encoder.encode(header.text.replace(/element vertex \d+/, `element vertex ${n}`));
    const body = bytes.subarray(offset, offset + n * header.stride);
    const part = new Uint8Array(head.length + body.length);
    part.set(head, 0);
    part.set(body, head.length);
    parts.push(part);
    offset += n * header.stride;
  }
  return parts;
}
