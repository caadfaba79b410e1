// Resume: replays cut into MAX_REPLAY pages, a reconnect before the first notification, and the
// server killed and restarted mid-stream (SIGKILL, then SIGTERM's 1001) on the same port and database
// while a producer keeps sending: every acknowledged notification arrives once, in order.
import assert from 'node:assert/strict';
import { afterEach, test } from 'node:test';
import WebSocket from 'ws';

import { CloseCode, NotificationClient, RestClient } from '../index.js';
import { TestServer, freePort, nextEvent, tempDir, waitFor, track, closeTracked } from './server.mjs';

afterEach(closeTracked);

const FAST_RECONNECT = { initialDelayMs: 100, maxDelayMs: 500, pingIntervalMs: 0 };

test('a replay cut at MAX_REPLAY is followed page by page: all of it, in order, once', async (t) => {
  const server = await TestServer.start({ env: { MAX_REPLAY: '5' } });
  t.after(() => server.dispose());
  const rest = new RestClient(server.httpUrl);
  const { id: seen } = await rest.send({ user_id: 'pager', message: 'already seen' });
  const { ids } = await rest.batch(Array.from({ length: 23 }, (_, i) => ({ user_id: 'pager', message: `m${i}` })));

  // A client that persisted `seen` as its lastId starts from there.
  const c = track(new NotificationClient(server.wsUrl, { WebSocket, userId: 'pager', since: seen, ...FAST_RECONNECT }));
  const received = [];
  const pages = [];
  c.on('notification', (n) => received.push(n.id));
  c.on('resumed', (r) => pages.push([r.count, r.complete]));
  const caughtUp = nextEvent(c, 'caughtup');
  await c.connect();
  assert.equal((await caughtUp).lastId, ids[22]);
  assert.deepEqual(received, ids);
  assert.deepEqual(pages, [
    [5, false],
    [5, false],
    [5, false],
    [5, false],
    [3, true],
  ]);
  assert.equal(c.lastId, ids[22]);
  c.close();
});

test('a client that lost its connection before any notification still gets what was sent meanwhile', async (t) => {
  const port = await freePort();
  const server = await TestServer.start({ port });
  t.after(() => server.dispose());
  const rest = new RestClient(server.httpUrl);
  const c = track(new NotificationClient(server.wsUrl, { WebSocket, userId: 'early', ...FAST_RECONNECT, initialDelayMs: 1_500 }));
  const received = [];
  c.on('notification', (n) => received.push(n.id));
  await c.connect();
  assert.equal(c.lastId, null);
  const disconnected = nextEvent(c, 'disconnected');
  await server.restart('SIGKILL');
  assert.equal((await disconnected).willReconnect, true);
  // Sent before the client is back (its first retry waits up to 1.5 s; these take milliseconds).
  const sent = [];
  for (let i = 0; i < 3; i++) sent.push((await rest.send({ user_id: 'early', message: `gap ${i}` })).id);
  await waitFor('the three notifications', () => received.length >= 3);
  await new Promise((r) => setTimeout(r, 200));
  assert.deepEqual(received, sent);
  c.close();
});

/** Sends until it is acknowledged, with one Idempotency-Key, so a send whose answer a kill swallowed
 * is not stored twice: the retry gets the first answer. */
async function sendAcknowledged(rest, body, key) {
  for (;;) {
    try {
      return (await rest.send(body, { idempotencyKey: key })).id;
    } catch {
      await new Promise((r) => setTimeout(r, 25));
    }
  }
}

test('the server killed and restarted mid-stream: no notification lost or duplicated, in order', async (t) => {
  const port = await freePort();
  const dir = tempDir();
  const server = await TestServer.start({ port, dir });
  t.after(() => server.dispose());
  const rest = new RestClient(`http://127.0.0.1:${port}`);

  const client = track(new NotificationClient(`ws://127.0.0.1:${port}/ws`, {
    WebSocket,
    userId: 'streamer',
    channels: ['feed'],
    ...FAST_RECONNECT,
    // Slower back than the producer, so that sends land while the client is away (up to 1 s).
    initialDelayMs: 1_000,
    maxDelayMs: 2_000,
  }));
  const received = [];
  const closes = [];
  client.on('notification', (n) => received.push(n.id));
  client.on('disconnected', (d) => closes.push(d.code));
  await client.connect();

  const TOTAL = 150;
  const acked = [];
  let restarts = Promise.resolve();
  for (let i = 0; i < TOTAL; i++) {
    // Half to the user, half to the channel: both kinds of target resume.
    const body = i % 2 ? { user_id: 'streamer', message: `n${i}` } : { channels: ['feed'], message: `n${i}` };
    acked.push(await sendAcknowledged(rest, body, `stream-${i}`));
    // The restarts run beside the sends, so some sends meet a dead port or a closing server.
    if (i === 40) restarts = server.restart('SIGKILL');
    // Once the client is back (else it would meet the stop while still away), a graceful stop: 1001.
    if (i === 95) {
      restarts = restarts
        .then(() => waitFor('the client back after the kill', () => client.state === 'open'))
        .then(() => server.restart('SIGTERM'));
    }
    await new Promise((r) => setTimeout(r, 5));
  }
  await restarts;
  await waitFor(`all ${TOTAL} notifications (have ${received.length})`, () => received.length >= TOTAL, 20_000);
  // Anything late would be a duplicate: give it a moment to show up.
  await new Promise((r) => setTimeout(r, 300));

  assert.equal(new Set(acked).size, TOTAL, 'each send stored once');
  assert.deepEqual(received, acked, 'every acknowledged notification, once, in the order sent');
  assert.deepEqual([...received].sort(), received, 'in id order');
  assert.equal(closes[0], CloseCode.ABNORMAL, `a kill is a close without a close frame; closes: ${closes}`);
  assert.ok(closes.includes(CloseCode.GOING_AWAY), `a SIGTERM closes with 1001; closes: ${closes}`);
  assert.ok(client.stats.reconnects >= 2, `reconnected ${client.stats.reconnects} times`);
  assert.equal(client.stats.notifications, TOTAL);
  client.close();
});
