// Feeds canaryd a canary scenario as OTLP/JSON traces over HTTP, in event time, as fast as it takes.
//
// The app `checkout` (env `prod`) runs `1.4.2` alone at 100 requests/s with 0.1% errors for
// STABLE_ONLY_S seconds of event time; then `1.5.0` takes 10% of the traffic, healthy for
// CANARY_HEALTHY_S, after which it fails 30% of its requests and starts calling a new downstream
// (`fraud-check`) until END_S. Everything is drawn from a seeded generator, so every run sends the
// same spans (only the event-time origin moves with the clock).
//
// As a module: `feed(otlpHttpBase, fromS, toS, origin)` sends the seconds [fromS, toS).
// From the command line: `node feed.mjs http://127.0.0.1:4318` sends the whole scenario.

export const APP = "checkout";
export const ENV = "prod";
export const STABLE = "1.4.2";
export const CANARY = "1.5.0";
export const STABLE_ONLY_S = 180;
export const CANARY_HEALTHY_S = 60;
export const FAULT_AT_S = STABLE_ONLY_S + CANARY_HEALTHY_S;
export const END_S = FAULT_AT_S + 120;

const RPS = 100;
const CANARY_SHARE = 0.1;
const BASE_ERROR_RATE = 0.001;
const FAULT_ERROR_RATE = 0.3;
/// Seconds of event time per request: ~500 entry spans and their calls, ~0.5 MB of JSON.
const BATCH_S = 5;

const OPERATIONS = [
  { method: "GET", route: "/api/products", weight: 45, medianMs: 28, calls: [["catalog-db", 1, 4]] },
  { method: "GET", route: "/api/cart", weight: 25, medianMs: 18, calls: [["redis", 1, 0.8]] },
  { method: "POST", route: "/api/cart/items", weight: 15, medianMs: 35, calls: [["redis", 1, 1]] },
  {
    method: "POST",
    route: "/api/orders",
    weight: 10,
    medianMs: 140,
    calls: [["payments", 1, 70], ["orders-db", 2, 5]],
    faultCalls: [["fraud-check", 1, 25]],
  },
  { method: "GET", route: "/api/orders/{id}", weight: 5, medianMs: 30, calls: [["orders-db", 1, 4]] },
];
const TOTAL_WEIGHT = OPERATIONS.reduce((sum, op) => sum + op.weight, 0);

/// mulberry32: a small seeded generator, so that runs are repeatable.
function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function logNormal(random, median, sigma) {
  const u = Math.max(random(), 1e-12);
  const v = random();
  const z = Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
  return median * Math.exp(sigma * z);
}

function hex(random, bytes) {
  let out = "";
  for (let i = 0; i < bytes; i++) out += Math.floor(random() * 256).toString(16).padStart(2, "0");
  return out;
}

const str = (key, value) => ({ key, value: { stringValue: value } });
const int = (key, value) => ({ key, value: { intValue: String(value) } });

function resource(version) {
  return {
    attributes: [
      str("service.name", APP),
      str("service.version", version),
      str("deployment.environment.name", ENV),
    ],
  };
}

function pickOperation(random) {
  let x = random() * TOTAL_WEIGHT;
  for (const op of OPERATIONS) {
    x -= op.weight;
    if (x < 0) return op;
  }
  return OPERATIONS[OPERATIONS.length - 1];
}

/// The spans of one request ending at `endNs` (a BigInt): the SERVER span and its CLIENT calls.
function request(random, endNs, faulty) {
  const op = pickOperation(random);
  const traceId = hex(random, 16);
  const spanId = hex(random, 8);
  const durationMs = logNormal(random, op.medianMs, 0.4);
  const startNs = endNs - BigInt(Math.round(durationMs * 1e6));
  const failed = random() < (faulty ? FAULT_ERROR_RATE : BASE_ERROR_RATE);
  const status = failed ? 503 : op.method === "POST" ? 201 : 200;
  const spans = [
    {
      traceId,
      spanId,
      name: `${op.method} ${op.route}`,
      kind: 2,
      startTimeUnixNano: String(startNs),
      endTimeUnixNano: String(endNs),
      attributes: [
        str("http.request.method", op.method),
        str("http.route", op.route),
        int("http.response.status_code", status),
      ],
      status: failed ? { code: 2, message: "upstream unavailable" } : { code: 1 },
    },
  ];
  const calls = faulty && op.faultCalls ? op.calls.concat(op.faultCalls) : op.calls;
  for (const [peer, count, medianMs] of calls) {
    for (let i = 0; i < count; i++) {
      const callMs = Math.min(logNormal(random, medianMs, 0.4), durationMs);
      const callStart = startNs + BigInt(Math.round(random() * (durationMs - callMs) * 1e6));
      spans.push({
        traceId,
        spanId: hex(random, 8),
        parentSpanId: spanId,
        name: `call ${peer}`,
        kind: 3,
        startTimeUnixNano: String(callStart),
        endTimeUnixNano: String(callStart + BigInt(Math.round(callMs * 1e6))),
        attributes: [str("peer.service", peer)],
        status: { code: 0 },
      });
    }
  }
  return spans;
}

/// The OTLP request for event seconds [fromS, toS) after `origin` (unix seconds).
function batch(fromS, toS, origin) {
  const bySpans = { [STABLE]: [], [CANARY]: [] };
  for (let s = fromS; s < toS; s++) {
    // One generator per second, so that any split into batches sends the same spans.
    const random = rng(0xca7a11 + s);
    const canaryOn = s >= STABLE_ONLY_S;
    const faulty = s >= FAULT_AT_S;
    for (let i = 0; i < RPS; i++) {
      const offsetNs = BigInt(Math.floor(((i + random()) / RPS) * 1e9));
      const endNs = BigInt(origin + s) * 1_000_000_000n + offsetNs;
      const isCanary = canaryOn && random() < CANARY_SHARE;
      const version = isCanary ? CANARY : STABLE;
      bySpans[version].push(...request(random, endNs, isCanary && faulty));
    }
  }
  return {
    resourceSpans: Object.entries(bySpans)
      .filter(([, spans]) => spans.length > 0)
      .map(([version, spans]) => ({
        resource: resource(version),
        scopeSpans: [{ scope: { name: "canaryd-browser-test-feeder" }, spans }],
      })),
  };
}

async function post(url, body) {
  const deadline = Date.now() + 60_000;
  for (;;) {
    const response = await fetch(url, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body,
    });
    const text = await response.text();
    if (response.ok) {
      const answer = text ? JSON.parse(text) : {};
      if (answer.partialSuccess && Number(answer.partialSuccess.rejectedSpans || 0) > 0) {
        throw new Error(`canaryd rejected spans: ${text}`);
      }
      return;
    }
    // The engine's queue was full: OTLP clients retry after Retry-After.
    if (response.status === 503 && Date.now() < deadline) {
      const wait = Number(response.headers.get("retry-after") || 1);
      await new Promise((resolve) => setTimeout(resolve, Math.min(wait, 5) * 1000));
      continue;
    }
    throw new Error(`POST ${url}: ${response.status} ${text}`);
  }
}

/// The event-time origin (unix seconds) for a scenario that ends about now.
export function originNow() {
  const now = Math.floor(Date.now() / 1000);
  return now - (now % 10) - END_S;
}

/// Sends event seconds [fromS, toS) of the scenario to canaryd's OTLP/HTTP address.
export async function feed(otlpHttpBase, fromS, toS, origin) {
  const url = new URL("/v1/traces", otlpHttpBase).toString();
  for (let s = fromS; s < toS; s += BATCH_S) {
    await post(url, JSON.stringify(batch(s, Math.min(s + BATCH_S, toS), origin)));
  }
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const base = process.argv[2];
  if (!base) {
    console.error("usage: node feed.mjs http://127.0.0.1:4318");
    process.exit(2);
  }
  await feed(base, 0, END_S, originNow());
  console.log(`sent ${END_S} s of event time for ${APP} (${ENV}) to ${base}`);
}
