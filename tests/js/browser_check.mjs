// Drives the web page in headless Chromium (Debian's, through playwright-core; no browser is
// downloaded): submits an image and PNG masks, waits for the job, looks at the 3D view in
// splat and mesh mode, checks the layout at desktop and phone width. Prints one JSON report;
// the Python test (tests/test_web.py) judges it.
//
// Usage: node browser_check.mjs --url URL --image FILE --mask FILE [--mask FILE ...]
//          --out DIR [--options JSON] [--screenshot FILE] [--chromium PATH] [--api-key KEY]
//          [--coco FILE] [--quick 1] [--polygon-at CX,CY,R]   (fractions of the image's width)
import { mkdtempSync, rmSync } from "node:fs";
import { copyFile, mkdir, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

function parseArgs(argv) {
  const args = { mask: [] };
  for (let i = 0; i < argv.length; i += 2) {
    const name = argv[i].replace(/^--/, "").replace(/-/g, "_");
    if (name === "mask") args.mask.push(argv[i + 1]);
    else args[name] = argv[i + 1];
  }
  return args;
}

const args = parseArgs(process.argv.slice(2));
const report = { steps: [], console_errors: [], external_requests: [], timings: {} };
const started = Date.now();
const step = (name) => {
  report.steps.push(name);
  report.timings[name] = (Date.now() - started) / 1000;
};

// Headless Chromium renders WebGL2 through SwiftShader (software); no GPU flags needed.
const FLAGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
  "--disable-quic",
];

/** Pixels of a PNG screenshot that differ from the background colour, counted in the page
 * from the screenshot (what is on screen), not from WebGL. */
async function countDrawn(page, png, background) {
  return page.evaluate(
    async ({ b64, bg }) => {
      const blob = await (await fetch(`data:image/png;base64,${b64}`)).blob();
      const bitmap = await createImageBitmap(blob);
      const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
      const ctx = canvas.getContext("2d");
      ctx.drawImage(bitmap, 0, 0);
      const { data } = ctx.getImageData(0, 0, bitmap.width, bitmap.height);
      let drawn = 0;
      for (let i = 0; i < data.length; i += 4) {
        const d =
          Math.abs(data[i] - bg[0]) + Math.abs(data[i + 1] - bg[1]) + Math.abs(data[i + 2] - bg[2]);
        if (d > 24) drawn += 1;
      }
      return { drawn, total: bitmap.width * bitmap.height };
    },
    { b64: png.toString("base64"), bg: background },
  );
}

/** Screenshots the viewer's canvas until it shows more than `fraction` of drawn pixels. */
async function viewShot(page, path, background, { fraction = 0.01, timeout = 30000 } = {}) {
  const canvas = page.locator("[data-testid=viewer] canvas");
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    const png = await canvas.screenshot();
    last = await countDrawn(page, png, background);
    if (last.drawn > fraction * last.total || Date.now() > deadline) {
      await writeFile(path, png);
      return { path, ...last };
    }
    await page.waitForTimeout(250);
  }
}

async function layout(page) {
  return page.evaluate(() => ({
    innerWidth: window.innerWidth,
    scrollWidth: document.documentElement.scrollWidth,
    bodyScrollWidth: document.body.scrollWidth,
  }));
}

class Done extends Error {} // --quick: stop once the splats are drawn

const profile = mkdtempSync(join(tmpdir(), "sam3d-chromium-"));
let context;
try {
  await mkdir(args.out, { recursive: true });
  context = await chromium.launchPersistentContext(profile, {
    executablePath: args.chromium || "/usr/bin/chromium",
    headless: true,
    args: FLAGS,
    viewport: { width: 1280, height: 800 },
    deviceScaleFactor: 1,
  });
  const page = context.pages()[0] || (await context.newPage());
  const origin = new URL(args.url).origin;
  page.on("console", (m) => {
    if (m.type() === "error") report.console_errors.push(m.text());
  });
  page.on("pageerror", (e) => report.console_errors.push(`pageerror: ${e.message}`));
  page.on("request", (r) => {
    const u = r.url();
    if (!u.startsWith("data:") && !u.startsWith("blob:") && new URL(u).origin !== origin) {
      report.external_requests.push(u);
    }
  });
  // Every status and progress the page shows, in order.
  await page.addInitScript(() => {
    window.__statuses = [];
    window.__progress = [];
    document.addEventListener("DOMContentLoaded", () => {
      const box = document.querySelector("[data-testid=job-status]");
      new MutationObserver(() => {
        const s = box.dataset.status;
        if (window.__statuses.at(-1) !== s) window.__statuses.push(s);
        const p = box.querySelector(".progress")?.textContent.trim();
        const seen = p && `${s} ${p}`;
        if (seen && window.__progress.at(-1) !== seen) window.__progress.push(seen);
      }).observe(box, { attributes: true, childList: true, subtree: true });
    });
  });

  const response = await page.goto(args.url, { waitUntil: "load" });
  report.index_status = response.status();
  report.title = await page.title();
  step("loaded");

  if (args.api_key) {
    await page.getByTestId("api-key").waitFor({ state: "visible", timeout: 10000 });
    await page.getByTestId("api-key").fill(args.api_key);
    await page.getByTestId("api-key").press("Enter");
    step("api key entered");
  }

  await page.getByTestId("image-input").setInputFiles(args.image);
  await page.locator("#draw:not([hidden])").waitFor({ timeout: 10000 });
  await page.getByTestId("masks-input").setInputFiles(args.mask);
  await page.waitForFunction(
    (n) => document.querySelectorAll("[data-testid=mask-list] li").length === n,
    args.mask.length,
    { timeout: 10000 },
  );
  report.mask_items = await page.locator("[data-testid=mask-list] li").count();
  report.mask_warnings = await page.locator("[data-testid=mask-list] .warn").count();
  step("inputs chosen");

  // Submit from the keyboard: Enter in the options field.
  const options = page.getByTestId("options-input");
  if (args.options) await options.fill(args.options);
  await options.press("Enter");
  const status = page.getByTestId("job-status");
  await page.waitForFunction(
    () => ["queued", "running", "succeeded", "failed", "canceled"].includes(
      document.querySelector("[data-testid=job-status]").dataset.status,
    ),
    null,
    { timeout: 15000 },
  );
  step("submitted");
  report.job_id = await status.locator(".job-id").first().textContent();
  await page.waitForFunction(
    () => ["succeeded", "failed", "canceled", "error"].includes(
      document.querySelector("[data-testid=job-status]").dataset.status,
    ),
    null,
    { timeout: 60000 },
  );
  report.final_status = await status.getAttribute("data-status");
  report.status_text = (await status.innerText()).replace(/\s+/g, " ").trim();
  report.statuses_seen = await page.evaluate(() => window.__statuses);
  report.progress_seen = await page.evaluate(() => window.__progress);
  step("job finished");
  if (report.final_status !== "succeeded") throw new Error(`job ended ${report.final_status}`);

  const viewer = page.getByTestId("viewer");
  await page.waitForFunction(
    () => ["ready", "error"].includes(document.querySelector("[data-testid=viewer]").dataset.state),
    null,
    { timeout: 60000 },
  );
  report.viewer_state = await viewer.getAttribute("data-state");
  step("viewer loaded");
  if (report.viewer_state !== "ready") {
    throw new Error(`viewer: ${await page.locator("#viewer-note").textContent()}`);
  }
  // The background colour of the 3D view, as the page sets it (#rrggbb).
  const background = await page.evaluate(() => {
    const hex = getComputedStyle(document.querySelector("[data-testid=viewer]")).backgroundColor;
    return hex.match(/\d+/g).slice(0, 3).map(Number);
  });
  report.background = background;
  report.object_toggles = await page.locator("[data-testid^=object-toggle-]").count();
  report.splat_source = await viewer.getAttribute("data-splat-source");
  report.mesh_source = await viewer.getAttribute("data-mesh-source");
  report.mesh_textures = Number(await viewer.getAttribute("data-mesh-textures"));
  report.downloads = await page.locator("[data-testid=downloads] a").count();

  report.views = {};
  report.views.splats = await viewShot(page, join(args.out, "splats.png"), background);
  step("splats drawn");
  report.stored_key = await page.evaluate(() => localStorage.getItem("sam3d-jobs.api-key"));
  if (args.quick) throw new Done();
  await page.getByTestId("mode-mesh").check();
  await page.waitForFunction(() => document.querySelector("[data-testid=viewer]").dataset.mode === "mesh");
  report.views.mesh = await viewShot(page, join(args.out, "mesh.png"), background);
  step("meshes drawn");
  // One object off: fewer pixels drawn; back on.
  await page.getByTestId("object-toggle-0").uncheck();
  await page.waitForTimeout(300);
  report.views.mesh_without_object_0 = await viewShot(
    page,
    join(args.out, "mesh-without-0.png"),
    background,
    { fraction: 0, timeout: 0 },
  );
  await page.getByTestId("object-toggle-0").check();
  await page.getByTestId("mode-splats").check();
  await page.getByTestId("object-toggle-0").uncheck();
  await page.waitForTimeout(300);
  report.views.splats_without_object_0 = await viewShot(
    page,
    join(args.out, "splats-without-0.png"),
    background,
    { fraction: 0, timeout: 0 },
  );
  await page.getByTestId("object-toggle-0").check();
  report.views.splats_again = await viewShot(page, join(args.out, "splats-again.png"), background);
  step("toggles");

  // The recent-jobs list shows the job; it opens it.
  await page.getByTestId("recent-jobs").locator(`[data-job-id="${report.job_id}"]`).waitFor({ timeout: 10000 });
  report.recent_listed = true;

  report.layout = { desktop: await layout(page) };
  await page.evaluate(() => window.scrollTo(0, 0));
  const shot = join(args.out, "page.png");
  await page.screenshot({ path: shot });
  report.page_screenshot = shot;
  if (args.screenshot) {
    await copyFile(shot, args.screenshot);
    report.screenshot = args.screenshot;
  }
  step("desktop screenshot");

  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForTimeout(300);
  report.layout.phone = await layout(page);
  report.views.phone = await viewShot(page, join(args.out, "phone-view.png"), background);
  await page.screenshot({ path: join(args.out, "phone.png"), fullPage: true });
  step("phone layout");

  // A second job from a polygon drawn with the mouse, closed with Enter, sent by the button.
  await page.setViewportSize({ width: 1280, height: 800 });
  const removeButtons = page.locator("[data-testid=mask-list] li button");
  while ((await removeButtons.count()) > 0) await removeButtons.first().click();
  const draw = page.getByTestId("draw-canvas");
  await draw.scrollIntoViewIfNeeded();
  const box = await draw.boundingBox();
  const [cx, cy, r] = (args.polygon_at || "0.3,0.56,0.1").split(",").map(Number);
  for (const [dx, dy] of [[-r, 0], [0, -r], [r, 0], [0, r]]) {
    await page.mouse.click(box.x + (cx + dx) * box.width, box.y + (cy + dy * (box.width / box.height)) * box.height);
  }
  await draw.press("Enter");
  report.drawn_items = await page.locator("[data-testid=mask-list] li").count();
  await page.getByTestId("submit").click();
  await page.waitForFunction(
    (first) => {
      const box = document.querySelector("[data-testid=job-status]");
      const id = box.querySelector(".job-id")?.textContent;
      return id && id !== first && ["succeeded", "failed", "canceled"].includes(box.dataset.status);
    },
    report.job_id,
    { timeout: 60000 },
  );
  report.drawn_job = {
    id: await status.locator(".job-id").first().textContent(),
    status: await status.getAttribute("data-status"),
    text: (await status.innerText()).replace(/\s+/g, " ").trim(),
  };
  step("drawn polygon job");

  // A job from prompts alone: a box dragged around the ball, segmented by the worker; its
  // mask shows over the photo and downloads as a PNG.
  while ((await removeButtons.count()) > 0) await removeButtons.first().click();
  await page.getByTestId("tool-box").check();
  {
    const b = await draw.boundingBox();
    await page.mouse.move(b.x + 0.125 * b.width, b.y + 0.333 * b.height);
    await page.mouse.down();
    await page.mouse.move(b.x + 0.3 * b.width, b.y + 0.55 * b.height, { steps: 4 });
    await page.mouse.move(b.x + 0.469 * b.width, b.y + 0.792 * b.height, { steps: 4 });
    await page.mouse.up();
  }
  report.prompt_item = await page.locator("[data-testid=mask-list] li").first().innerText();
  await page.getByTestId("submit").click();
  await page.waitForFunction(
    (before) => {
      const box = document.querySelector("[data-testid=job-status]");
      const id = box.querySelector(".job-id")?.textContent;
      return id && id !== before && ["succeeded", "failed", "canceled"].includes(box.dataset.status);
    },
    report.drawn_job.id,
    { timeout: 60000 },
  );
  report.prompt_job = {
    id: await status.locator(".job-id").first().textContent(),
    status: await status.getAttribute("data-status"),
    text: (await status.innerText()).replace(/\s+/g, " ").trim(),
  };
  await page.locator("#job-masks:not([hidden])").waitFor({ timeout: 20000 });
  report.prompt_mask_links = await page.locator("[data-testid=mask-downloads] a").allInnerTexts();
  report.prompt_mask_pixels = await page.evaluate(() => {
    const c = document.querySelector("[data-testid=mask-canvas]");
    const ctx = c.getContext("2d");
    const at = (x, y) => Array.from(ctx.getImageData(x, y, 1, 1).data);
    return { size: [c.width, c.height], ball: at(190, 270), sky: at(20, 20) };
  });
  await page.getByTestId("tool-polygon").check();
  step("prompted job");

  // A COCO file as the masks; first with a bad option: the service's error shows in the form.
  if (args.coco) {
    while ((await removeButtons.count()) > 0) await removeButtons.first().click();
    await page.getByTestId("masks-input").setInputFiles(args.coco);
    await page.locator("[data-testid=mask-list] li").first().waitFor({ timeout: 10000 });
    report.coco_item = await page.locator("[data-testid=mask-list] li").first().innerText();
    await options.fill('{"splats": -5}');
    await options.press("Enter");
    await page.locator("#form-error:not(:empty)").waitFor({ timeout: 10000 });
    report.bad_option_error = await page.locator("#form-error").textContent();
    await options.fill(args.options || "");
    const drawnId = report.prompt_job?.id || report.drawn_job.id; // the job on show before
    await options.press("Enter");
    await page.waitForFunction(
      (previous) => {
        const box = document.querySelector("[data-testid=job-status]");
        const id = box.querySelector(".job-id")?.textContent;
        return id && id !== previous && ["succeeded", "failed", "canceled"].includes(box.dataset.status);
      },
      drawnId,
      { timeout: 60000 },
    );
    report.coco_job = {
      id: await status.locator(".job-id").first().textContent(),
      status: await status.getAttribute("data-status"),
      text: (await status.innerText()).replace(/\s+/g, " ").trim(),
    };
    step("coco job");
  }

  // Keyboard: from the top of a fresh load, Tab reaches the form's controls in order, each
  // with a visible focus ring.
  await page.reload({ waitUntil: "load" });
  const focusable = [];
  for (let i = 0; i < 6; i++) {
    await page.keyboard.press("Tab");
    focusable.push(
      await page.evaluate(() => {
        const a = document.activeElement;
        const style = getComputedStyle(a);
        return {
          id: a.dataset.testid || a.id || a.tagName.toLowerCase(),
          ring: style.outlineStyle !== "none" && parseFloat(style.outlineWidth) > 0,
        };
      }),
    );
  }
  report.tab_order = focusable;
  report.recent_after_reload = await page.locator("[data-testid=recent-jobs] li").count();
  report.ok = true;
} catch (err) {
  report.ok = err instanceof Done;
  if (!report.ok) report.error = String(err.stack || err);
} finally {
  if (context) await context.close();
  rmSync(profile, { recursive: true, force: true });
  report.timings.total = (Date.now() - started) / 1000;
  process.stdout.write(`${JSON.stringify(report)}\n`);
}
