// Drives the ops console in headless Chromium the way an on-call engineer would: sign in,
// open the dead-letter group, look at one message, replay the group, watch it empty,
// read the audit log, sign out. Run by e2e/tests/console.rs, which checks the system
// behind it; this script checks what the page shows.
//
// Env: COMMERCE_GATEWAY (http://127.0.0.1:<port>), COMMERCE_ADMIN_EMAIL,
// COMMERCE_ADMIN_PASSWORD, COMMERCE_GROUP (the group key to open), COMMERCE_GROUP_COUNT
// (its open messages); optional COMMERCE_CUSTOMER_EMAIL/_PASSWORD (a non-admin, who must
// be turned away), COMMERCE_CONSOLE_SCREENSHOT (where to save a screenshot of the groups),
// CHROMIUM (default /usr/bin/chromium), COMMERCE_BROWSER_DEADLINE_MS (per step, 60000).
// Prints one JSON line: {"ok": true, ...} or {"ok": false, "step", "error"}; exit 1 on failure.

import { chromium } from "playwright-core";

function env(name, fallback) {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`${name} is not set`);
  return value;
}

const gateway = env("COMMERCE_GATEWAY");
const adminEmail = env("COMMERCE_ADMIN_EMAIL");
const adminPassword = env("COMMERCE_ADMIN_PASSWORD");
const group = env("COMMERCE_GROUP");
const groupCount = Number(env("COMMERCE_GROUP_COUNT"));
const customerEmail = process.env.COMMERCE_CUSTOMER_EMAIL;
const customerPassword = process.env.COMMERCE_CUSTOMER_PASSWORD;
const screenshot = process.env.COMMERCE_CONSOLE_SCREENSHOT;
const executablePath = env("CHROMIUM", "/usr/bin/chromium");
const deadline = Number(env("COMMERCE_BROWSER_DEADLINE_MS", "60000"));

const result = { ok: false, step: "start" };
// Whatever the page complains about: policy violations, script errors, failed loads.
const complaints = [];

function step(name) {
  result.step = name;
}

/** The attribute selector for a value (keys hold ':' and hex, ids hold '-'). */
function attr(name, value) {
  return `[${name}="${value.replace(/["\\]/g, "\\$&")}"]`;
}

async function signIn(page, email, password) {
  await page.fill("#sign-in-form input[name=email]", email);
  await page.fill("#sign-in-form input[name=password]", password);
  await page.click("#sign-in-form button[type=submit]");
}

async function idle(page) {
  await page.waitForFunction(() => document.documentElement.dataset.busy === "false");
}

async function main(browser) {
  const context = await browser.newContext({ viewport: { width: 1440, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(deadline);
  page.on("console", (message) => {
    // Failed loads are reported below with their URL.
    if (message.type() === "error" && !message.text().startsWith("Failed to load resource")) {
      complaints.push(message.text());
    }
  });
  page.on("response", (response) => {
    if (response.status() >= 400) complaints.push(`${response.status()} ${response.url()}`);
  });
  page.on("pageerror", (error) => complaints.push(String(error)));

  step("open the console");
  await page.goto(`${gateway}/console`);
  await page.waitForSelector("#sign-in-form", { state: "visible" });

  if (customerEmail) {
    step("a customer is turned away");
    await signIn(page, customerEmail, customerPassword);
    await page.waitForSelector("#problem:has-text('Not an administrator')");
    result.customer_message = (await page.textContent("#problem")).trim();
    if (await page.isVisible("#console")) throw new Error("a customer got into the console");
    if (await page.evaluate(() => sessionStorage.length)) throw new Error("a customer's token was kept");
  }

  step("the admin signs in");
  await signIn(page, adminEmail, adminPassword);
  await page.waitForSelector("#who-email", { state: "visible" });
  result.signed_in_as = await page.textContent("#who-email");
  result.local_storage_items = await page.evaluate(() => localStorage.length);

  step("the group is listed");
  const row = page.locator(`#groups-table tbody tr${attr("data-key", group)}`);
  await row.waitFor();
  const cells = await row.locator("td").allTextContents();
  result.group_row = {
    service: cells[0],
    handler: cells[1],
    kind: cells[2],
    error: cells[3],
    count: Number(cells[4]),
    event_types: cells[7],
  };
  if (screenshot) {
    await page.screenshot({ path: screenshot, fullPage: true });
    result.screenshot = screenshot;
  }

  step("the group is opened");
  await row.locator("a").click();
  await page.waitForSelector(`#group-panel[data-state=ready][data-count="${groupCount}"]`);
  const messageIds = await page.$$eval("#messages-table tbody tr", (rows) => rows.map((r) => r.dataset.id));
  result.messages_before = messageIds;

  step("one message is opened");
  await page.click(`#messages-table tbody tr${attr("data-id", messageIds[0])} a`);
  await page.waitForSelector("#message-panel[data-state=ready]");
  const headers = await page.$$eval("#message-headers tbody tr td:first-child", (cells) =>
    cells.map((c) => c.textContent),
  );
  const body = await page.textContent("#message-body");
  result.message = {
    title: await page.textContent("#message-title"),
    error: await page.textContent("#message-error"),
    headers,
    body_is_pretty: body.includes('\n  "'),
  };

  step("back to the group, replay it (confirmed)");
  await page.click("#message-back");
  await page.waitForSelector(`#group-panel[data-state=ready][data-count="${groupCount}"]`);
  await page.click("#replay-group");
  await page.waitForSelector("#confirm[open]");
  result.confirm_text = await page.textContent("#confirm-text");
  await page.click("#confirm-ok");
  await page.waitForSelector("#notice:has-text('Replay queued')");
  result.replay_notice = (await page.textContent("#notice")).trim();

  step("the group empties");
  // Replayed messages leave the open list; refresh until the console shows that.
  const started = Date.now();
  for (;;) {
    await idle(page);
    const empty = await page.isVisible("#group-panel[data-state=ready][data-count='0'] #messages-empty");
    if (empty) break;
    if (Date.now() - started > deadline) throw new Error("the group did not empty in time");
    await page.click("#group-refresh");
  }
  result.group_empty = true;

  step("the audit log names the admin");
  await page.click(".tab[data-view=audit]");
  const entry = page.locator("#audit-table tbody tr").first();
  await entry.waitFor();
  const audit = await entry.locator("td").allTextContents();
  result.audit = {
    who: audit[1],
    operator: await entry.locator("td.operator").getAttribute("title"),
    action: audit[2],
    service: audit[3],
    group: audit[4],
    requested: Number(audit[5]),
    affected: Number(audit[6]),
    result: audit[7],
  };

  step("sign out");
  await page.click("#sign-out");
  await page.waitForSelector("#sign-in-form", { state: "visible" });
  result.session_items_after_sign_out = await page.evaluate(() => sessionStorage.length);

  result.complaints = complaints;
  result.ok = complaints.length === 0;
  if (!result.ok) result.error = "the page reported errors";
  await context.close();
}

// Chromium's sandbox cannot start as root (CI containers).
const args = process.getuid && process.getuid() === 0 ? ["--no-sandbox"] : [];
let browser;
try {
  browser = await chromium.launch({ executablePath, headless: true, args });
  await main(browser);
} catch (error) {
  result.ok = false;
  result.error = String(error && error.message ? error.message : error).split("\n")[0];
  result.complaints = complaints;
} finally {
  if (browser) await browser.close();
}
console.log(JSON.stringify(result));
process.exit(result.ok ? 0 : 1);
