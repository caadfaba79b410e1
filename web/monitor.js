// The monitor and demo page: live counts from /health and /metrics, a form that sends a notification
// over REST, and a live inbox built on the JavaScript SDK (clients/js/index.js, served beside this file
// as notifications.js). Credentials are asked for only when the server answers 401, and kept in this
// tab's sessionStorage.
import { ApiError, NotificationClient, RestClient, decodeJwtPayload } from './notifications.js';

const $ = (id) => document.getElementById(id);
const STATS_INTERVAL_MS = 2_000;
const PAGE_SIZE = 20;
const LOG_LINES = 50;

// ---- credentials ---------------------------------------------------------------------------------

const stored = (key) => sessionStorage.getItem(`notif.${key}`) ?? '';
for (const [input, key] of [
  ['api-key', 'apiKey'],
  ['metrics-token', 'metricsToken'],
  ['inbox-token', 'token'],
  ['inbox-user', 'user'],
  ['inbox-channels', 'channels'],
]) {
  $(input).value = stored(key);
  $(input).addEventListener('change', () => sessionStorage.setItem(`notif.${key}`, $(input).value.trim()));
}

const apiKey = () => $('api-key').value.trim();
const rest = () => new RestClient(location.origin, { apiKey: apiKey() || undefined });

/** Points at the credential a 401 asked for. */
function askFor(input, why) {
  $('credentials').classList.add('needs');
  $(input).classList.add('needs');
  $('credentials-note').textContent = why;
  $(input).focus({ preventScroll: true });
}

const CREDENTIALS_NOTE = $('credentials-note').textContent;

function clearAsk(input) {
  $(input).classList.remove('needs');
  if (!document.querySelector('#credentials input.needs, #inbox-token.needs')) {
    $('credentials').classList.remove('needs');
    $('credentials-note').textContent = CREDENTIALS_NOTE;
  }
}

// ---- live counts ---------------------------------------------------------------------------------

const METRICS = {
  notif_websocket_connections: 'stat-connections',
  notif_websocket_connections_total: 'stat-connections-total',
  notif_notifications_stored_total: 'stat-stored',
  notif_deliveries_total: 'stat-deliveries',
  notif_websocket_messages_total: 'stat-messages',
  notif_http_requests_total: 'stat-requests',
};
const RATES = {
  notif_notifications_stored_total: 'rate-stored',
  notif_deliveries_total: 'rate-deliveries',
  notif_websocket_messages_total: 'rate-messages',
  notif_http_requests_total: 'rate-requests',
};
let previous = null;

/** `name value` lines of the Prometheus text format (no labels are used by these counters). */
function parseMetrics(text) {
  const values = {};
  for (const line of text.split('\n')) {
    const m = /^([a-z_]+) ([0-9.e+-]+)$/.exec(line.trim());
    if (m) values[m[1]] = Number(m[2]);
  }
  return values;
}

async function pollStats() {
  try {
    const health = await rest().health();
    $('health').textContent = health.status === 'ok' ? 'healthy' : `${health.status} (store ${health.store})`;
    $('health').dataset.status = health.status;
    if (health.uptime_s != null) $('uptime').textContent = `up ${formatDuration(health.uptime_s)}, redis ${health.redis}`;
    if (health.connections != null) $('stat-connections').textContent = health.connections.toLocaleString();
  } catch {
    $('health').textContent = 'unreachable';
    $('health').dataset.status = 'down';
  }
  const token = $('metrics-token').value.trim();
  const response = await fetch('/metrics', { headers: token ? { Authorization: `Bearer ${token}` } : {} }).catch(() => null);
  if (response?.status === 401) {
    askFor('metrics-token', 'The server has METRICS_TOKEN set: enter it to see the counts.');
    $('stats-note').textContent = '/metrics wants the metrics token.';
    return;
  }
  if (!response?.ok) return;
  clearAsk('metrics-token');
  $('stats-note').textContent = '';
  const now = performance.now();
  const values = parseMetrics(await response.text());
  for (const [name, id] of Object.entries(METRICS)) {
    if (values[name] != null) $(id).textContent = values[name].toLocaleString();
  }
  if (previous) {
    const seconds = (now - previous.at) / 1000;
    for (const [name, id] of Object.entries(RATES)) {
      const delta = (values[name] ?? 0) - (previous.values[name] ?? 0);
      $(id).textContent = `${Math.max(0, delta / seconds).toFixed(1)}/s`;
    }
  }
  previous = { at: now, values };
}

function formatDuration(s) {
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return h ? `${h} h ${m} min` : m ? `${m} min ${s % 60} s` : `${s} s`;
}

pollStats();
setInterval(pollStats, STATS_INTERVAL_MS);

// ---- send form -----------------------------------------------------------------------------------

const list = (text) => text.split(',').map((s) => s.trim()).filter(Boolean);

$('send-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const body = { message: $('send-message').value };
  const user = $('send-user').value.trim();
  if (user) body.user_id = user;
  const channels = list($('send-channels').value);
  if (channels.length) body.channels = channels;
  if ($('send-broadcast').checked) body.broadcast = true;
  for (const field of ['type', 'title']) {
    const value = $(`send-${field}`).value.trim();
    if (value) body[field] = value;
  }
  const data = $('send-data').value.trim();
  if (data) {
    try {
      body.data = JSON.parse(data);
    } catch (e) {
      showSendResult(`data is not JSON: ${e.message}`, true);
      return;
    }
  }
  try {
    const { id } = await rest().send(body);
    clearAsk('api-key');
    showSendResult(`sent ${id}`, false);
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) askFor('api-key', 'The server has API_KEY set: enter a key to send.');
    showSendResult(e instanceof ApiError ? `${e.status} ${e.code}: ${e.message}` : String(e), true);
  }
});

function showSendResult(text, isError) {
  $('send-result').textContent = text;
  $('send-result').classList.toggle('error', isError);
}

// ---- inbox ---------------------------------------------------------------------------------------

/** One live inbox: the SDK client, the notifications shown, and what the unread badge counts. */
const inbox = {
  client: null,
  user: null,
  items: new Map(),
  // The badge is the server's unread count at the last history load, plus the unread ones of the
  // user that arrived since (ids above the newest of that load), less the ones marked read here since.
  serverUnread: null,
  snapshotNewest: null,
  readHere: new Set(),
  nextBefore: null,
};

function log(text) {
  const li = document.createElement('li');
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $('event-log').prepend(li);
  while ($('event-log').children.length > LOG_LINES) $('event-log').lastChild.remove();
}

$('connect-form').addEventListener('submit', (event) => {
  event.preventDefault();
  if (inbox.client) disconnect();
  else connect();
});

function connect() {
  const token = $('inbox-token').value.trim();
  const userField = $('inbox-user').value.trim();
  const user = userField || decodeJwtPayload(token)?.sub;
  if (!user && !token) {
    $('inbox-note').textContent = 'Enter a user id (or a token).';
    return;
  }
  Object.assign(inbox, {
    user: user == null ? null : String(user),
    items: new Map(),
    serverUnread: null,
    snapshotNewest: null,
    readHere: new Set(),
    nextBefore: null,
  });
  const client = new NotificationClient(location.origin, {
    userId: userField || undefined,
    token: token || undefined,
    channels: list($('inbox-channels').value),
  });
  inbox.client = client;
  client.on('state', (state) => {
    $('inbox-state').textContent = state;
    $('inbox-state').dataset.state = state;
  });
  client.on('connected', (e) => {
    clearAsk('inbox-token');
    log(`connected as ${e.user_id} (${e.connection_id})`);
    inbox.user = e.user_id;
    if (inbox.serverUnread == null) loadHistory();
  });
  client.on('subscribed', (e) => log(`subscribed ${e.channels.join(', ')}`));
  client.on('resumed', (e) => log(`resumed ${e.count} (complete: ${e.complete})`));
  client.on('disconnected', (e) => {
    log(`disconnected ${e.code}${e.reason ? ` ${e.reason}` : ''}${e.willReconnect ? `, retrying in ${e.delayMs} ms` : ''}`);
    // A browser sees a refused upgrade (401) only as a close without `connected`.
    if (e.code === 1006 && client.stats.connects === 0 && !token) {
      askFor('inbox-token', 'The connection was refused: the server may have JWT_SECRET set; enter a token for the inbox.');
    }
  });
  client.on('error', (e) => log(`error ${e.code}: ${e.message}`));
  client.on('notification', (n) => {
    inbox.items.set(n.id, n);
    render();
  });
  client.connect().catch(() => {});
  $('connect-button').textContent = 'Disconnect';
  render();
}

function disconnect() {
  inbox.client.close();
  inbox.client = null;
  $('connect-button').textContent = 'Connect';
  $('read-all-button').disabled = true;
  $('older-button').hidden = true;
}

async function loadHistory(before) {
  if (!inbox.user) return;
  try {
    const page = await rest().history(inbox.user, { limit: PAGE_SIZE, before });
    clearAsk('api-key');
    $('inbox-note').textContent = '';
    for (const n of page.notifications) if (!inbox.items.has(n.id)) inbox.items.set(n.id, n);
    if (!before) {
      inbox.serverUnread = page.unread;
      inbox.snapshotNewest = page.notifications[0]?.id ?? '';
      inbox.readHere = new Set();
    }
    inbox.nextBefore = page.next_before;
    $('read-all-button').disabled = false;
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      askFor('api-key', 'The server has API_KEY set: enter a key to see the history (live notifications arrive without it).');
      $('inbox-note').textContent = 'history needs the API key; showing live notifications only';
    } else {
      $('inbox-note').textContent = `history: ${e.message}`;
    }
  }
  render();
}

function unreadCount() {
  const mine = [...inbox.items.values()].filter((n) => n.user_id === inbox.user);
  if (inbox.serverUnread == null) return mine.filter((n) => !n.read).length;
  const arrived = mine.filter((n) => n.id > inbox.snapshotNewest && !n.read).length;
  return Math.max(0, inbox.serverUnread + arrived - inbox.readHere.size);
}

function markRead(n) {
  if (n.read) return;
  inbox.client.read(n.id);
  // Counted in the server's unread of the last load only if it was older than that load's newest.
  if (inbox.serverUnread != null && n.id <= inbox.snapshotNewest) inbox.readHere.add(n.id);
  n.read = true;
  n.read_at = new Date().toISOString();
  render();
}

$('read-all-button').addEventListener('click', async () => {
  try {
    await rest().markAllRead(inbox.user);
    inbox.items = new Map();
    inbox.serverUnread = null;
    await loadHistory();
  } catch (e) {
    $('inbox-note').textContent = `read-all: ${e.message}`;
  }
});

$('older-button').addEventListener('click', () => loadHistory(inbox.nextBefore));

function render() {
  const count = unreadCount();
  const badge = $('inbox-badge');
  badge.textContent = String(count);
  badge.dataset.count = String(count);
  badge.hidden = !inbox.client;
  const ul = $('inbox-list');
  ul.replaceChildren();
  const sorted = [...inbox.items.values()].sort((a, b) => (a.id < b.id ? 1 : -1));
  for (const n of sorted) {
    const li = document.createElement('li');
    li.className = 'notification';
    li.dataset.id = n.id;
    li.dataset.read = String(Boolean(n.read));
    const head = document.createElement('div');
    head.className = 'head';
    const title = document.createElement('strong');
    title.textContent = n.title || n.type;
    const meta = document.createElement('span');
    meta.className = 'muted';
    const via = n.channel ? `#${n.channel}` : n.broadcast ? 'broadcast' : n.type;
    meta.textContent = `${via} · ${new Date(n.timestamp).toLocaleTimeString()}`;
    head.append(title, meta);
    const message = document.createElement('p');
    message.className = 'message';
    message.textContent = n.message;
    li.append(head, message);
    if (n.data && Object.keys(n.data).length) {
      const data = document.createElement('code');
      data.textContent = JSON.stringify(n.data);
      li.append(data);
    }
    if (!n.read && n.user_id === inbox.user && inbox.client) {
      const button = document.createElement('button');
      button.type = 'button';
      button.className = 'mark-read';
      button.textContent = 'Mark read';
      button.addEventListener('click', () => markRead(n));
      li.append(button);
    }
    ul.append(li);
  }
  $('older-button').hidden = !inbox.nextBefore || !inbox.client;
}
