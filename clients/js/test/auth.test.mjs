// Tokens (?token= and the bearer subprotocol), refresh before expiry, and the close codes 1008 and
// 1013 as docs/API.md says a client should take them.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import WebSocket from 'ws';

import { CloseCode, NotificationClient, RestClient, State } from '../index.js';
import { TestServer, nextEvent, signJwt, waitFor, track, closeTracked } from './server.mjs';

const SECRET = 'js-sdk-test-secret';
const API_KEY = 'js-sdk-test-key';

/** A token for `sub` that expires in `seconds`. */
function token(sub, seconds, extra = {}) {
  return signJwt(SECRET, { sub, exp: Math.floor(Date.now() / 1000) + seconds, ...extra });
}

/** Records how the client built each socket. */
function spyingWebSocket(seen) {
  return class extends WebSocket {
    constructor(url, protocols) {
      seen.push({ url: String(url), protocols });
      super(url, protocols);
    }
  };
}

describe('with JWT_SECRET and API_KEY', () => {
  let server;
  let rest;
  before(async () => {
    server = await TestServer.start({
      env: { JWT_SECRET: SECRET, API_KEY, JWT_LEEWAY_S: '0', MAX_CONNECTIONS_PER_USER: '1' },
    });
    rest = new RestClient(server.httpUrl, { apiKey: API_KEY });
  });
  after(() => server.dispose());
  afterEach(closeTracked);

  for (const tokenTransport of ['query', 'protocol']) {
    test(`connects with a token sent as ${tokenTransport === 'query' ? '?token=' : 'the bearer subprotocol'}`, async () => {
      const seen = [];
      const sub = `tok-${tokenTransport}`;
      const c = track(new NotificationClient(server.wsUrl, {
        WebSocket: spyingWebSocket(seen),
        token: token(sub, 600, { channels: ['team.*'] }),
        tokenTransport,
        channels: ['team.a'],
        pingIntervalMs: 0,
      }));
      const subscribed = nextEvent(c, 'subscribed');
      const connected = await c.connect();
      assert.equal(connected.user_id, sub);
      assert.deepEqual((await subscribed).channels, ['team.a']);
      const url = new URL(seen[0].url);
      if (tokenTransport === 'query') {
        assert.equal(url.searchParams.get('token'), c.token);
        assert.equal(seen[0].protocols, undefined);
      } else {
        assert.equal(url.searchParams.get('token'), null);
        assert.deepEqual(seen[0].protocols, ['bearer', c.token]);
      }
      const got = nextEvent(c, 'notification');
      const { id } = await rest.send({ user_id: sub, message: 'with a token' });
      assert.equal((await got).id, id);
      c.close();
    });
  }

  test('the REST helper sends the API key; without it the server says 401', async () => {
    await assert.rejects(new RestClient(server.httpUrl).send({ user_id: 'x', message: 'm' }), (e) => {
      assert.equal(e.status, 401);
      assert.equal(e.code, 'unauthorized');
      return true;
    });
    const wrong = new RestClient(server.httpUrl, { apiKey: 'nope' });
    await assert.rejects(wrong.history('x'), (e) => e.code === 'unauthorized');
  });

  test('refreshes before the token expires, so the connection outlives its first token', async () => {
    let minted = 0;
    const c = track(new NotificationClient(server.wsUrl, {
      WebSocket,
      // Tokens of 5 s, refreshed 2 s ahead of their exp: the first one alone would be closed with
      // 1008 at about 5 s (JWT_LEEWAY_S=0).
      getToken: async () => {
        minted += 1;
        return token('refresher', 5);
      },
      refreshBeforeS: 2,
      pingIntervalMs: 0,
    }));
    const disconnects = [];
    c.on('disconnected', (d) => disconnects.push(d));
    await c.connect();
    await new Promise((r) => setTimeout(r, 8_000));
    assert.deepEqual(disconnects, []);
    assert.ok(c.stats.refreshes >= 2, `refreshed ${c.stats.refreshes} times`);
    assert.ok(minted >= 3);
    const got = nextEvent(c, 'notification');
    const { id } = await rest.send({ user_id: 'refresher', message: 'still here' });
    assert.equal((await got).id, id);
    c.close();
  });

  test('1008 (token expired) with getToken: reconnects with a new token and resumes', async () => {
    let minted = 0;
    const c = track(new NotificationClient(server.wsUrl, {
      WebSocket,
      getToken: async () => {
        minted += 1;
        return token('expirer', 2);
      },
      autoRefresh: false,
      initialDelayMs: 50,
      maxDelayMs: 200,
      pingIntervalMs: 0,
    }));
    const received = [];
    c.on('notification', (n) => received.push(n.id));
    await c.connect();
    const before = await rest.send({ user_id: 'expirer', message: 'before' });
    const closed = await nextEvent(c, 'disconnected');
    assert.equal(closed.code, CloseCode.POLICY_VIOLATION);
    assert.equal(closed.reason, 'token expired');
    assert.equal(closed.willReconnect, true);
    // Sent while the client is away: it must come with the resume.
    const during = await rest.send({ user_id: 'expirer', message: 'during' });
    await waitFor('the reconnect', () => c.stats.reconnects === 1 && c.state === State.OPEN);
    await waitFor('both notifications', () => received.length === 2);
    assert.deepEqual(received, [before.id, during.id]);
    assert.ok(minted >= 2);
    c.close();
  });

  test('1008 (token expired) with a fixed token: the client stops, saying why', async () => {
    const c = track(new NotificationClient(server.wsUrl, {
      WebSocket,
      token: token('fixed', 1),
      pingIntervalMs: 0,
    }));
    const errors = [];
    c.on('error', (e) => errors.push(e.code));
    await c.connect();
    const closed = await nextEvent(c, 'disconnected');
    assert.equal(closed.code, CloseCode.POLICY_VIOLATION);
    assert.equal(closed.willReconnect, false);
    assert.equal(c.state, State.CLOSED);
    assert.deepEqual(errors, ['token_expired']);
  });

  test('1013 (over MAX_CONNECTIONS_PER_USER): waits tryAgainLaterMs, then gets in once there is room', async () => {
    const first = track(new NotificationClient(server.wsUrl, {
      WebSocket,
      token: token('capped', 600),
      pingIntervalMs: 0,
    }));
    await first.connect();
    const second = track(new NotificationClient(server.wsUrl, {
      WebSocket,
      token: token('capped', 600),
      initialDelayMs: 10,
      maxDelayMs: 20,
      tryAgainLaterMs: 400,
      pingIntervalMs: 0,
    }));
    const disconnected = nextEvent(second, 'disconnected');
    const connecting = second.connect();
    const d = await disconnected;
    assert.equal(d.code, CloseCode.TRY_AGAIN_LATER);
    assert.equal(d.willReconnect, true);
    assert.ok(d.delayMs >= 400, `waited only ${d.delayMs} ms`);
    first.close();
    const connected = await connecting;
    assert.equal(connected.user_id, 'capped');
    second.close();
  });
});
