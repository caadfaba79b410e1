// pusher-js, laravel-echo and the pusher HTTP SDK, unchanged, against the real server.
//
// Run by tests/pusher_clients.rs, which starts two nodes joined by Redis and passes them here:
// NODE_A and NODE_B ("127.0.0.1:port"), NODE_A_USER_CHANNEL_USER (a user id for the Laravel test),
// and the app as PUSHER_APP_ID, PUSHER_KEY, PUSHER_SECRET. The channel auth endpoint is a small HTTP
// server of this file that signs with the pusher SDK, as a Laravel app's /broadcasting/auth does.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { createRequire } from 'node:module';
import Echo from 'laravel-echo';

const require = createRequire(import.meta.url);
const Pusher = require('pusher-js');
const PusherServer = require('pusher');

const [hostA, portA] = process.env.NODE_A.split(':');
const [hostB, portB] = process.env.NODE_B.split(':');
const APP_ID = process.env.PUSHER_APP_ID;
const KEY = process.env.PUSHER_KEY;
const SECRET = process.env.PUSHER_SECRET;

const serverSdk = (host, port, secret = SECRET) =>
  new PusherServer({ appId: APP_ID, key: KEY, secret, host, port, useTLS: false });
const sdkA = serverSdk(hostA, portA);

// The app's auth endpoint: POST socket_id and channel_name (or user), answer the SDK's signature.
let authUrl;
let refuseAuth = false;
const authServer = http.createServer((req, res) => {
  let body = '';
  req.on('data', (chunk) => (body += chunk));
  req.on('end', () => {
    const params = JSON.parse(body);
    let answer;
    if (params.user) {
      answer = sdkA.authenticateUser(params.socket_id, params.user);
    } else {
      answer = sdkA.authorizeChannel(params.socket_id, params.channel_name, params.presence);
      if (refuseAuth) answer = { auth: `${KEY}:${'0'.repeat(64)}` };
    }
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify(answer));
  });
});

async function callAuth(payload) {
  const res = await fetch(authUrl, { method: 'POST', body: JSON.stringify(payload) });
  return res.json();
}

const clients = [];

// `member`: the presence member ({user_id, user_info}) the auth endpoint signs this client in as.
function connect(host = hostA, port = portA, key = KEY, member = undefined) {
  const client = new Pusher(key, {
    wsHost: host,
    wsPort: Number(port),
    forceTLS: false,
    enabledTransports: ['ws'],
    cluster: 'mt1',
    disableStats: true,
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) =>
        callAuth({ socket_id: socketId, channel_name: channelName, presence: member }).then(
          (data) => callback(null, data),
          (e) => callback(e, null),
        ),
    },
    userAuthentication: {
      customHandler: ({ socketId }, callback) =>
        callAuth({ socket_id: socketId, user: { id: 'signed-in-user' } }).then(
          (data) => callback(null, data),
          (e) => callback(e, null),
        ),
    },
  });
  clients.push(client);
  return client;
}

const within = (ms, what, promise) =>
  Promise.race([
    promise,
    new Promise((_, reject) => setTimeout(() => reject(new Error(`timed out: ${what}`)), ms)),
  ]);

const connected = (client) =>
  within(5000, 'connected', new Promise((resolve) => {
    if (client.connection.state === 'connected') return resolve();
    client.connection.bind('connected', resolve);
  }));

const subscribed = (client, name) =>
  within(5000, `subscribed to ${name}`, new Promise((resolve, reject) => {
    const channel = client.subscribe(name);
    channel.bind('pusher:subscription_succeeded', () => resolve(channel));
    channel.bind('pusher:subscription_error', (e) => reject(new Error(`subscription error ${JSON.stringify(e)}`)));
  }));

const nextEvent = (channel, name, what = name) =>
  within(5000, what, new Promise((resolve) => channel.bind(name, resolve)));

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

before(async () => {
  await new Promise((r) => authServer.listen(0, '127.0.0.1', r));
  authUrl = `http://127.0.0.1:${authServer.address().port}/broadcasting/auth`;
});

after(() => {
  for (const c of clients) c.disconnect();
  authServer.close();
});

test('pusher-js connects and gets a socket id of the protocol form', async () => {
  const c = connect();
  await connected(c);
  assert.match(c.connection.socket_id, /^\d+\.\d+$/);
  const other = connect();
  await connected(other);
  assert.notEqual(other.connection.socket_id, c.connection.socket_id);
});

test('an unknown app key gets pusher:error 4001', async () => {
  const c = connect(hostA, portA, 'no-such-key');
  const code = await within(5000, 'error 4001', new Promise((resolve) => {
    c.connection.bind('error', (e) => resolve(e?.error?.data?.code ?? e?.data?.code));
  }));
  assert.equal(code, 4001);
});

test('a public channel gets an event triggered through the HTTP SDK', async () => {
  const c = connect();
  const channel = await subscribed(c, 'public-news');
  const got = nextEvent(channel, 'headline');
  await sdkA.trigger('public-news', 'headline', { title: 'hello', n: 1 });
  assert.deepEqual(await got, { title: 'hello', n: 1 });
});

test('a private channel is signed by the auth endpoint; a bad signature is refused', async () => {
  const c = connect();
  const channel = await subscribed(c, 'private-orders');
  const got = nextEvent(channel, 'shipped');
  await sdkA.trigger('private-orders', 'shipped', 'just a string');
  assert.equal(await got, 'just a string');

  refuseAuth = true;
  try {
    const error = await within(5000, 'subscription error', new Promise((resolve) => {
      const refused = c.subscribe('private-secret');
      refused.bind('pusher:subscription_error', resolve);
      refused.bind('pusher:subscription_succeeded', () => resolve('succeeded'));
    }));
    assert.notEqual(error, 'succeeded');
    assert.equal(error.status, 401);
  } finally {
    refuseAuth = false;
  }
});

test('an event on several channels reaches each, except the socket_id named', async () => {
  const sender = connect();
  const receiver = connect();
  await Promise.all([connected(sender), connected(receiver)]);
  const senderNews = await subscribed(sender, 'multi-a');
  const receiverA = await subscribed(receiver, 'multi-a');
  const receiverB = await subscribed(receiver, 'multi-b');
  let senderGot = 0;
  senderNews.bind('tick', () => senderGot++);
  const gotA = nextEvent(receiverA, 'tick', 'tick on multi-a');
  const gotB = nextEvent(receiverB, 'tick', 'tick on multi-b');
  await sdkA.trigger(['multi-a', 'multi-b'], 'tick', { n: 2 }, { socket_id: sender.connection.socket_id });
  assert.deepEqual(await gotA, { n: 2 });
  assert.deepEqual(await gotB, { n: 2 });
  await sleep(300);
  assert.equal(senderGot, 0, 'the excluded socket got the event');
});

test('batch events reach their channels', async () => {
  const c = connect();
  const one = await subscribed(c, 'batch-one');
  const two = await subscribed(c, 'batch-two');
  const got = Promise.all([nextEvent(one, 'first'), nextEvent(two, 'second')]);
  await sdkA.triggerBatch([
    { channel: 'batch-one', name: 'first', data: { i: 1 } },
    { channel: 'batch-two', name: 'second', data: { i: 2 } },
  ]);
  assert.deepEqual(await got, [{ i: 1 }, { i: 2 }]);
});

test('client events reach the other subscribers, not the sender', async () => {
  const a = connect();
  const b = connect();
  const chatA = await subscribed(a, 'private-chat');
  const chatB = await subscribed(b, 'private-chat');
  let echoed = 0;
  chatA.bind('client-typing', () => echoed++);
  const got = nextEvent(chatB, 'client-typing');
  assert.ok(chatA.trigger('client-typing', { who: 'a' }));
  assert.deepEqual(await got, { who: 'a' });
  await sleep(300);
  assert.equal(echoed, 0, 'the sender got its own client event');
});

test('sign-in answers pusher:signin_success', async () => {
  const c = connect();
  await connected(c);
  const signedIn = within(5000, 'signin_success', new Promise((resolve) => {
    c.user.bind('pusher:signin_success', resolve);
    c.connection.bind('message', (m) => m.event === 'pusher:signin_success' && resolve(m));
  }));
  c.signin();
  await signedIn;
});

test('laravel-echo .notification() receives a native REST send to the user', async () => {
  const user = process.env.LARAVEL_USER;
  const echo = new Echo({ broadcaster: 'pusher', client: connect() });
  const got = within(5000, 'notification', new Promise((resolve) => {
    echo.private(`App.Models.User.${user}`).notification(resolve);
  }));
  // Echo subscribes when asked; give the subscription time to be acknowledged.
  await within(5000, 'Echo subscribed', new Promise((resolve) => {
    echo.connector.pusher.channel(`private-App.Models.User.${user}`).bind('pusher:subscription_succeeded', resolve);
  }));
  const res = await fetch(`http://${process.env.NODE_A}/api/v1/notifications/send`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ user_id: user, type: 'invoice-paid', title: 'Paid', message: 'Invoice 7 is paid', data: { invoice: 7 } }),
  });
  assert.equal(res.status, 201);
  const { id } = await res.json();
  const notification = await got;
  assert.equal(notification.id, id);
  assert.equal(notification.type, 'invoice-paid');
  assert.equal(notification.message, 'Invoice 7 is paid');
  assert.deepEqual(notification.data, { invoice: 7 });
});

test('a bad signature is 401 and an unknown app 404', async () => {
  const forged = serverSdk(hostA, portA, 'not-the-secret');
  await assert.rejects(forged.trigger('public-news', 'x', {}), (e) => e.status === 401);
  const unknown = new PusherServer({ appId: 'nope', key: KEY, secret: SECRET, host: hostA, port: portA, useTLS: false });
  await assert.rejects(unknown.trigger('public-news', 'x', {}), (e) => e.status === 404);
});

test('the channels API counts subscribers across shards', async () => {
  const clientsHere = [connect(), connect(), connect()];
  for (const c of clientsHere) await subscribed(c, 'counted-room');
  const res = await sdkA.get({ path: '/channels/counted-room', params: { info: 'subscription_count' } });
  const body = await res.json();
  assert.equal(body.occupied, true);
  assert.equal(body.subscription_count, 3);
  const list = await (await sdkA.get({ path: '/channels', params: { filter_by_prefix: 'counted-' } })).json();
  assert.deepEqual(Object.keys(list.channels), ['counted-room']);
  const empty = await (await sdkA.get({ path: '/channels/nobody-here' })).json();
  assert.equal(empty.occupied, false);
});

test('an event triggered on node A reaches a pusher-js client on node B', async () => {
  const c = connect(hostB, portB);
  const channel = await subscribed(c, 'across-nodes');
  // The subscription reaches Redis through node B's bus thread: retry until it has.
  let got = null;
  channel.bind('hop', (data) => (got = data));
  for (let i = 0; i < 50 && got === null; i++) {
    await sdkA.trigger('across-nodes', 'hop', { i });
    await sleep(100);
  }
  assert.notEqual(got, null, 'no event crossed from node A to node B');
});

test('laravel-echo presence: here, joining and leaving across shards and nodes, with the member list API', async () => {
  const name = 'team-7';
  const until = (what, check) =>
    within(5000, what, (async () => { while (!check()) await sleep(20); })());
  const echoOf = (host, port, member) =>
    new Echo({ broadcaster: 'pusher', client: connect(host, port, KEY, member) });
  const joined = (echo, who) => {
    const seen = { joining: [], leaving: [] };
    const here = within(5000, `${who} here`, new Promise((resolve) => {
      echo.join(name)
        .here(resolve)
        .joining((u) => seen.joining.push(u))
        .leaving((u) => seen.leaving.push(u));
    }));
    return { here, seen };
  };

  const ann = echoOf(hostA, portA, { user_id: 1, user_info: { name: 'Ann' } });
  const a = joined(ann, 'Ann');
  assert.deepEqual(await a.here, [{ name: 'Ann' }]);

  // Two more connections on node A (the shards take them as they come) and one on node B.
  const bob = echoOf(hostA, portA, { user_id: 2, user_info: { name: 'Bob' } });
  const b = joined(bob, 'Bob');
  assert.deepEqual(await b.here, [{ name: 'Ann' }, { name: 'Bob' }]);
  await until('Ann hears Bob join', () => a.seen.joining.length === 1);
  assert.deepEqual(a.seen.joining, [{ name: 'Bob' }]);
  assert.deepEqual(b.seen.joining, [], 'a member does not hear of its own arrival');

  const cara = echoOf(hostB, portB, { user_id: 'c3', user_info: { name: 'Cara' } });
  const c = joined(cara, 'Cara');
  assert.deepEqual(await c.here, [{ name: 'Ann' }, { name: 'Bob' }, { name: 'Cara' }]);
  await until('Ann and Bob hear Cara join', () => a.seen.joining.length === 2 && b.seen.joining.length === 1);
  assert.deepEqual(a.seen.joining[1], { name: 'Cara' });

  const users = await (await sdkA.get({ path: `/channels/presence-${name}/users` })).json();
  assert.deepEqual(users, { users: [{ id: '1' }, { id: '2' }, { id: 'c3' }] });
  const info = await (await sdkA.get({ path: `/channels/presence-${name}`, params: { info: 'user_count' } })).json();
  assert.equal(info.user_count, 3);

  // Cara's node B connection goes; Bob leaves the channel: Ann hears both leave.
  cara.disconnect();
  await until('Ann hears Cara leave', () => a.seen.leaving.length === 1);
  assert.deepEqual(a.seen.leaving, [{ name: 'Cara' }]);
  bob.leave(name);
  await until('Ann hears Bob leave', () => a.seen.leaving.length === 2);
  assert.deepEqual(a.seen.leaving[1], { name: 'Bob' });
});
