// Types of @notification-service/client (index.js). Field names follow the server's docs/API.md.

/** The notification object of API.md, as delivered over WebSocket and returned by the REST API. */
export interface Notification {
  id: string;
  type: string;
  title: string;
  message: string;
  user_id: string | null;
  channels: string[];
  data: Record<string, unknown>;
  /** RFC 3339 UTC, millisecond precision. */
  timestamp: string;
  read: boolean;
  read_at: string | null;
  delivered_at: string | null;
  seen_at: string | null;
  scheduled_at: string | null;
  /** Present (true) on a broadcast. */
  broadcast?: true;
  /** WebSocket only: the channel through which the connection got it. */
  channel?: string;
  /** Present on a notification a schedule fired. */
  schedule_id?: string;
}

/** What a producer sends: `message` plus at least one target. */
export interface NotificationInput {
  message: string;
  type?: string;
  title?: string;
  user_id?: string | number;
  channels?: string[];
  broadcast?: boolean;
  data?: Record<string, unknown>;
}

export interface ConnectedEvent {
  event: 'connected';
  connection_id: string;
  user_id: string;
  heartbeat_s: number;
}
export interface ChannelsEvent {
  event: 'subscribed' | 'unsubscribed';
  channels: string[];
}
export interface MessageEvent {
  event: 'message';
  channel: string;
  from: string;
  data: unknown;
}
export interface ResumedEvent {
  event: 'resumed';
  count: number;
  complete: boolean;
  last_id: string | null;
}
export interface RefreshedEvent {
  event: 'refreshed';
  expires_at: number;
}
/** The user's unread count: right after `connected`, then after every change (coalesced). */
export interface UnreadEvent {
  event: 'unread';
  count: number;
}
/** A server `error` event, or one of the client's own: `token_expired`, `token_unavailable`, `connect_failed`. */
export interface ErrorEvent {
  event?: 'error';
  code: string;
  message: string;
}
export interface DisconnectedEvent {
  /** The close code (1006 when the connection was lost or refused without one). */
  code: number;
  reason: string;
  willReconnect: boolean;
  /** True when `close()` was called. */
  byClient: boolean;
  /** The wait before the next attempt, when `willReconnect`. */
  delayMs?: number;
}

export type ConnectionState = 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed';

export interface ClientEvents {
  notification: Notification;
  connected: ConnectedEvent;
  subscribed: ChannelsEvent;
  unsubscribed: ChannelsEvent;
  message: MessageEvent;
  pong: { event: 'pong' };
  resumed: ResumedEvent;
  /** A resume finished (`complete: true`): everything up to `lastId` has been delivered. */
  caughtup: { lastId: string | null };
  refreshed: RefreshedEvent;
  unread: UnreadEvent;
  error: ErrorEvent;
  disconnected: DisconnectedEvent;
  reconnecting: { attempt: number; delayMs: number };
  state: ConnectionState;
  /** Every frame from the server, parsed, before it is handled. */
  frame: Record<string, unknown>;
}

/** The WebSocket constructor the client uses: the browser's, or `ws` in Node. */
export interface WebSocketConstructor {
  new (url: string, protocols?: string | string[]): WebSocketLike;
}
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}

export interface ClientOptions {
  /** `user_id` of the connection (development, or alongside a token: it must equal its `sub`). */
  userId?: string | number;
  /** A JWT (with `JWT_SECRET` on the server). */
  token?: string;
  /** Called for a token at connect, before each refresh and after a 1008 or a refused handshake. */
  getToken?: () => string | Promise<string>;
  /** `'query'` (`?token=`, the default) or `'protocol'` (`Sec-WebSocket-Protocol: bearer, <jwt>`). */
  tokenTransport?: 'query' | 'protocol';
  /** Channels to subscribe to at connect (and on every reconnect). */
  channels?: string[];
  /** Resume from this id (a `lastId` persisted by an earlier run). */
  since?: string;
  /** The WebSocket class; defaults to `globalThis.WebSocket`. In Node 20 pass `ws`'s default export. */
  WebSocket?: WebSocketConstructor;
  /** Reconnect after a lost connection (default true). */
  reconnect?: boolean;
  /** Backoff: full jitter over min(maxDelayMs, initialDelayMs * 2^attempt). Defaults 500 and 30,000. */
  initialDelayMs?: number;
  maxDelayMs?: number;
  /** The least wait after a 1013 (slow consumer, per-user cap). Default 5,000. */
  tryAgainLaterMs?: number;
  /** Refresh the token this long before its `exp` (default 60; half the remaining time if shorter). */
  refreshBeforeS?: number;
  /** Refresh by itself through `getToken` (default true). */
  autoRefresh?: boolean;
  /** Ping when idle this often; two silent intervals drop the connection. 0 turns it off. Default 30,000. */
  pingIntervalMs?: number;
  /** How many delivered ids are remembered to drop duplicates (default 10,000). */
  dedupeWindow?: number;
  /** Wait before asking again after a `store_unavailable` resume (default 1,000). */
  resumeRetryMs?: number;
  /** Before the first notification there is no id to resume from: the first connection's time, less
   * this skew, is used instead (default 5,000). */
  clockSkewMs?: number;
  /** Reads kept while offline, sent on the next connection (default 1,000). */
  maxQueuedReads?: number;
  /** The random source of the jitter (tests). */
  random?: () => number;
}

export declare const CloseCode: Readonly<{
  NORMAL: 1000;
  GOING_AWAY: 1001;
  PROTOCOL_ERROR: 1002;
  UNSUPPORTED_DATA: 1003;
  ABNORMAL: 1006;
  INVALID_PAYLOAD: 1007;
  POLICY_VIOLATION: 1008;
  MESSAGE_TOO_BIG: 1009;
  INTERNAL_ERROR: 1011;
  TRY_AGAIN_LATER: 1013;
}>;

export declare const State: Readonly<{
  IDLE: 'idle';
  CONNECTING: 'connecting';
  OPEN: 'open';
  RECONNECTING: 'reconnecting';
  CLOSED: 'closed';
}>;

export declare class NotificationClient {
  /** `ws://host:port/ws`; an `http(s)://` URL or a bare origin is turned into that. */
  constructor(url: string, options: ClientOptions);
  readonly url: string;
  readonly options: Required<Pick<ClientOptions, 'tokenTransport' | 'reconnect'>> & ClientOptions;
  readonly state: ConnectionState;
  /** The id up to which every notification has been delivered: persist it, pass it back as `since`. */
  readonly lastId: string | null;
  readonly channels: string[];
  readonly token: string | undefined;
  readonly stats: {
    connects: number;
    reconnects: number;
    notifications: number;
    duplicatesDropped: number;
    refreshes: number;
  };
  on<E extends keyof ClientEvents>(event: E, handler: (value: ClientEvents[E]) => void): () => void;
  off<E extends keyof ClientEvents>(event: E, handler: (value: ClientEvents[E]) => void): void;
  once<E extends keyof ClientEvents>(event: E): Promise<ClientEvents[E]>;
  /** Connects and stays connected until `close()`; resolves with the first `connected` event. */
  connect(): Promise<ConnectedEvent>;
  close(code?: number, reason?: string): void;
  /** Returns whether the action was sent now (the channel set is kept either way). */
  subscribe(channels: string | string[]): boolean;
  unsubscribe(channels: string | string[]): boolean;
  publish(channel: string, data?: unknown): boolean;
  /** Sent now (true) or queued for the next connection (false). */
  read(id: string): boolean;
  ping(): boolean;
  /** Sends `{"action":"refresh"}` with `token` or one from `getToken`; false when not sent. */
  refresh(token?: string): Promise<boolean>;
}

export declare class ApiError extends Error {
  readonly status: number;
  /** The `error.code` of API.md (`no_target`, `unauthorized`, ...), or `http_error`. */
  readonly code: string;
  /** `Retry-After`, for 429. */
  readonly retryAfterS: number | undefined;
  /** The parsed body of the answer. */
  readonly body: unknown;
}

export interface SendOptions {
  /** `Idempotency-Key`: a retry with the same key gets the first answer and stores nothing. */
  idempotencyKey?: string;
}

export interface HistoryPage {
  user_id: string;
  notifications: Notification[];
  total: number;
  unread: number;
  next_before: string | null;
}

export declare class RestClient {
  /** `baseUrl` is the server's origin (`http://localhost:8080`). */
  constructor(
    baseUrl: string,
    options?: { apiKey?: string; fetch?: typeof fetch; headers?: Record<string, string> },
  );
  readonly baseUrl: string;
  request(method: string, path: string, options?: { body?: unknown; headers?: Record<string, string> }): Promise<unknown>;
  send(notification: NotificationInput, options?: SendOptions): Promise<{ id: string; timestamp: string }>;
  batch(notifications: NotificationInput[], options?: SendOptions): Promise<{ ids: string[] }>;
  schedule(
    notification: NotificationInput,
    scheduledAt: Date | string,
    options?: SendOptions,
  ): Promise<{ id: string; user_id: string | null; scheduled_at: string; created_at: string }>;
  getScheduled(id: string): Promise<Record<string, unknown> & { id: string; state: 'pending' | 'fired' }>;
  cancelScheduled(id: string): Promise<null>;
  history(userId: string, options?: { limit?: number; before?: string; unread?: boolean }): Promise<HistoryPage>;
  markRead(userId: string, id: string): Promise<Notification>;
  markAllRead(userId: string): Promise<{ updated: number }>;
  remove(userId: string, id: string): Promise<null>;
  health(): Promise<{ status: string; store?: string; redis?: string; connections?: number; uptime_s?: number }>;
}

export declare function backoffDelay(
  attempt: number,
  options: { initialDelayMs: number; maxDelayMs: number; random?: () => number },
): number;
export declare function decodeJwtPayload(token: string | undefined | null): Record<string, unknown> | null;
export declare function uuidV7Floor(ms: number): string;
