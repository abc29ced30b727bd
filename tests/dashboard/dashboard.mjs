// Drives the natter dashboard in headless Chromium: model picker, a streamed
// answer with its metrics line, the Stop button, an error shown in the page, and
// a phone-width layout. Usage: node dashboard.mjs <base-url>
import { chromium } from "playwright-core";
import assert from "node:assert/strict";

const base = process.argv[2];
assert.ok(base, "usage: node dashboard.mjs <base-url>");

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const step = (name) => console.log(`dashboard: ${name}`);
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(e.message));
  await page.goto(base);

  step("the model picker is fed by /v1/models");
  await page.waitForFunction(() => document.querySelectorAll("#model option").length > 0, null, { timeout: 30000 });
  const model = await page.$eval("#model", (s) => s.value);
  assert.equal(model, "smollm2-135m-instruct");

  step("a question streams into an answer with a metrics line");
  await page.fill("#temperature", "0");
  await page.fill("#max_tokens", "40");
  await page.dispatchEvent("#max_tokens", "change");
  await page.fill("#prompt", "What is the capital of France?");
  await page.click("#send");
  await page.waitForSelector(".msg.assistant .metrics", { timeout: 120000 });
  const answer = await page.$eval(".msg.assistant span", (e) => e.textContent);
  assert.match(answer, /Paris/);
  const metrics = await page.$eval(".msg.assistant .metrics", (e) => e.textContent);
  assert.match(metrics, /tokens\/s/);
  assert.match(metrics, /prompt \+ \d+ tokens/);

  step("Stop cancels a long answer on the worker");
  await page.fill("#max_tokens", "2000");
  await page.fill("#temperature", "0.8");
  await page.fill("#prompt", "Write a very long story about a dragon and a knight.");
  await page.click("#send");
  await page.waitForFunction(() => {
    const spans = document.querySelectorAll(".msg.assistant span");
    return spans.length === 2 && spans[1].textContent.length > 20;
  }, null, { timeout: 120000 });
  await page.click("#stop");
  await page.waitForFunction(() => document.querySelectorAll(".msg.assistant .error").length === 1, null, { timeout: 10000 });
  assert.equal(await page.$eval(".msg.assistant:last-child .error", (e) => e.textContent), "Stopped.");
  assert.equal(await page.$eval("#send", (b) => b.disabled), false);

  step("errors are readable messages in the page");
  await page.fill("#max_tokens", "999999");
  await page.fill("#prompt", "hello");
  await page.click("#send");
  await page.waitForFunction(() => document.querySelectorAll(".msg.assistant .error").length === 2, null, { timeout: 10000 });
  const error = await page.$eval(".msg.assistant:last-child .error", (e) => e.textContent);
  assert.match(error, /^Error: max_tokens must be between/);

  step("settings persist across a reload; the fleet is listed");
  await page.fill("#max_tokens", "64");
  await page.dispatchEvent("#max_tokens", "change");
  await page.reload();
  assert.equal(await page.$eval("#max_tokens", (e) => e.value), "64");
  await page.waitForFunction(() => document.querySelector("#fleet").textContent.includes("smollm2-135m-instruct"), null, { timeout: 15000 });

  step("the NER tab highlights entities with a legend and timing");
  await page.click("#tab-ner");
  assert.equal(await page.isVisible("#chat-panel"), false);
  await page.fill("#ner-text", "Hi, I'm Zoë Martínez, write to zoe.martinez@example.org; I live at 42 Oak Street, Springfield.");
  await page.click("#ner-run");
  await page.waitForSelector("#ner-output mark", { timeout: 30000 });
  const marks = await page.$$eval("#ner-output mark", (ms) => ms.map((m) => [m.dataset.label, m.firstChild.textContent]));
  const byLabel = Object.fromEntries(marks);
  assert.equal(byLabel.GIVEN_NAME, "Zoë");
  assert.equal(byLabel.EMAIL, "zoe.martinez@example.org");
  assert.equal(byLabel.CITY, "Springfield");
  const legend = await page.$$eval("#ner-legend span", (ss) => ss.map((s) => s.textContent));
  assert.ok(legend.includes("EMAIL") && legend.includes("CITY"), legend.join(","));
  assert.match(await page.textContent("#ner-meta"), /entities · \d+ tokens · [\d.]+ ms/);
  await page.fill("#ner-text", "   ");
  await page.click("#ner-run");
  await page.waitForSelector("#ner-output .error", { timeout: 10000 });
  assert.match(await page.textContent("#ner-output .error"), /empty/);

  step("phone-width layout has no horizontal scrolling");
  const phone = await browser.newPage({ viewport: { width: 375, height: 740 } });
  await phone.goto(base);
  await phone.waitForFunction(() => document.querySelectorAll("#model option").length > 0, null, { timeout: 30000 });
  const overflow = await phone.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `page is ${overflow}px wider than the phone screen`);
  const sendBox = await phone.$eval("#send", (b) => b.getBoundingClientRect().right);
  assert.ok(sendBox <= 375, "the send button is on screen");

  assert.deepEqual(pageErrors, []);
  console.log("dashboard: all checks passed");
} finally {
  await browser.close();
}
