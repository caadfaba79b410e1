// The CI smoke run (about 12 s): a few WebSocket listeners receiving what they sent themselves over
// REST, and a REST user doing send, history and read, at once. tests/k6_smoke.rs runs it against the
// real server and fails when k6 exits non-zero, that is when a threshold below fails.
//
//   k6 run -e BASE_URL=http://127.0.0.1:8080 loadtest/k6/ci_smoke.js
//
// The thresholds are about correctness only: every check passes, no request fails, and every promised
// notification arrives within WAIT_MS (default 10000: a liveness bound, not a latency one). Latency
// thresholds belong to the load scripts (ws_receive.js, rest.js, mixed.js): a CI machine shared with
// builds makes latency a flaky verdict.
// Env: BASE_URL, DURATION (default 10s), WAIT_MS.

import { check, sleep } from 'k6';
import {
  channelName, history, listen, markRead, sendNotification, sendNotificationAsync, setupRun, userId,
} from './lib.js';

const DURATION = __ENV.DURATION || '10s';
const WAIT_MS = parseInt(__ENV.WAIT_MS || '10000', 10);
// A pause between rounds keeps the smoke run light (tens of requests a second): CI shares its cores.
const PAUSE_S = 0.2;

export const options = {
  scenarios: {
    websocket: { executor: 'constant-vus', exec: 'websocket', vus: 4, duration: DURATION },
    rest: { executor: 'constant-vus', exec: 'rest', vus: 2, duration: DURATION },
  },
  thresholds: {
    checks: ['rate==1'],
    http_req_failed: ['rate==0'],
    notif_delivered: ['rate==1'],
    // At least one WebSocket round and one REST round must have completed: an empty run is a failure.
    'iterations{scenario:websocket}': ['count>0'],
    'iterations{scenario:rest}': ['count>0'],
  },
};

export const setup = setupRun;

export function websocket({ run }) {
  sleep(PAUSE_S);
  const user = userId(run, `smoke-ws-${__VU}-${__ITER}`);
  const channel = channelName(run, `smoke-${__VU}-${__ITER}`);
  listen({
    user,
    channels: [channel],
    expected: 4,
    timeoutMs: WAIT_MS,
    onReady: () => {
      sendNotificationAsync({ user_id: user }, 0);
      sendNotificationAsync({ user_id: user }, 1);
      sendNotificationAsync({ channels: [channel] }, 2);
      sendNotificationAsync({ channels: [channel] }, 3);
    },
  });
}

export function rest({ run }) {
  sleep(PAUSE_S);
  const user = userId(run, `smoke-rest-${__VU}`);
  const id = sendNotification({ user_id: user }, __ITER);
  if (id === null) return;
  const page = history(user, 'limit=5');
  check(page, { 'history: newest first is the one just sent': (p) => p !== null && p.notifications[0].id === id });
  markRead(user, id);
}
