// REST: each iteration sends a notification to a user of its own, reads that user's history and finds
// it on the first page, marks it read, and every tenth iteration sends a batch and finds the unread
// count grown by the batch's size.
//
//   k6 run -e BASE_URL=http://127.0.0.1:8080 loadtest/k6/rest.js
//
// Env: BASE_URL, VUS (default 20), DURATION (default 30s), BATCH (batch size, default 100).

import { check } from 'k6';
import { history, markRead, sendBatch, sendNotification, setupRun, userId } from './lib.js';

const VUS = parseInt(__ENV.VUS || '20', 10);
const BATCH = parseInt(__ENV.BATCH || '100', 10);
const BATCH_EVERY = 10;

export const options = {
  scenarios: {
    rest: { executor: 'constant-vus', vus: VUS, duration: __ENV.DURATION || '30s' },
  },
  thresholds: {
    checks: ['rate>0.99'],
    http_req_failed: ['rate<0.01'],
    'http_req_duration{route:send}': ['p(95)<100'],
    'http_req_duration{route:history}': ['p(95)<200'],
    'http_req_duration{route:read}': ['p(95)<100'],
    'http_req_duration{route:batch}': ['p(95)<1000'],
  },
};

export const setup = setupRun;

export default function ({ run }) {
  // One user per VU: its inbox is touched only by this VU, so what history shows is predictable.
  const user = userId(run, `rest-${__VU}`);
  const id = sendNotification({ user_id: user }, __ITER);
  if (id === null) return;

  const page = history(user, 'limit=10');
  check(page, { 'history: newest first is the one just sent': (p) => p !== null && p.notifications[0].id === id });

  markRead(user, id);

  if (__ITER % BATCH_EVERY === 0) {
    const before = history(user, 'unread=true&limit=1');
    const ids = sendBatch(user, BATCH);
    const after = history(user, 'unread=true&limit=1');
    check(null, {
      'batch: unread grows by the batch size': () =>
        before !== null && ids !== null && after !== null && after.unread === before.unread + BATCH,
    });
  }
}
