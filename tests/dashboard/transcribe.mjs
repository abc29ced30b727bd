// Drives the dashboard's Transcribe tab in headless Chromium: an uploaded voice
// note and a microphone recording (Chromium's fake microphone playing a spoken
// WAV) both come back as streamed segments with the language and real-time factor.
// Usage: node transcribe.mjs <base-url> <voice-note.ogg> <speech.wav> <expected words...>
import { chromium } from "playwright-core";
import assert from "node:assert/strict";

const [base, voiceNote, micWav, ...expected] = process.argv.slice(2);
assert.ok(base && voiceNote && micWav && expected.length, "usage: node transcribe.mjs <base> <ogg> <wav> <words...>");

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync",
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
         `--use-file-for-fake-audio-capture=${micWav}`],
});
const step = (name) => console.log(`transcribe: ${name}`);
const heard = (text) => {
  const lower = text.toLowerCase();
  const missing = expected.filter((w) => !lower.includes(w.toLowerCase()));
  assert.ok(missing.length <= Math.floor(expected.length / 5), `missing ${missing} in ${text}`);
};
try {
  const context = await browser.newContext({ viewport: { width: 1200, height: 900 } });
  await context.grantPermissions(["microphone"], { origin: base });
  const page = await context.newPage();
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(e.message));
  await page.goto(base);
  await page.click("#tab-transcribe");
  await page.waitForFunction(() => document.querySelectorAll("#asr-model option").length > 0, null, { timeout: 30000 });

  step("an uploaded voice note streams its segments, language and real-time factor");
  await page.setInputFiles("#asr-file", voiceNote);
  await page.waitForSelector("#asr-rtf[data-rtf]", { timeout: 180000 });
  const segments = await page.$$eval("#asr-segments li", (items) => items.map((li) => li.textContent));
  assert.ok(segments.length >= 2, `segments: ${segments}`);
  assert.match(segments[0], /^\[\d\d:\d\d\.\d → \d\d:\d\d\.\d\]/);
  heard(segments.join(" "));
  assert.equal(await page.$eval("#asr-language", (e) => e.dataset.language), "en");
  const rtf = Number(await page.$eval("#asr-rtf", (e) => e.dataset.rtf));
  assert.ok(rtf > 0 && rtf < 5, `real-time factor ${rtf}`);
  assert.equal(await page.$eval("#asr-error", (e) => e.textContent.trim()), "");

  step("a microphone recording is transcribed");
  await page.evaluate(() => document.querySelector("#asr-rtf").removeAttribute("data-rtf"));
  await page.click("#asr-record");
  await page.waitForTimeout(15000);
  await page.click("#asr-record");
  await page.waitForSelector("#asr-rtf[data-rtf]", { timeout: 180000 });
  const recorded = await page.$$eval("#asr-segments li", (items) => items.map((li) => li.textContent).join(" "));
  heard(recorded);

  step("a file that is not audio gets a readable error");
  await page.evaluate(() => document.querySelector("#asr-rtf").removeAttribute("data-rtf"));
  await page.setInputFiles("#asr-file", { name: "notes.txt", mimeType: "text/plain", buffer: Buffer.from("no audio here ".repeat(50)) });
  await page.waitForFunction(() => document.querySelector("#asr-error").textContent.trim().length > 0, null, { timeout: 60000 });
  assert.match(await page.$eval("#asr-error", (e) => e.textContent), /^Error: .*audio/i);

  step("the tab fits a phone");
  await page.setViewportSize({ width: 375, height: 800 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `horizontal overflow of ${overflow}px`);
  assert.deepEqual(pageErrors, []);
  console.log("transcribe: all checks passed");
} finally {
  await browser.close();
}
