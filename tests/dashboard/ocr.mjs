// Drives the dashboard's OCR tab in headless Chromium: a chosen image of known
// text comes back as lines with confidences, a box drawn over the image for
// each line (first as the lines stream in, then from the result), the stage
// timings, a working Copy button, and a clear error for a broken image; then a
// dropped image at phone width.
// Usage: node ocr.mjs <base-url> <image.png> <expected line...>
import { chromium } from "playwright-core";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

const [base, imagePath, ...expected] = process.argv.slice(2);
assert.ok(base && imagePath && expected.length, "usage: node ocr.mjs <base> <image.png> <lines...>");

/** Character edit distance over the expected length, whitespace runs as one space. */
function cer(want, got) {
  const norm = (s) => [...s.split(/\s+/).filter(Boolean).join(" ")];
  const [e, g] = [norm(want), norm(got)];
  let row = Array.from({ length: g.length + 1 }, (_, j) => j);
  for (let i = 1; i <= e.length; i++) {
    const next = [i];
    for (let j = 1; j <= g.length; j++) {
      next[j] = Math.min(row[j - 1] + (e[i - 1] === g[j - 1] ? 0 : 1), row[j] + 1, next[j - 1] + 1);
    }
    row = next;
  }
  return row[g.length] / e.length;
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const step = (name) => console.log(`ocr: ${name}`);

/** Drops the image on the tab as a file dragged from the desktop would be. */
async function dropImage(page) {
  const base64 = readFileSync(imagePath).toString("base64");
  await page.evaluate((data) => {
    const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
    const files = new DataTransfer();
    files.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
    const target = document.querySelector("#ocr-drop");
    for (const type of ["dragover", "drop"]) {
      target.dispatchEvent(new DragEvent(type, { dataTransfer: files, bubbles: true, cancelable: true }));
    }
  }, base64);
}

/** Gives the tab the image (picked, or dropped) and waits for the reading;
 * returns the lines' texts. */
async function readImage(page, how = "pick") {
  await page.evaluate(() => {
    document.querySelector("#ocr-timings").removeAttribute("data-wall-ms");
    // Counts every box ever drawn: lines streamed before the result, then the result's.
    window.boxesDrawn = 0;
    window.boxWatch?.disconnect();
    window.boxWatch = new MutationObserver((records) => {
      for (const r of records) window.boxesDrawn += [...r.addedNodes].filter((n) => n.localName === "polygon").length;
    });
    window.boxWatch.observe(document.querySelector("#ocr-boxes"), { childList: true });
  });
  if (how === "drop") await dropImage(page);
  else await page.setInputFiles("#ocr-file", imagePath);
  await page.waitForSelector("#ocr-timings[data-wall-ms]", { timeout: 120000 });
  assert.equal(await page.$eval("#ocr-error", (e) => e.textContent.trim()), "");
  const lines = await page.$$eval("#ocr-lines li", (items) => items.map((li) => li.firstChild.textContent));
  assert.equal(lines.length, expected.length, `lines: ${JSON.stringify(lines)}`);
  const rate = cer(expected.join("\n"), lines.join("\n"));
  assert.ok(rate <= 0.03, `CER ${rate.toFixed(3)}: ${JSON.stringify(lines)}`);
  return lines;
}

/** Every line has one box, and every box lies on the image as shown. */
async function checkBoxes(page, lineCount) {
  const { boxes, image } = await page.evaluate(() => {
    const rect = (e) => { const r = e.getBoundingClientRect(); return { left: r.left, top: r.top, right: r.right, bottom: r.bottom }; };
    return { boxes: [...document.querySelectorAll("#ocr-boxes polygon")].map(rect), image: rect(document.querySelector("#ocr-image")) };
  });
  assert.equal(boxes.length, lineCount, "one box per line");
  assert.ok(image.right - image.left > 50, `the preview is shown: ${JSON.stringify(image)}`);
  let previousTop = -Infinity;
  for (const b of boxes) {
    assert.ok(b.right - b.left > 10 && b.bottom - b.top > 3, `a visible box: ${JSON.stringify(b)}`);
    const inside = b.left >= image.left - 2 && b.right <= image.right + 2 && b.top >= image.top - 2 && b.bottom <= image.bottom + 2;
    assert.ok(inside, `box ${JSON.stringify(b)} lies on the image ${JSON.stringify(image)}`);
    assert.ok(b.top > previousTop, "boxes go down the page in reading order");
    previousTop = b.top;
  }
  const drawn = await page.evaluate(() => window.boxesDrawn);
  assert.ok(drawn >= 2 * lineCount, `boxes were drawn as lines streamed in, then from the result (${drawn} drawn)`);
}

try {
  const context = await browser.newContext({ viewport: { width: 1200, height: 900 } });
  await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: base });
  const page = await context.newPage();
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(e.message));
  await page.goto(base);
  await page.click("#tab-ocr");
  assert.equal(await page.isVisible("#ocr-panel"), true);
  assert.equal(await page.isVisible("#chat-panel"), false);
  await page.waitForFunction(() => document.querySelectorAll("#ocr-model option").length > 0, null, { timeout: 30000 });

  step("an uploaded image streams its lines, draws their boxes and shows the timings");
  const lines = await readImage(page);
  await checkBoxes(page, lines.length);
  const confidences = await page.$$eval("#ocr-lines li", (items) => items.map((li) => Number(li.dataset.confidence)));
  assert.ok(confidences.every((c) => c > 0.5 && c <= 1), `confidences ${confidences}`);
  assert.match(await page.$eval("#ocr-lines li .confidence", (e) => e.textContent), /^\d{1,3}%$/);
  const timings = await page.$eval("#ocr-timings", (e) => e.textContent);
  assert.match(timings, /decode .* · detect .* · classify .* · recognize .* on the worker · ppocr-v5/);
  const [width, height] = imageSize();
  assert.ok(timings.startsWith(`${width} × ${height} px`), timings);

  step("hovering a line highlights its box");
  await page.hover("#ocr-lines li:nth-child(2)");
  assert.equal(await page.$eval("#ocr-boxes polygon:nth-of-type(2)", (p) => p.classList.contains("active")), true);

  step("Copy puts the text on the clipboard");
  await page.click("#ocr-copy");
  await page.waitForFunction(() => document.querySelector("#ocr-copy").textContent === "Copied", null, { timeout: 5000 });
  const copied = await page.evaluate(() => navigator.clipboard.readText());
  assert.ok(cer(expected.join("\n"), copied) <= 0.03, `copied ${JSON.stringify(copied)}`);

  step("a broken image gets a readable error and no boxes");
  const png = readFileSync(imagePath);
  await page.setInputFiles("#ocr-file", { name: "broken.png", mimeType: "image/png", buffer: png.subarray(0, png.length / 2) });
  await page.waitForFunction(() => document.querySelector("#ocr-error").textContent.trim().length > 0, null, { timeout: 60000 });
  assert.match(await page.$eval("#ocr-error", (e) => e.textContent), /^Error: .*image/i);
  assert.equal(await page.$$eval("#ocr-boxes polygon", (p) => p.length), 0);
  assert.equal(await page.$eval("#ocr-copy", (b) => b.disabled), true);

  step("at phone width, a dropped image is read and its boxes still lie on it; nothing overflows");
  await page.setViewportSize({ width: 375, height: 800 });
  const phoneLines = await readImage(page, "drop");
  await checkBoxes(page, phoneLines.length);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `horizontal overflow of ${overflow}px`);
  assert.deepEqual(pageErrors, []);
  console.log("ocr: all checks passed");
} finally {
  await browser.close();
}

/** The PNG's width and height, from its IHDR chunk. */
function imageSize() {
  const png = readFileSync(imagePath);
  return [png.readUInt32BE(16), png.readUInt32BE(20)];
}
