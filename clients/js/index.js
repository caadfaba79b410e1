// notification-service JavaScript client: a WebSocket client that never misses a notification across
// reconnects, and a small REST client for producers. Plain ES module, no dependencies: in browsers it
// uses the global WebSocket and fetch; in Node 20 pass a WebSocket class (the `ws` package) as the
// `WebSocket` option. The protocol it speaks is the server's docs/API.md ("WebSocket API").
//
// Why the resume logic looks the way it does: the server replays, on `since=<id>`, every stored
// notification with a larger id that the connection would have received, then sends
// `{"event":"resumed","complete":…,"last_id":…}`. A replay may be cut (`complete:false`); the next
// `since` must then be `last_id`, not the newest id received, because live notifications newer than
// the cut may already have arrived. So the client keeps a cursor (`lastId`): the id up to which it is
// sure to have everything, and separately a bounded set of the ids it delivered, so that whatever is
// replayed twice (a reconnect in the middle of a replay) is dropped rather than delivered twice.

/** Close codes of docs/API.md ("Close codes"). */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  PROTOCOL_ERROR: 1002,
  UNSUPPORTED_DATA: 1003,
  ABNORMAL: 1006,
  INVALID_PAYLOAD: 1007,
  POLICY_VIOLATION: 1008,
  MESSAGE_TOO_BIG: 1009,
  INTERNAL_ERROR: 1011,
  TRY_AGAIN_LATER: 1013,
});

const DEFAULT_OPTIONS = Object.freeze({
  userId: undefined,
  token: undefined,
  getToken: undefined,
  tokenTransport: 'query',
  channels: [],
  since: undefined,
  WebSocket: undefined,
  reconnect: true,
  initialDelayMs: 500,
  maxDelayMs: 30_000,
  tryAgainLaterMs: 5_000,
  autoRefresh: true,
  refreshBeforeS: 60,
  pingIntervalMs: 30_000,
  dedupeWindow: 10_000,
  resumeRetryMs: 1_000,
  clockSkewMs: 5_000,
  maxQueuedReads: 1_000,
  random: Math.random,
});

/** Connection states, in the order a client normally goes through them. */
export const State = Object.freeze({
  IDLE: 'idle',
  CONNECTING: 'connecting',
  OPEN: 'open',
  RECONNECTING: 'reconnecting',
  CLOSED: 'closed',
});

/**
 * The full-jitter backoff delay of attempt `attempt` (0 for the first retry): a uniformly random
 * delay between 0 and min(maxMs, initialMs * 2^attempt). Full jitter spreads the reconnects of many
 * clients cut off at the same moment (a server restart) instead of bringing them back in waves.
 */
export function backoffDelay(attempt, { initialDelayMs, maxDelayMs, random = Math.random }) {
  const ceiling = Math.min(maxDelayMs, initialDelayMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}

/** The payload of a JWT (not verified: only the server can), or `null` if it is not one. */
export function decodeJwtPayload(token) {
  const parts = typeof token === 'string' ? token.split('.') : [];
  if (parts.length !== 3) return null;
  try {
    const base64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    const padded = base64 + '='.repeat((4 - (base64.length % 4)) % 4);
    const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    return null;
  }
}

/**
 * The smallest UUIDv7 of millisecond `ms`: every id the server assigns at or after that moment sorts
 * above it, so it is a valid `since` meaning "everything from then on".
 */
export function uuidV7Floor(ms) {
  const hex = Math.max(0, Math.floor(ms)).toString(16).padStart(12, '0').slice(-12);
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-7000-8000-000000000000`;
}

/** Lower-case UUIDs sort like the 128-bit numbers they write, so ids compare as strings. */
function idAbove(a, b) {
  return b == null || (a != null && a > b);
}

/** The WebSocket endpoint for `url`: http(s) becomes ws(s), and a bare origin gets `/ws`. */
function wsEndpoint(url) {
  const u = new URL(url);
  if (u.protocol === 'http:') u.protocol = 'ws:';
  if (u.protocol === 'https:') u.protocol = 'wss:';
  if (u.pathname === '' || u.pathname === '/') u.pathname = '/ws';
  u.search = '';
  u.hash = '';
  return u.toString();
}

/**
 * A WebSocket client of one user. It connects, reconnects with exponential backoff and full jitter,
 * resumes from the last notification it has (following `resumed.complete:false` pages), drops
 * duplicates, refreshes its token before it expires, and keeps the channel subscriptions across
 * reconnects. See README.md for the options and events.
 */
export class NotificationClient {
  constructor(url, options = {}) {
    this.options = { ...DEFAULT_OPTIONS, ...options };
    const WS = this.options.WebSocket ?? globalThis.WebSocket;
    if (typeof WS !== 'function') {
      throw new TypeError('no WebSocket implementation: pass one as the WebSocket option (in Node: the ws package)');
    }
    if (this.options.userId == null && this.options.token == null && this.options.getToken == null) {
      throw new TypeError('give a userId, a token or a getToken function');
    }
    if (!['query', 'protocol'].includes(this.options.tokenTransport)) {
      throw new TypeError("tokenTransport must be 'query' or 'protocol'");
    }
    this._WS = WS;
    this.url = wsEndpoint(url);
    this._handlers = new Map();
    this._channels = new Set(this.options.channels);
    this._token = this.options.token;
    this._state = State.IDLE;
    this._socket = null;
    this._attempt = 0;
    this._timers = new Set();
    this._reconnectTimer = null;
    this._refreshTimer = null;
    this._pingTimer = null;
    this._refreshPending = false;
    this._queuedReads = [];
    // Resume bookkeeping (see the comment at the top of this file).
    this._cursor = this.options.since ?? null;
    this._maxSeen = this._cursor;
    this._resuming = false;
    this._firstConnectedAt = null;
    this._seen = new Set();
    this._connectWaiters = [];
    this._receivedSincePing = false;
    this._pingsUnanswered = 0;
    this._lastClose = null;
    /** Counters, for monitoring and tests. */
    this.stats = { connects: 0, reconnects: 0, notifications: 0, duplicatesDropped: 0, refreshes: 0 };
  }

  /** The connection state: idle, connecting, open, reconnecting or closed. */
  get state() {
    return this._state;
  }

  /**
   * The id up to which this client has every notification: persist it (localStorage, a file) and
   * pass it back as the `since` option to pick up where a previous run stopped.
   */
  get lastId() {
    return this._cursor;
  }

  /** The channels the client subscribes to (again on every reconnect). */
  get channels() {
    return [...this._channels];
  }

  /** The current token (the last one obtained or refreshed). */
  get token() {
    return this._token;
  }

  /**
   * Registers `handler` for `event`; returns a function that removes it. Events: notification,
   * connected, subscribed, unsubscribed, message, pong, resumed, caughtup, refreshed, error,
   * disconnected, reconnecting, state, frame.
   */
  on(event, handler) {
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(handler);
    return () => this.off(event, handler);
  }

  /** Removes a handler registered with `on`. */
  off(event, handler) {
    this._handlers.get(event)?.delete(handler);
  }

  /** Resolves with the next `event`'s argument (a convenience over `on`). */
  once(event) {
    return new Promise((resolve) => {
      const off = this.on(event, (value) => {
        off();
        resolve(value);
      });
    });
  }

  _emit(event, value) {
    for (const handler of [...(this._handlers.get(event) ?? [])]) {
      try {
        handler(value);
      } catch (e) {
        // A handler's bug must not break the connection's bookkeeping; report it asynchronously.
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }

  _setState(state) {
    if (this._state === state) return;
    this._state = state;
    this._emit('state', state);
  }

  /**
   * Connects (and keeps reconnecting until `close`). Resolves with the server's `connected` event of
   * the first connection; rejects if the client is closed, or gives up, before that.
   */
  connect() {
    if (this._state === State.CLOSED) return Promise.reject(new Error('the client is closed'));
    const promise = new Promise((resolve, reject) => this._connectWaiters.push({ resolve, reject }));
    if (this._state === State.IDLE) this._open();
    else if (this._state === State.OPEN && this._lastConnected) {
      this._settleConnect(null, this._lastConnected);
    }
    return promise;
  }

  _settleConnect(error, value) {
    const waiters = this._connectWaiters;
    this._connectWaiters = [];
    for (const w of waiters) (error ? w.reject(error) : w.resolve(value));
  }

  /** Closes the connection for good: no reconnect. */
  close(code = CloseCode.NORMAL, reason = '') {
    if (this._state === State.CLOSED) return;
    this._clearTimers();
    const socket = this._socket;
    this._socket = null;
    this._setState(State.CLOSED);
    if (socket) {
      this._detach(socket);
      try {
        socket.close(code, reason);
      } catch {
        socket.close();
      }
    }
    this._settleConnect(new Error('the client was closed before it connected'));
    this._emit('disconnected', { code, reason, willReconnect: false, byClient: true });
  }

  _clearTimers() {
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    clearInterval(this._pingTimer);
    this._pingTimer = null;
    this._reconnectTimer = null;
    this._refreshTimer = null;
  }

  _later(ms, fn) {
    const t = setTimeout(() => {
      this._timers.delete(t);
      fn();
    }, ms);
    this._timers.add(t);
    return t;
  }

  _cancel(t) {
    if (t == null) return;
    clearTimeout(t);
    this._timers.delete(t);
  }

  async _currentToken({ fresh = false } = {}) {
    if (this.options.getToken && (fresh || this._token == null)) {
      this._token = await this.options.getToken();
    }
    return this._token;
  }

  /** The `since` of the next connection: the cursor, or the moment of the first connection. */
  _resumePoint() {
    if (this._cursor != null) return this._cursor;
    if (this._firstConnectedAt != null) {
      // Nothing received yet, but the client was connected: what was sent since then must not be
      // lost. A UUIDv7 floor of that moment (less the allowed clock skew) replays it.
      return uuidV7Floor(this._firstConnectedAt - this.options.clockSkewMs);
    }
    return null;
  }

  async _open() {
    this._setState(this.stats.connects === 0 && this._attempt === 0 ? State.CONNECTING : State.RECONNECTING);
    let token;
    try {
      // A reconnect after a 1008 (expired token) or a refused handshake asks for a fresh token.
      token = await this._currentToken({ fresh: this._needFreshToken });
      this._needFreshToken = false;
    } catch (error) {
      this._emit('error', { code: 'token_unavailable', message: String(error?.message ?? error) });
      this._scheduleReconnect({ code: CloseCode.ABNORMAL, reason: 'getToken failed' });
      return;
    }
    if (this._state === State.CLOSED) return;
    const params = new URLSearchParams();
    if (this.options.userId != null) params.set('user_id', String(this.options.userId));
    if (token != null && this.options.tokenTransport === 'query') params.set('token', token);
    if (this._channels.size > 0) params.set('channels', [...this._channels].join(','));
    const since = this._resumePoint();
    this._resuming = since != null;
    this._resumeFrom = since;
    if (since != null) params.set('since', since);
    const query = params.toString();
    const target = query ? `${this.url}?${query}` : this.url;
    let socket;
    try {
      socket =
        token != null && this.options.tokenTransport === 'protocol'
          ? new this._WS(target, ['bearer', token])
          : new this._WS(target);
    } catch (error) {
      this._emit('error', { code: 'connect_failed', message: String(error?.message ?? error) });
      this._scheduleReconnect({ code: CloseCode.ABNORMAL, reason: 'connect failed' });
      return;
    }
    this._socket = socket;
    this._connected = false;
    socket.onmessage = (event) => this._onMessage(event.data);
    socket.onclose = (event) => this._onClose(socket, event.code, event.reason);
    // A failed handshake or a reset is followed by a close event (1006), where reconnecting is decided.
    socket.onerror = () => {};
  }

  _detach(socket) {
    socket.onmessage = null;
    socket.onclose = null;
    socket.onerror = null;
    // ws emits 'error' as an EventEmitter event too; a listener keeps a late one from being thrown.
    if (typeof socket.on === 'function') socket.on('error', () => {});
  }

  _send(message) {
    const socket = this._socket;
    if (!socket || !this._connected || socket.readyState !== 1) return false;
    socket.send(JSON.stringify(message));
    return true;
  }

  _onMessage(data) {
    this._receivedSincePing = true;
    this._pingsUnanswered = 0;
    let frame;
    try {
      frame = JSON.parse(typeof data === 'string' ? data : new TextDecoder().decode(data));
    } catch {
      return;
    }
    this._emit('frame', frame);
    if (frame.event == null && typeof frame.id === 'string') {
      this._onNotification(frame);
      return;
    }
    switch (frame.event) {
      case 'connected':
        this._onConnected(frame);
        break;
      case 'resumed':
        this._onResumed(frame);
        break;
      case 'refreshed':
        this._refreshPending = false;
        this.stats.refreshes += 1;
        this._scheduleRefresh();
        break;
      case 'error':
        this._onErrorEvent(frame);
        break;
      default:
        break;
    }
    this._emit(frame.event, frame);
  }

  _onConnected(frame) {
    this._connected = true;
    this._lastConnected = frame;
    if (this._firstConnectedAt == null) this._firstConnectedAt = Date.now();
    if (this.stats.connects > 0) this.stats.reconnects += 1;
    this.stats.connects += 1;
    this._attempt = 0;
    this._setState(State.OPEN);
    this._startPing();
    this._scheduleRefresh();
    const reads = this._queuedReads;
    this._queuedReads = [];
    for (const id of reads) this._send({ action: 'read', id });
    this._settleConnect(null, frame);
  }

  _onNotification(notification) {
    if (this._seen.has(notification.id)) {
      this.stats.duplicatesDropped += 1;
      return;
    }
    this._seen.add(notification.id);
    if (this._seen.size > this.options.dedupeWindow) {
      this._seen.delete(this._seen.values().next().value);
    }
    if (idAbove(notification.id, this._maxSeen)) this._maxSeen = notification.id;
    // Live: everything up to the newest id is here. During a replay the cursor waits for `resumed`.
    if (!this._resuming && idAbove(notification.id, this._cursor)) this._cursor = notification.id;
    this.stats.notifications += 1;
    this._emit('notification', notification);
  }

  _onResumed(frame) {
    if (frame.complete) {
      // Everything stored up to now has been sent: the replay, then the live ones held meanwhile.
      for (const id of [frame.last_id, this._maxSeen]) {
        if (idAbove(id, this._cursor)) this._cursor = id;
      }
      this._resuming = false;
      queueMicrotask(() => this._emit('caughtup', { lastId: this._cursor }));
      return;
    }
    // Cut at MAX_REPLAY: ask for the rest from the last replayed id (API.md: not the newest received).
    if (frame.last_id != null && idAbove(frame.last_id, this._cursor)) this._cursor = frame.last_id;
    this._send({ action: 'resume', since: this._cursor });
  }

  _onErrorEvent(frame) {
    if (this._resuming && frame.code === 'store_unavailable') {
      // The replay could not be read: ask again shortly, from the same point.
      const socket = this._socket;
      this._later(this.options.resumeRetryMs, () => {
        if (this._socket === socket && this._resuming) {
          this._send({ action: 'resume', since: this._resumePoint() ?? this._resumeFrom });
        }
      });
    }
    if (this._refreshPending && (frame.code === 'unauthorized' || frame.code === 'forbidden')) {
      // The new token was refused; the old one still runs. Try again with another one a bit later.
      this._refreshPending = false;
      this._refreshTimer = this._later(Math.max(1_000, this.options.resumeRetryMs * 5), () =>
        this.refresh().catch(() => {}),
      );
    }
  }

  _startPing() {
    clearInterval(this._pingTimer);
    const interval = this.options.pingIntervalMs;
    if (!interval) return;
    this._receivedSincePing = true;
    this._pingsUnanswered = 0;
    const socket = this._socket;
    // Browsers cannot see the server's WebSocket pings, so a connection that died without a close
    // (a lost network) is noticed here: ping when idle, and give up after two silent intervals.
    this._pingTimer = setInterval(() => {
      if (this._socket !== socket) return;
      if (this._receivedSincePing) {
        this._receivedSincePing = false;
        return;
      }
      if (this._pingsUnanswered >= 2) {
        this._drop(socket, CloseCode.ABNORMAL, 'no answer from the server');
        return;
      }
      this._pingsUnanswered += 1;
      this._send({ action: 'ping' });
    }, Math.max(1_000, interval));
  }

  /** Treats `socket` as closed now (it may never say so itself), and reconnects. */
  _drop(socket, code, reason) {
    this._detach(socket);
    try {
      socket.close();
    } catch {
      // Already closing.
    }
    this._onClose(socket, code, reason);
  }

  _scheduleRefresh() {
    this._cancel(this._refreshTimer);
    this._refreshTimer = null;
    if (!this.options.autoRefresh) return;
    const payload = decodeJwtPayload(this._token);
    if (!payload || typeof payload.exp !== 'number') return;
    const remainingMs = payload.exp * 1000 - Date.now();
    const beforeMs = this.options.refreshBeforeS * 1000;
    // Refresh `refreshBeforeS` ahead, or at half of the remaining time for short-lived tokens.
    const delay = Math.max(0, remainingMs > 2 * beforeMs ? remainingMs - beforeMs : remainingMs / 2);
    this._refreshTimer = this._later(delay, () => this.refresh().catch(() => {}));
  }

  /**
   * Replaces the connection's token before it expires (`{"action":"refresh"}`): with `token`, or a
   * new one from `getToken`. Resolves once sent; `refreshed` or an `error` event follows. The client
   * does this by itself `refreshBeforeS` ahead of `exp` when it has `getToken`.
   */
  async refresh(token) {
    const next = token ?? (this.options.getToken ? await this.options.getToken() : null);
    if (next == null) return false;
    this._token = next;
    this._refreshPending = this._send({ action: 'refresh', token: next });
    return this._refreshPending;
  }

  _onClose(socket, code, reason) {
    if (socket !== this._socket) return;
    this._detach(socket);
    this._socket = null;
    this._connected = false;
    clearInterval(this._pingTimer);
    this._pingTimer = null;
    this._cancel(this._refreshTimer);
    this._refreshTimer = null;
    this._refreshPending = false;
    if (this._state === State.CLOSED) return;
    this._scheduleReconnect({ code, reason: reason ?? '' });
  }

  _scheduleReconnect({ code, reason }) {
    const info = { code, reason, willReconnect: false, byClient: false };
    // 1008 "token expired" with a fixed token and no getToken: every reconnect would be refused (401).
    const expiredForGood =
      code === CloseCode.POLICY_VIOLATION && /token/i.test(reason) && this.options.getToken == null;
    if (!this.options.reconnect || expiredForGood) {
      this._setState(State.CLOSED);
      clearInterval(this._pingTimer);
      this._emit('disconnected', info);
      if (expiredForGood) {
        this._emit('error', { event: 'error', code: 'token_expired', message: 'the token expired; give getToken to renew it' });
      }
      this._settleConnect(new Error(`closed (${code} ${reason})`));
      return;
    }
    if (code === CloseCode.POLICY_VIOLATION || code === CloseCode.ABNORMAL) {
      // 1008: the token expired (or the client kept sending over the rate). A refused handshake (401)
      // is a 1006 in browsers. Either way, a fresh token if there is a way to get one. Every other code
      // (1001 shutting down, 1013 try again later, 1000 from a proxy, protocol errors) reconnects too.
      this._needFreshToken = Boolean(this.options.getToken);
    }
    let delay = backoffDelay(this._attempt, this.options);
    if (code === CloseCode.TRY_AGAIN_LATER) {
      // Slow consumer or over the per-user cap: "reconnect (and resume) later", not at once.
      delay = Math.max(delay, this.options.tryAgainLaterMs);
    }
    this._attempt += 1;
    info.willReconnect = true;
    info.delayMs = delay;
    this._setState(State.RECONNECTING);
    this._emit('disconnected', info);
    this._emit('reconnecting', { attempt: this._attempt, delayMs: delay });
    this._reconnectTimer = this._later(delay, () => {
      this._reconnectTimer = null;
      if (this._state !== State.CLOSED) this._open();
    });
  }

  /** Subscribes to channels now (if connected) and on every reconnect. `subscribed` follows. */
  subscribe(channels) {
    const list = [].concat(channels);
    for (const c of list) this._channels.add(c);
    return this._send({ action: 'subscribe', channels: list });
  }

  /** Unsubscribes now and on reconnects. `unsubscribed` follows. */
  unsubscribe(channels) {
    const list = [].concat(channels);
    for (const c of list) this._channels.delete(c);
    return this._send({ action: 'unsubscribe', channels: list });
  }

  /** Publishes an ephemeral message to a channel this client subscribes to; false when offline. */
  publish(channel, data = {}) {
    return this._send({ action: 'publish', channel, data });
  }

  /**
   * Marks a notification of this user read. Sent now, or queued until the next connection. The
   * server answers only a failure (an `error` event `not_found`).
   */
  read(id) {
    if (this._send({ action: 'read', id })) return true;
    if (this._queuedReads.length < this.options.maxQueuedReads) this._queuedReads.push(id);
    return false;
  }

  /** Sends `{"action":"ping"}`; `pong` follows. False when offline. */
  ping() {
    return this._send({ action: 'ping' });
  }
}

/** An error answer of the HTTP API: `status`, and the `code` and `message` of its body. */
export class ApiError extends Error {
  constructor(status, code, message, retryAfterS) {
    super(`${status} ${code}: ${message}`);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
    this.retryAfterS = retryAfterS;
  }
}

/**
 * A small client of the HTTP API for producers (and for an inbox's history and read state). `apiKey`
 * goes as `Authorization: Bearer`. Every method resolves with the parsed answer or rejects with an
 * `ApiError`.
 */
export class RestClient {
  constructor(baseUrl, { apiKey, fetch: fetchImpl, headers } = {}) {
    const u = new URL(baseUrl);
    if (u.protocol === 'ws:') u.protocol = 'http:';
    if (u.protocol === 'wss:') u.protocol = 'https:';
    this.baseUrl = u.origin;
    this.apiKey = apiKey;
    this.headers = headers ?? {};
    this._fetch = fetchImpl ?? globalThis.fetch?.bind(globalThis);
    if (typeof this._fetch !== 'function') throw new TypeError('no fetch implementation');
  }

  async request(method, path, { body, headers } = {}) {
    const h = { ...this.headers, ...headers };
    if (this.apiKey) h.Authorization = `Bearer ${this.apiKey}`;
    if (body !== undefined) h['Content-Type'] = 'application/json';
    const response = await this._fetch(this.baseUrl + path, {
      method,
      headers: h,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await response.text();
    let parsed = null;
    if (text) {
      try {
        parsed = JSON.parse(text);
      } catch {
        parsed = text;
      }
    }
    if (!response.ok) {
      const code = parsed?.error?.code ?? 'http_error';
      const message = parsed?.error?.message ?? (typeof parsed === 'string' ? parsed : response.statusText);
      const retryAfter = response.headers.get('retry-after');
      const error = new ApiError(response.status, code, message, retryAfter == null ? undefined : Number(retryAfter));
      error.body = parsed;
      throw error;
    }
    return parsed;
  }

  static _idempotency(options) {
    return options?.idempotencyKey ? { 'Idempotency-Key': options.idempotencyKey } : undefined;
  }

  /** `POST /api/v1/notifications/send` → `{id, timestamp}`. */
  send(notification, options) {
    return this.request('POST', '/api/v1/notifications/send', {
      body: notification,
      headers: RestClient._idempotency(options),
    });
  }

  /** `POST /api/v1/notifications/batch` (up to 1,000, all or nothing) → `{ids}`. */
  batch(notifications, options) {
    return this.request('POST', '/api/v1/notifications/batch', {
      body: { notifications },
      headers: RestClient._idempotency(options),
    });
  }

  /** `POST /api/v1/notifications/schedule` → `{id, user_id, scheduled_at, created_at}`. */
  schedule(notification, scheduledAt, options) {
    const at = scheduledAt instanceof Date ? scheduledAt.toISOString() : scheduledAt;
    return this.request('POST', '/api/v1/notifications/schedule', {
      body: { ...notification, scheduled_at: at },
      headers: RestClient._idempotency(options),
    });
  }

  /** `GET /api/v1/notifications/scheduled/:id`. */
  getScheduled(id) {
    return this.request('GET', `/api/v1/notifications/scheduled/${encodeURIComponent(id)}`);
  }

  /** `DELETE /api/v1/notifications/scheduled/:id`. */
  cancelScheduled(id) {
    return this.request('DELETE', `/api/v1/notifications/scheduled/${encodeURIComponent(id)}`);
  }

  /** `GET /api/v1/notifications/user/:user_id` → `{notifications, total, unread, next_before}`. */
  history(userId, { limit, before, unread } = {}) {
    const q = new URLSearchParams();
    if (limit != null) q.set('limit', String(limit));
    if (before != null) q.set('before', before);
    if (unread != null) q.set('unread', unread ? 'true' : 'false');
    const query = q.toString();
    return this.request(
      'GET',
      `/api/v1/notifications/user/${encodeURIComponent(userId)}${query ? `?${query}` : ''}`,
    );
  }

  /** `PUT /api/v1/notifications/:user_id/:id/read` → the notification. */
  markRead(userId, id) {
    return this.request('PUT', `/api/v1/notifications/${encodeURIComponent(userId)}/${encodeURIComponent(id)}/read`);
  }

  /** `PUT /api/v1/notifications/:user_id/read-all` → `{updated}`. */
  markAllRead(userId) {
    return this.request('PUT', `/api/v1/notifications/${encodeURIComponent(userId)}/read-all`);
  }

  /** `DELETE /api/v1/notifications/:user_id/:id`. */
  remove(userId, id) {
    return this.request('DELETE', `/api/v1/notifications/${encodeURIComponent(userId)}/${encodeURIComponent(id)}`);
  }

  /** `GET /health`. Resolves with the body also when the node is degraded (503). */
  async health() {
    try {
      return await this.request('GET', '/health');
    } catch (e) {
      if (e instanceof ApiError && e.status === 503 && e.body?.status) return e.body;
      throw e;
    }
  }
}
