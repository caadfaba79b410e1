// Mixed traffic, the three kinds at once, as a deployment sees them:
// - listeners: WebSocket connections held HOLD_S seconds each (then reconnected), every one a user of a
//   fixed pool and subscribed to one of ROOMS channels; some publish to their room now and then;
// - producers: REST sends at SEND_RATE per second, to a random pool user or a random room;
// - readers: history pages of random pool users at READ_RATE per second.
// Delivery latency (producer send -> listener frame) and publish latency (client -> other subscriber)
// are recorded; thresholds cover correctness (checks, failed requests) and latency.
//
//   k6 run -e BASE_URL=http://127.0.0.1:8080 loadtest/k6/mixed.js
//
// Env: BASE_URL, LISTENERS (default 200), ROOMS (default 10), HOLD_S (default 20), SEND_RATE (default
// 100), READ_RATE (default 20), PUBLISH_EVERY_MS (a listener in ten publishes this often, default 2000),
// DURATION (default 60s).

import { channelName, history, listen, sendNotification, setupRun, userId } from './lib.js';

const LISTENERS = parseInt(__ENV.LISTENERS || '200', 10);
const ROOMS = parseInt(__ENV.ROOMS || '10', 10);
const HOLD_S = parseInt(__ENV.HOLD_S || '20', 10);
const SEND_RATE = parseInt(__ENV.SEND_RATE || '100', 10);
const READ_RATE = parseInt(__ENV.READ_RATE || '20', 10);
const PUBLISH_EVERY_MS = parseInt(__ENV.PUBLISH_EVERY_MS || '2000', 10);
const DURATION = __ENV.DURATION || '60s';
// The users the listeners connect as and the producers and readers target.
const POOL = LISTENERS;

export const options = {
  scenarios: {
    listeners: { executor: 'constant-vus', exec: 'listener', vus: LISTENERS, duration: DURATION },
    producers: {
      executor: 'constant-arrival-rate', exec: 'producer', rate: SEND_RATE, timeUnit: '1s',
      duration: DURATION, preAllocatedVUs: 20, maxVUs: 100,
      // Let the listeners connect first, so early sends find them.
      startTime: '2s',
    },
    readers: {
      executor: 'constant-arrival-rate', exec: 'reader', rate: READ_RATE, timeUnit: '1s',
      duration: DURATION, preAllocatedVUs: 5, maxVUs: 50, startTime: '2s',
    },
  },
  thresholds: {
    checks: ['rate>0.99'],
    http_req_failed: ['rate<0.01'],
    'http_req_duration{scenario:producers}': ['p(95)<200'],
    'http_req_duration{scenario:readers}': ['p(95)<300'],
    notif_delivery_ms: ['p(95)<300'],
    notif_publish_ms: ['p(95)<300'],
    // Listeners and producers agree on names only through setup()'s run id: zero deliveries means not.
    notif_received: ['count>0'],
    ws_connecting: ['p(95)<1000'],
  },
};

function poolUser(run, n) {
  return userId(run, `mixed-u${n}`);
}

function room(run, n) {
  return channelName(run, `mixed-room${n}`);
}

function randomInt(below) {
  return Math.floor(Math.random() * below);
}

export const setup = setupRun;

export function listener({ run }) {
  // VU numbers are global over scenarios; the modulo only spreads listeners over the pool.
  const n = __VU % POOL;
  listen({
    user: poolUser(run, n),
    channels: [room(run, n % ROOMS)],
    expected: null,
    timeoutMs: HOLD_S * 1000,
    publishEveryMs: n % 10 === 0 ? PUBLISH_EVERY_MS : 0,
  });
}

export function producer({ run }) {
  if (Math.random() < 0.5) {
    sendNotification({ user_id: poolUser(run, randomInt(POOL)) }, __ITER);
  } else {
    sendNotification({ channels: [room(run, randomInt(ROOMS))] }, __ITER);
  }
}

export function reader({ run }) {
  history(poolUser(run, randomInt(POOL)), 'limit=20');
}
