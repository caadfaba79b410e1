// Shared pieces of the k6 scripts in this folder: where the server is, the REST calls the scripts make,
// and a WebSocket listener that subscribes, then counts the notifications it was promised and how long
// each took from the producer's send to the frame's arrival.
//
// Every script takes the server from `BASE_URL` (default http://127.0.0.1:8080); the WebSocket URL is
// derived from it (http -> ws, https -> wss). Names the scripts create (users, channels) carry a run id
// so repeated runs against one server do not read each other's inboxes. The id is made once, in the
// script's `setup()` (see `setupRun`), and reaches every VU as the `data` argument: anything computed at
// a VU's init would differ from one VU to the next, and producers and listeners must agree on names.
//
// The frames follow docs/API.md: the server speaks first with `{"event":"connected",...}`, answers
// `{"action":"subscribe","channels":[...]}` with `{"event":"subscribed",...}`, and delivers a
// notification as the notification object itself (it has an `id` and no `event`), with `"channel"` set
// when it reached the connection through a channel.

import http from 'k6/http';
import { check } from 'k6';
import { Counter, Rate, Trend } from 'k6/metrics';
import ws from 'k6/ws';

/** The server's HTTP base URL, without a trailing slash. */
export const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');

/** The WebSocket endpoint on the same server. */
export const WS_URL = BASE_URL.replace(/^http/, 'ws') + '/ws';

/**
 * The `setup()` of every script: `{ run }`, the prefix of every user and channel the run creates, from
 * `RUN_ID` or else the start time.
 */
export function setupRun() {
  return { run: __ENV.RUN_ID || `k6${Date.now().toString(36)}` };
}

const JSON_HEADERS = { headers: { 'Content-Type': 'application/json' } };

/** Milliseconds from a producer's send (the `sent_ms` it put in `data`) to the frame's arrival. */
export const deliveryLatency = new Trend('notif_delivery_ms', true);

/** Of the notifications a listener was promised, the share that arrived before its deadline. */
export const delivered = new Rate('notif_delivered');

/** Notifications received by listeners (the `notif_delivered` numerator, as a count). */
export const receivedCount = new Counter('notif_received');

/** A user id scoped to the run `run` (from `setupRun`). */
export function userId(run, name) {
  return `${run}-${name}`;
}

/** A channel name scoped to the run `run` (channel names allow `[A-Za-z0-9_\-=@,.;:]`). */
export function channelName(run, name) {
  return `${run}-${name}`;
}

function sendRequest(target, seq, tags) {
  const body = Object.assign(
    { type: 'k6', title: 'load test', message: `k6 notification ${seq}`, data: { seq, sent_ms: Date.now() } },
    target,
  );
  return [`${BASE_URL}/api/v1/notifications/send`, JSON.stringify(body),
    Object.assign({ tags: Object.assign({ route: 'send' }, tags) }, JSON_HEADERS)];
}

function checkSent(res) {
  const ok = check(res, {
    'send: 201': (r) => r.status === 201,
    'send: has id': (r) => r.status === 201 && typeof r.json('id') === 'string',
  });
  return ok ? res.json('id') : null;
}

/**
 * `POST /api/v1/notifications/send`. `target` is `{user_id}` or `{channels}`; `data.sent_ms` carries the
 * send time so a listener can measure delivery latency. Returns the new id, or null after a failed check.
 */
export function sendNotification(target, seq, tags) {
  return checkSent(http.post(...sendRequest(target, seq, tags)));
}

/**
 * The same send without blocking: for sends made from inside a WebSocket handler, where a blocking call
 * would hold back the frames (and inflate their measured latency) until it returns. Resolves to the new
 * id or null; with k6/ws, the promise settles (and the send is checked) once the socket has closed.
 */
export function sendNotificationAsync(target, seq, tags) {
  const [url, body, params] = sendRequest(target, seq, tags);
  return http.asyncRequest('POST', url, body, params).then(checkSent);
}

/** `POST /api/v1/notifications/batch` of `count` notifications for `user`. Returns the ids or null. */
export function sendBatch(user, count, tags) {
  const notifications = [];
  for (let i = 0; i < count; i++) {
    notifications.push({ user_id: user, message: `k6 batch item ${i}`, data: { seq: i, sent_ms: Date.now() } });
  }
  const res = http.post(`${BASE_URL}/api/v1/notifications/batch`, JSON.stringify({ notifications }),
    Object.assign({ tags: Object.assign({ route: 'batch' }, tags) }, JSON_HEADERS));
  const ok = check(res, {
    'batch: 201': (r) => r.status === 201,
    'batch: one id per notification': (r) => r.status === 201 && (r.json('ids') || []).length === count,
  });
  return ok ? res.json('ids') : null;
}

/** `GET /api/v1/notifications/user/:user_id` (newest first). Returns the parsed body or null. */
export function history(user, query, tags) {
  const qs = query ? `?${query}` : '';
  const res = http.get(`${BASE_URL}/api/v1/notifications/user/${encodeURIComponent(user)}${qs}`,
    { tags: Object.assign({ route: 'history' }, tags) });
  const ok = check(res, {
    'history: 200': (r) => r.status === 200,
    'history: names the user': (r) => r.status === 200 && r.json('user_id') === user,
  });
  return ok ? res.json() : null;
}

/** `PUT /api/v1/notifications/:user_id/:id/read`. Returns whether it answered 200 with `read: true`. */
export function markRead(user, id, tags) {
  const res = http.put(`${BASE_URL}/api/v1/notifications/${encodeURIComponent(user)}/${id}/read`, null,
    { tags: Object.assign({ route: 'read' }, tags) });
  return check(res, {
    'read: 200': (r) => r.status === 200,
    'read: marked read': (r) => r.status === 200 && r.json('read') === true,
  });
}

/** Milliseconds from a client's publish (its `data.sent_ms`) to another subscriber's `message` event. */
export const publishLatency = new Trend('notif_publish_ms', true);

/**
 * Opens a WebSocket as `user`, subscribes to `channels`, then calls `onReady()` (where the caller sends
 * what this listener should receive, with `sendNotificationAsync`) and waits until `expected`
 * notifications arrived or `timeoutMs` passed. Each arrival adds to `notif_delivery_ms` and
 * `notif_received`; at the end each expected notification adds one sample to `notif_delivered` (true if
 * it came). The first frame must be `connected`, a channel delivery must carry its `channel`, a user
 * delivery must not, and no `error` event may come: all are checks.
 *
 * `expected: null` holds the connection for the whole `timeoutMs` and counts whatever arrives (for
 * mixed traffic, where nobody knows in advance what one listener gets). `publishEveryMs` makes the
 * listener publish to its first channel at that interval; the `message` events it receives from others
 * feed `notif_publish_ms`.
 *
 * This uses k6/ws, which holds the VU until the socket closes. k6/experimental/websockets, tried first,
 * with k6 1.1 about once in a few hundred sessions never handed the first frame (`connected`) to
 * `onmessage`: against notification-service and refhub alike, while k6/ws and a raw socket client saw
 * it every time in thousands of sessions on the same server. HTTP calls made from the handlers must be
 * asynchronous: a blocking one would hold back the frames and inflate their measured latency.
 */
export function listen({ user, channels, expected, timeoutMs, onReady, publishEveryMs, tags }) {
  let got = 0;
  let frames = 0;
  let connectedFirst = false;
  let subscribed = false;
  let frameShapeOk = true;
  let errorEvent = null;

  const res = ws.connect(`${WS_URL}?user_id=${encodeURIComponent(user)}`, tags ? { tags } : null, (socket) => {
    let closing = false;
    const finish = () => {
      if (!closing) {
        closing = true;
        socket.close();
      }
    };
    const ready = () => {
      if (subscribed) return;
      subscribed = true;
      if (onReady) onReady();
      if (publishEveryMs && channels.length > 0) {
        socket.setInterval(() => {
          socket.send(JSON.stringify({
            action: 'publish', channel: channels[0], data: { from: user, sent_ms: Date.now() },
          }));
        }, publishEveryMs);
      }
    };

    socket.on('open', () => {
      const action = channels.length > 0 ? { action: 'subscribe', channels } : { action: 'ping' };
      socket.send(JSON.stringify(action));
    });
    socket.on('message', (data) => {
      frames += 1;
      const frame = JSON.parse(data);
      if (frame.event === undefined && typeof frame.id === 'string') {
        got += 1;
        receivedCount.add(1, tags);
        if (frame.data && typeof frame.data.sent_ms === 'number') {
          deliveryLatency.add(Date.now() - frame.data.sent_ms, tags);
        }
        const viaChannel = frame.user_id !== user;
        if (viaChannel && !channels.includes(frame.channel)) frameShapeOk = false;
        if (!viaChannel && frame.channel !== undefined) frameShapeOk = false;
        if (expected !== null && got >= expected) finish();
      } else if (frame.event === 'connected') {
        connectedFirst = frames === 1;
      } else if (frame.event === 'subscribed' || frame.event === 'pong') {
        ready();
      } else if (frame.event === 'message') {
        if (frame.data && typeof frame.data.sent_ms === 'number') {
          publishLatency.add(Date.now() - frame.data.sent_ms, tags);
        }
      } else if (frame.event === 'error') {
        errorEvent = `${frame.code}: ${frame.message}`;
      }
    });
    socket.on('error', (e) => console.warn(`websocket of ${user} failed: ${e.error()}`));
    socket.setTimeout(finish, timeoutMs);
  });

  const checks = {
    'ws: upgraded (101)': () => res !== null && res.status === 101,
    'ws: connected event first': () => connectedFirst,
    'ws: subscribed': () => subscribed,
    'ws: channel frames name their channel': () => frameShapeOk,
    'ws: no error event': () => errorEvent === null,
  };
  if (expected !== null) {
    for (let i = 0; i < expected; i++) delivered.add(i < got, tags);
    checks['ws: every expected notification arrived'] = () => got >= expected;
  }
  if (errorEvent !== null) console.warn(`error event for ${user}: ${errorEvent}`);
  check(null, checks, tags);
}
