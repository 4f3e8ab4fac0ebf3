// The dashboard in a real browser: starts the canaryd binary on port 0, opens its dashboard in
// headless Chromium (the system's, through playwright-core), feeds a canary scenario (feed.mjs) in
// steps and checks the page as it updates itself, without a reload: the app and both versions
// appear, the canary's badge turns `failing` after the fault, the checks table names the failing
// feature, the charts have points, the failure's webhook shows as delivered, nothing shifts while
// it polls, and a phone-width page does not scroll sideways. Screenshots go to the output folder.
//
//   node tests/browser/dashboard.test.mjs
//
// CANARYD_TEST_BIN (default target/debug/canaryd), CHROMIUM_PATH (default /usr/bin/chromium) and
// CANARYD_BROWSER_OUT (default target/browser-test) override the paths. Every wait has a deadline;
// the daemon is killed whatever happens.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";

import { APP, CANARY, END_S, ENV, FAULT_AT_S, STABLE, STABLE_ONLY_S, feed, originNow } from "./feed.mjs";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const binary = process.env.CANARYD_TEST_BIN || path.join(root, "target/debug/canaryd");
const chromiumPath = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const outDir = path.resolve(process.env.CANARYD_BROWSER_OUT || path.join(root, "target/browser-test"));

const READY_TIMEOUT_MS = 30_000;
const UI_TIMEOUT_MS = 20_000;
const VERDICT_TIMEOUT_MS = 60_000;

const cleanups = [];
let daemon = null;
/** The page under test, for a screenshot when a check fails. */
let current = null;

function log(message) {
  console.log(`[browser-test] ${message}`);
}

/** Waits for `condition()` to return a truthy value, polling, up to a deadline. */
async function until(what, timeoutMs, condition) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

function startDaemon(dataDir) {
  const logPath = path.join(outDir, "canaryd.log");
  const logFd = fs.openSync(logPath, "w");
  const args = [
    "serve",
    "--data-dir", dataDir,
    "--otlp-grpc-addr", "127.0.0.1:0",
    "--otlp-http-addr", "127.0.0.1:0",
    "--http-addr", "127.0.0.1:0",
    "--models-dir", "./models",
  ];
  log(`starting ${binary} ${args.join(" ")}`);
  const child = spawn(binary, args, { cwd: root, stdio: ["ignore", logFd, logFd] });
  fs.closeSync(logFd);
  child.exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
  child.once("error", (e) => log(`cannot start canaryd: ${e.message}`));
  return child;
}

async function stopDaemon(child) {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill("SIGTERM");
  const stopped = await Promise.race([
    child.exited.then(() => true),
    new Promise((resolve) => setTimeout(() => resolve(false), 15_000)),
  ]);
  if (!stopped) {
    log("canaryd did not stop within 15 s of SIGTERM: killing it");
    child.kill("SIGKILL");
    await child.exited;
  }
}

/** A webhook receiver that takes every delivery (204). */
async function startReceiver() {
  const received = [];
  const server = http.createServer((req, res) => {
    let body = "";
    req.on("data", (chunk) => (body += chunk));
    req.on("end", () => {
      received.push({ headers: req.headers, body });
      res.writeHead(204).end();
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  cleanups.push(() => new Promise((resolve) => server.close(resolve)));
  return { url: `http://127.0.0.1:${server.address().port}/hook`, received };
}

async function main() {
  fs.mkdirSync(outDir, { recursive: true });
  for (const stale of fs.readdirSync(outDir)) fs.rmSync(path.join(outDir, stale), { recursive: true, force: true });
  if (!fs.existsSync(binary)) throw new Error(`no canaryd binary at ${binary}: run cargo build first`);
  if (!fs.existsSync(chromiumPath)) throw new Error(`no Chromium at ${chromiumPath}`);

  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), "canaryd-browser-"));
  cleanups.push(() => fs.rmSync(dataDir, { recursive: true, force: true }));
  daemon = startDaemon(dataDir);

  const addrsPath = path.join(dataDir, "addrs.json");
  const addrs = await until("canaryd to write addrs.json", READY_TIMEOUT_MS, () => {
    if (daemon.exitCode !== null) throw new Error(`canaryd exited (${daemon.exitCode}); see ${outDir}/canaryd.log`);
    try {
      return JSON.parse(fs.readFileSync(addrsPath, "utf8"));
    } catch {
      return null; // not written yet, or half written
    }
  });
  const api = `http://${addrs.http}`;
  const otlp = `http://${addrs.otlp_http}`;
  log(`canaryd is up: API ${api}, OTLP/HTTP ${otlp}`);

  const receiver = await startReceiver();
  const sub = await fetch(`${api}/api/v1/subscriptions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      url: receiver.url,
      events: ["canaryd.canary.started", "canaryd.canary.failed", "canaryd.canary.stage_passed", "canaryd.canary.promoted"],
    }),
  });
  assert.equal(sub.status, 201, `subscription: ${await sub.text()}`);

  const browser = await chromium.launch({
    executablePath: chromiumPath,
    headless: true,
    // Root in a container has no user namespaces for Chromium's sandbox.
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  });
  cleanups.push(() => browser.close());
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, colorScheme: "light" });
  const page = await context.newPage();
  current = page;
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => m.type() === "error" && problems.push(`console error: ${m.text()}`));

  await page.goto(`${api}/`);
  await page.waitForSelector("#apps-view:not([hidden])", { timeout: UI_TIMEOUT_MS });
  await page.waitForSelector("#apps-empty:not([hidden])", { timeout: UI_TIMEOUT_MS });
  await page.waitForSelector('#live[data-ok="true"]', { timeout: UI_TIMEOUT_MS });
  // A mark that a reload would wipe out.
  await page.evaluate(() => (window.__sameDocument = true));

  const origin = originNow();
  log(`feeding ${STABLE_ONLY_S} s of ${STABLE} alone`);
  await feed(otlp, 0, STABLE_ONLY_S, origin);
  const row = `#apps-table tr[data-app="${APP}"][data-env="${ENV}"]`;
  await page.waitForSelector(`${row} .chip[data-version="${STABLE}"][data-role="stable"]`, { timeout: UI_TIMEOUT_MS });
  assert.equal(await page.isHidden("#apps-empty"), true, "the empty note goes once an app is seen");

  // The rollout is declared with a traffic plan once the app is known; the page shows the plan
  // and where its route went.
  const declared = await fetch(`${api}/api/v1/apps/${APP}/rollout?env=${ENV}`, {
    method: "PUT",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      stable_version: STABLE,
      canary_version: CANARY,
      traffic: {
        sticky: { header: "x-user-id" },
        headers: [{ name: "x-canary", value: "always" }],
        users: ["alice@example.com", "bob@example.com"],
      },
    }),
  });
  assert.equal(declared.status, 200, `rollout: ${await declared.text()}`);

  log(`feeding ${FAULT_AT_S - STABLE_ONLY_S} s with ${CANARY} at 10%, healthy`);
  await feed(otlp, STABLE_ONLY_S, FAULT_AT_S, origin);
  await page.waitForSelector(`${row} .chip[data-version="${CANARY}"][data-role="canary"]`, { timeout: UI_TIMEOUT_MS });
  await page.waitForSelector(`${row} .badge`, { timeout: UI_TIMEOUT_MS });

  await page.click(`${row} a`);
  await page.waitForSelector("#app-view:not([hidden])", { timeout: UI_TIMEOUT_MS });
  await page.waitForSelector(`#app-versions .chip[data-version="${STABLE}"][data-role="stable"]`, { timeout: UI_TIMEOUT_MS });
  await page.waitForSelector(`#app-versions .chip[data-version="${CANARY}"][data-role="canary"]`, { timeout: UI_TIMEOUT_MS });
  assert.equal(await page.textContent("#app-title"), APP);
  await page.waitForSelector('#chart-request_rate circle.pt.canary', { timeout: UI_TIMEOUT_MS });
  await page.waitForSelector("#traffic-plan:not([hidden])", { timeout: UI_TIMEOUT_MS });
  const plan = await page.textContent("#traffic-plan");
  for (const part of ["sticky by header x-user-id", "x-canary: always → canary", "2 allow-listed users"]) {
    assert.ok(plan.includes(part), `the plan shows ${part}: ${plan}`);
  }
  await until("the started route shown as delivered", UI_TIMEOUT_MS, async () =>
    (await page.textContent("#traffic-plan")).includes(`(canary.started): ${receiver.url} delivered`),
  );
  const before = await page.getAttribute("#app-badge", "data-state");
  log(`before the fault the canary is ${before}`);
  assert.notEqual(before, "failing", "a healthy canary is not failing before its fault");
  assert.notEqual(before, "none", "the analysis has started");

  log(`feeding ${END_S - FAULT_AT_S} s with ${CANARY} failing 30% of its requests`);
  await feed(otlp, FAULT_AT_S, END_S, origin);
  await page.waitForSelector('#app-badge[data-state="failing"]', { timeout: VERDICT_TIMEOUT_MS });
  assert.equal((await page.textContent("#app-badge")).trim(), "failing");

  // The checks table names the failing feature, with its values and reason.
  const failing = page.locator('#checks-table tr[data-outcome="fail"][data-feature="error_ratio"]');
  await failing.waitFor({ timeout: UI_TIMEOUT_MS });
  const failingText = await failing.innerText();
  assert.match(failingText, /error_ratio/);
  assert.match(failingText, /fisher_exact/);
  assert.match(failingText, /error ratio .* against the stable's/);

  // The charts have points of both versions, and the learned band behind them.
  for (const feature of ["request_rate", "error_ratio", "latency_p50_ms", "latency_p99_ms"]) {
    const chart = `#chart-${feature}`;
    const canaryPoints = await page.locator(`${chart} circle.pt.canary`).count();
    const stablePoints = await page.locator(`${chart} circle.pt.stable`).count();
    assert.ok(canaryPoints >= 5 && stablePoints >= 5, `${feature}: ${canaryPoints} canary, ${stablePoints} stable points`);
    assert.equal(await page.locator(`${chart} rect.band`).count(), 1, `${feature}: the learned band is drawn`);
  }
  // The call graph marks the edge only the canary has; the mix lists every operation.
  await page.waitForSelector('#calls-table tr[data-status="new"]', { timeout: UI_TIMEOUT_MS });
  assert.match(await page.locator('#calls-table tr[data-status="new"]').innerText(), /fraud-check/);
  assert.equal(await page.locator("#mix-table tbody tr").count(), 5);
  // The failure's event, and its webhook delivered.
  const failedEvent = '#events-table tr[data-type="canaryd.canary.failed"]';
  await page.waitForSelector(`${failedEvent} .badge[data-state="delivered"]`, { timeout: UI_TIMEOUT_MS });
  await page.waitForSelector('#stages .stage[data-status="failed"]', { timeout: UI_TIMEOUT_MS });
  assert.ok(receiver.received.some((r) => r.body.includes('"canaryd.canary.failed"')), "the receiver got the failure");

  // Live: no reload happened, and polling moves nothing on the page.
  assert.equal(await page.evaluate(() => window.__sameDocument), true, "the page updated itself without a reload");
  await page.evaluate(() => {
    window.__shift = 0;
    new PerformanceObserver((list) => {
      for (const entry of list.getEntries()) if (!entry.hadRecentInput) window.__shift += entry.value;
    }).observe({ type: "layout-shift" });
  });
  for (let i = 0; i < 2; i++) {
    const text = await page.textContent("#live");
    await page.waitForFunction((previous) => document.getElementById("live").textContent !== previous, text, {
      timeout: UI_TIMEOUT_MS,
    });
  }
  const shift = await page.evaluate(() => window.__shift);
  assert.ok(shift < 0.01, `polling shifted the layout (cumulative layout shift ${shift})`);

  await page.screenshot({ path: path.join(outDir, "dashboard.png"), fullPage: true });
  await page.goto(`${api}/`);
  await page.waitForSelector(`${row} .badge[data-state="failing"]`, { timeout: UI_TIMEOUT_MS });
  await page.screenshot({ path: path.join(outDir, "apps.png") });

  // A phone, in the dark: the same page fits its width.
  const phone = await browser.newContext({
    viewport: { width: 390, height: 844 },
    deviceScaleFactor: 2,
    isMobile: true,
    hasTouch: true,
    colorScheme: "dark",
  });
  const phonePage = await phone.newPage();
  current = phonePage;
  phonePage.on("pageerror", (e) => problems.push(`phone page error: ${e.message}`));
  await phonePage.goto(`${api}/#/app/${encodeURIComponent(ENV)}/${encodeURIComponent(APP)}`);
  await phonePage.waitForSelector('#app-badge[data-state="failing"]', { timeout: UI_TIMEOUT_MS });
  await phonePage.waitForSelector('#chart-error_ratio circle.pt.canary', { timeout: UI_TIMEOUT_MS });
  const overflow = await phonePage.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `the phone-width page scrolls sideways by ${overflow} px`);
  const background = await phonePage.evaluate(() => getComputedStyle(document.body).backgroundColor);
  assert.notEqual(background, "rgb(246, 247, 249)", "dark mode has its own colours");
  await phonePage.screenshot({ path: path.join(outDir, "dashboard-phone-dark.png"), fullPage: true });

  // Operators act from the dashboard (issue 20, item 5): each action asks for confirmation, and
  // is an event. Pause the failed canary's analysis, then promote it over the failure.
  current = page;
  await page.goto(`${api}/#/app/${encodeURIComponent(ENV)}/${encodeURIComponent(APP)}`);
  await page.waitForSelector('#app-badge[data-state="failing"]', { timeout: UI_TIMEOUT_MS });
  await page.waitForSelector('#app-actions:not([hidden])', { timeout: UI_TIMEOUT_MS });
  assert.equal(await page.isHidden('#app-actions button[data-operation="abort"]'), true, "a failed canary cannot be aborted");
  const dialogs = [];
  page.on("dialog", (dialog) => {
    dialogs.push(dialog.message());
    dialog.accept();
  });
  await page.click('#app-actions button[data-operation="pause"]');
  await page.waitForSelector('#app-actions[data-paused="true"]', { timeout: UI_TIMEOUT_MS });
  await page.waitForSelector('#events-table tr[data-type="canaryd.canary.paused"]', { timeout: UI_TIMEOUT_MS });
  assert.equal(await page.isHidden('#app-actions button[data-operation="pause"]'), true, "paused: resume, not pause");
  await page.click('#app-actions button[data-operation="promote"]');
  await page.waitForSelector('#app-badge[data-state="promoted"]', { timeout: UI_TIMEOUT_MS });
  await page.waitForSelector('#events-table tr[data-type="canaryd.canary.promoted"]', { timeout: UI_TIMEOUT_MS });
  await page.waitForSelector("#app-actions[hidden]", { state: "attached", timeout: UI_TIMEOUT_MS });
  assert.equal(dialogs.length, 2, `one confirmation per action: ${dialogs}`);
  assert.match(dialogs[0], /^Pause the analysis of /);
  assert.match(dialogs[1], /^Promote .* now\?/);
  await until("the promotion delivered to the receiver", UI_TIMEOUT_MS, () =>
    receiver.received.some((r) => r.body.includes('"canaryd.canary.promoted"')),
  );
  await page.screenshot({ path: path.join(outDir, "dashboard-promoted.png"), fullPage: true });

  assert.deepEqual(problems, [], "the page logged no errors");
  log(`passed; screenshots in ${outDir}`);
}

let failed = false;
const onSignal = (signal) => {
  if (daemon && daemon.exitCode === null) daemon.kill("SIGKILL");
  process.exit(signal === "SIGINT" ? 130 : 143);
};
process.once("SIGINT", onSignal);
process.once("SIGTERM", onSignal);
process.once("exit", () => daemon && daemon.exitCode === null && daemon.kill("SIGKILL"));

try {
  await main();
} catch (e) {
  failed = true;
  console.error(`[browser-test] FAILED: ${e.stack || e}`);
  if (current) {
    await current.screenshot({ path: path.join(outDir, "failure.png"), fullPage: true }).catch(() => {});
  }
  const logPath = path.join(outDir, "canaryd.log");
  if (fs.existsSync(logPath)) {
    const tail = fs.readFileSync(logPath, "utf8").split("\n").slice(-30).join("\n");
    console.error(`[browser-test] canaryd log tail:\n${tail}`);
  }
} finally {
  if (daemon) await stopDaemon(daemon);
  for (const cleanup of cleanups.reverse()) {
    try {
      await cleanup();
    } catch (e) {
      console.error(`[browser-test] cleanup: ${e.message}`);
    }
  }
}
process.exit(failed ? 1 : 0);
