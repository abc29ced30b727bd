// The dashboard on a natter that asks for API keys: it asks for one, refuses
// a wrong one with the server's reason, keeps a right one across a reload.
// Usage: node keys.mjs <base-url> <key> <model>
import { chromium } from "playwright-core";
import assert from "node:assert/strict";

const [base, key, model] = process.argv.slice(2);
assert.ok(base && key && model, "usage: node keys.mjs <base-url> <key> <model>");

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const step = (name) => console.log(`keys: ${name}`);
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(e.message));
  await page.goto(base);

  step("the page asks for a key");
  await page.waitForSelector("#key-dialog[open]", { timeout: 30000 });
  assert.match(await page.textContent("#key-message"), /asks for an API key/);

  step("a wrong key is refused with the server's reason");
  await page.fill("#api-key", key + "-wrong");
  await page.click("#key-save");
  await page.waitForFunction(() => /refused/.test(document.getElementById("key-message").textContent)
    && document.getElementById("key-dialog").open, null, { timeout: 30000 });
  assert.match(await page.textContent("#key-message"), /Incorrect API key/);

  step("the right key loads the models");
  await page.fill("#api-key", key);
  await page.click("#key-save");
  await page.waitForFunction((m) => [...document.querySelectorAll("#model option")].some((o) => o.value === m),
    model, { timeout: 30000 });

  step("a reload keeps the key: no dialog, models listed");
  await page.reload();
  await page.waitForFunction((m) => [...document.querySelectorAll("#model option")].some((o) => o.value === m),
    model, { timeout: 30000 });
  assert.equal(await page.$eval("#key-dialog", (d) => d.open), false);

  step("a chat streams with the key");
  await page.fill("#max_tokens", "8");
  await page.dispatchEvent("#max_tokens", "change");
  await page.fill("#prompt", "Hello");
  await page.click("#send");
  await page.waitForSelector(".msg.assistant .metrics", { timeout: 120000 });

  assert.deepEqual(pageErrors, []);
  console.log("keys: all checks passed");
} finally {
  await browser.close();
}
