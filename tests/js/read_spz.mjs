// Decodes SPZ files with spz-js (an independent SPZ reader); prints one JSON object per file:
// {numPoints, shDegree, positions, scales (log), rotations (x,y,z,w), alphas (logit), colors (SH DC)}.
// Usage: node read_spz.mjs FILE...
import { readFile } from "node:fs/promises";
import { loadSpz } from "spz-js";

const out = {};
for (const path of process.argv.slice(2)) {
  const cloud = await loadSpz(new Uint8Array(await readFile(path)));
  out[path] = {
    numPoints: cloud.numPoints,
    shDegree: cloud.shDegree,
    positions: Array.from(cloud.positions),
    scales: Array.from(cloud.scales),
    rotations: Array.from(cloud.rotations),
    alphas: Array.from(cloud.alphas),
    colors: Array.from(cloud.colors),
  };
}
process.stdout.write(JSON.stringify(out));
