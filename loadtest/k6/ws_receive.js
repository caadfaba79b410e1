// WebSocket receive: each iteration connects as a fresh user, subscribes to a channel of its own, sends
// itself notifications over REST (some to its user id, some to its channel) and checks that every one
// arrives over the WebSocket, in the right frame shape, with its delivery latency recorded.
//
//   k6 run -e BASE_URL=http://127.0.0.1:8080 loadtest/k6/ws_receive.js
//
// Env: BASE_URL, VUS (default 20), DURATION (default 30s), PER_USER and PER_CHANNEL (notifications per
// iteration to each target, default 5 and 5), WAIT_MS (how long an iteration waits for them, 10000).

import { channelName, listen, sendNotificationAsync, setupRun, userId } from './lib.js';

const VUS = parseInt(__ENV.VUS || '20', 10);
const PER_USER = parseInt(__ENV.PER_USER || '5', 10);
const PER_CHANNEL = parseInt(__ENV.PER_CHANNEL || '5', 10);
const WAIT_MS = parseInt(__ENV.WAIT_MS || '10000', 10);

export const options = {
  scenarios: {
    receive: { executor: 'constant-vus', vus: VUS, duration: __ENV.DURATION || '30s' },
  },
  thresholds: {
    checks: ['rate>0.99'],
    notif_delivered: ['rate>0.99'],
    http_req_failed: ['rate<0.01'],
    'http_req_duration{route:send}': ['p(95)<200'],
    notif_delivery_ms: ['p(95)<200'],
    ws_connecting: ['p(95)<500'],
  },
};

export const setup = setupRun;

export default function ({ run }) {
  const user = userId(run, `ws-${__VU}-${__ITER}`);
  const channel = channelName(run, `ws-${__VU}-${__ITER}`);
  listen({
    user,
    channels: [channel],
    expected: PER_USER + PER_CHANNEL,
    timeoutMs: WAIT_MS,
    onReady: () => {
      for (let i = 0; i < PER_USER; i++) sendNotificationAsync({ user_id: user }, i);
      for (let i = 0; i < PER_CHANNEL; i++) sendNotificationAsync({ channels: [channel] }, PER_USER + i);
    },
  });
}
