// The client against the real server: connecting by user id, notifications, channels, read, publish,
// and the REST helper.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import WebSocket from 'ws';

import {
  ApiError,
  NotificationClient,
  RestClient,
  State,
  backoffDelay,
  decodeJwtPayload,
  uuidV7Floor,
} from '../index.js';
import { TestServer, nextEvent, waitFor, track, closeTracked } from './server.mjs';

describe('against a server', () => {
  let server;
  let rest;
  before(async () => {
    server = await TestServer.start();
    rest = new RestClient(server.httpUrl);
  });
  after(() => server.dispose());
  afterEach(closeTracked);

  const client = (options) => track(new NotificationClient(server.wsUrl, { WebSocket, pingIntervalMs: 0, ...options }));

  test('connects with a user id and receives what is sent to the user, once, as sent', async () => {
    const c = client({ userId: 'alice' });
    const received = [];
    c.on('notification', (n) => received.push(n));
    const connected = await c.connect();
    assert.equal(connected.user_id, 'alice');
    assert.equal(c.state, State.OPEN);
    const { id } = await rest.send({
      user_id: 'alice',
      type: 'tarea',
      title: 'Nueva',
      message: 'hola',
      data: { task_id: 't1' },
    });
    await waitFor('the notification', () => received.length === 1);
    assert.equal(received[0].id, id);
    assert.equal(received[0].message, 'hola');
    assert.deepEqual(received[0].data, { task_id: 't1' });
    assert.equal(c.lastId, id);
    c.close();
    assert.equal(c.state, State.CLOSED);
  });

  test('an http:// base URL reaches /ws', async () => {
    const c = track(new NotificationClient(server.httpUrl, { WebSocket, userId: 'u-http', pingIntervalMs: 0 }));
    await c.connect();
    c.close();
  });

  test('subscribes and unsubscribes, at connect and later, and publishes', async () => {
    const a = client({ userId: 'a1', channels: ['news'] });
    const b = client({ userId: 'b1' });
    const aGot = [];
    a.on('notification', (n) => aGot.push(n));
    const subscribedAtConnect = nextEvent(a, 'subscribed');
    await a.connect();
    assert.deepEqual((await subscribedAtConnect).channels, ['news']);
    await b.connect();
    const subscribed = nextEvent(b, 'subscribed');
    b.subscribe(['sala1', 'news']);
    assert.deepEqual((await subscribed).channels.sort(), ['news', 'sala1']);
    assert.deepEqual(b.channels.sort(), ['news', 'sala1']);

    const { id } = await rest.send({ channels: ['news'], message: 'extra' });
    await waitFor('the channel notification', () => aGot.length === 1);
    assert.equal(aGot[0].id, id);
    assert.equal(aGot[0].channel, 'news');

    const a2 = client({ userId: 'a2', channels: ['sala1'] });
    const sub2 = nextEvent(a2, 'subscribed');
    await a2.connect();
    await sub2;
    const message = nextEvent(a2, 'message');
    assert.equal(b.publish('sala1', { text: 'hi' }), true);
    const m = await message;
    assert.equal(m.from, 'b1');
    assert.deepEqual(m.data, { text: 'hi' });

    const unsubscribed = nextEvent(b, 'unsubscribed');
    b.unsubscribe('news');
    assert.deepEqual((await unsubscribed).channels, ['news']);
    assert.deepEqual(b.channels, ['sala1']);
    for (const c of [a, b, a2]) c.close();
  });

  test('read marks a notification read; an unknown id is an error event', async () => {
    const c = client({ userId: 'reader' });
    await c.connect();
    const { id } = await rest.send({ user_id: 'reader', message: 'read me' });
    await waitFor('the notification', () => c.lastId === id);
    assert.equal(c.read(id), true);
    await waitFor('read in history', async () => {
      const h = await rest.history('reader');
      return h.unread === 0 && h.notifications[0].read === true;
    });
    const error = nextEvent(c, 'error');
    c.read('0190b3c4-0000-7000-8000-000000000000');
    assert.equal((await error).code, 'not_found');
    const pong = nextEvent(c, 'pong');
    assert.equal(c.ping(), true);
    await pong;
    c.close();
  });

  test('a read while offline is sent on the next connection', async () => {
    const { id } = await rest.send({ user_id: 'offline-reader', message: 'later' });
    const c = client({ userId: 'offline-reader' });
    assert.equal(c.read(id), false);
    await c.connect();
    await waitFor('read in history', async () => (await rest.history('offline-reader')).unread === 0);
    c.close();
  });

  test('the REST helper: batch, history pages, read-all, delete, schedule, errors', async () => {
    const { ids } = await rest.batch([1, 2, 3, 4, 5].map((i) => ({ user_id: 'r1', message: `m${i}` })));
    assert.equal(ids.length, 5);
    const page1 = await rest.history('r1', { limit: 2 });
    assert.equal(page1.total, 5);
    assert.deepEqual(page1.notifications.map((n) => n.id), [ids[4], ids[3]]);
    const page2 = await rest.history('r1', { limit: 2, before: page1.next_before });
    assert.deepEqual(page2.notifications.map((n) => n.id), [ids[2], ids[1]]);
    const read = await rest.markRead('r1', ids[0]);
    assert.equal(read.read, true);
    assert.equal((await rest.markAllRead('r1')).updated, 4);
    assert.equal((await rest.history('r1', { unread: true })).notifications.length, 0);
    assert.equal(await rest.remove('r1', ids[0]), null);
    assert.equal((await rest.history('r1')).total, 4);

    const first = await rest.send({ user_id: 'r1', message: 'once' }, { idempotencyKey: 'k-1' });
    const again = await rest.send({ user_id: 'r1', message: 'once' }, { idempotencyKey: 'k-1' });
    assert.equal(again.id, first.id);

    const scheduled = await rest.schedule({ user_id: 'r1', message: 'later' }, new Date(Date.now() + 3_600_000));
    assert.equal((await rest.getScheduled(scheduled.id)).state, 'pending');
    await rest.cancelScheduled(scheduled.id);

    await assert.rejects(rest.send({ message: 'nobody' }), (e) => {
      assert.ok(e instanceof ApiError);
      assert.equal(e.status, 400);
      assert.equal(e.code, 'no_target');
      return true;
    });
    await assert.rejects(rest.getScheduled(scheduled.id), (e) => e.status === 404 && e.code === 'not_found');
    assert.equal((await rest.health()).status, 'ok');
  });
});

describe('pure helpers', () => {
  test('full jitter stays within the exponential ceiling, capped', () => {
    const opts = { initialDelayMs: 100, maxDelayMs: 1_000 };
    assert.equal(backoffDelay(0, { ...opts, random: () => 0.999999 }), 99);
    assert.equal(backoffDelay(3, { ...opts, random: () => 0.5 }), 400);
    assert.equal(backoffDelay(20, { ...opts, random: () => 0.999999 }), 999);
    assert.equal(backoffDelay(5, { ...opts, random: () => 0 }), 0);
  });

  test('a UUIDv7 floor sorts below every id of that millisecond and above older ones', () => {
    const ms = Date.parse('2026-12-03T10:00:00.000Z');
    const floor = uuidV7Floor(ms);
    assert.match(floor, /^[0-9a-f]{8}-[0-9a-f]{4}-7000-8000-000000000000$/);
    assert.ok(uuidV7Floor(ms - 1) < floor);
    assert.ok(floor < `${floor.slice(0, 14)}7000-8000-000000000001`);
  });

  test('a JWT payload is decoded, anything else is null', () => {
    const token = `e30.${Buffer.from('{"sub":"u1","exp":5}').toString('base64url')}.sig`;
    assert.deepEqual(decodeJwtPayload(token), { sub: 'u1', exp: 5 });
    assert.equal(decodeJwtPayload('not a token'), null);
    assert.equal(decodeJwtPayload(undefined), null);
  });

  test('the constructor refuses what cannot work', () => {
    if (globalThis.WebSocket === undefined) {
      assert.throws(() => new NotificationClient('ws://x/ws', { userId: 'u' }), /WebSocket/);
    }
    assert.throws(() => new NotificationClient('ws://x/ws', { WebSocket }), /userId/);
    assert.throws(
      () => new NotificationClient('ws://x/ws', { WebSocket, userId: 'u', tokenTransport: 'cookie' }),
      /tokenTransport/,
    );
  });
});

describe('the hand-written types', () => {
  test('index.d.ts declares exactly what index.js exports', async () => {
    const { readFile } = await import('node:fs/promises');
    const dts = await readFile(new URL('../index.d.ts', import.meta.url), 'utf8');
    const declared = [...dts.matchAll(/^export declare (?:class|function|const) (\w+)/gm)].map((m) => m[1]).sort();
    const exported = Object.keys(await import('../index.js')).sort();
    assert.deepEqual(declared, exported);
    // Every option the client reads has a type.
    const { NotificationClient: Client } = await import('../index.js');
    const options = Object.keys(new Client('ws://x/ws', { WebSocket, userId: 'u' }).options);
    const typed = dts.slice(dts.indexOf('export interface ClientOptions'), dts.indexOf('export declare const CloseCode'));
    for (const name of options) assert.match(typed, new RegExp(`\\b${name}\\?:`), `ClientOptions.${name}`);
  });
});
