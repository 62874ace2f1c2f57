// Bundles the page into ../api/static/, which Flask serves: index.html, app.js, app.css.
// Everything comes from node_modules (three.js, Spark); nothing is fetched at run time.
// Usage: node build.mjs   (run by `make install` through `npm run build`)
import { createHash } from "node:crypto";
import { mkdir, readFile, rm, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "api", "static");

await rm(out, { recursive: true, force: true });
await mkdir(out, { recursive: true });

const result = await esbuild.build({
  entryPoints: { app: join(here, "src", "main.js") },
  bundle: true,
  format: "esm",
  target: ["es2022"],
  minify: true,
  legalComments: "linked",
  splitting: true, // the 3D viewer (three.js, Spark) loads when a result is shown
  chunkNames: "chunk-[hash]",
  outdir: out,
  write: false,
  logLevel: "warning",
});

// index.html names each file with a hash of its content, so a rebuilt page is never
// mixed with a stale script from the browser's cache.
const names = {};
for (const file of result.outputFiles) {
  const name = file.path.slice(out.length + 1);
  await writeFile(file.path, file.contents);
  names[name] = `${name}?v=${createHash("sha256").update(file.contents).digest("hex").slice(0, 12)}`;
}
const css = await readFile(join(here, "src", "style.css"));
await writeFile(join(out, "app.css"), css);
names["app.css"] = `app.css?v=${createHash("sha256").update(css).digest("hex").slice(0, 12)}`;

let html = await readFile(join(here, "index.html"), "utf8");
html = html.replace(/\{\{(app\.(?:js|css))\}\}/g, (_, name) => `static/${names[name]}`);
await writeFile(join(out, "index.html"), html);
console.log(`web page built into ${out}: ${Object.keys(names).sort().join(", ")}, index.html`);
