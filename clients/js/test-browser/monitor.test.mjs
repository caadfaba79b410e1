// The monitor page in headless Chromium (puppeteer-core; the browser is $CHROMIUM, tests/monitor_page.rs
// finds it). The server wants an API key and a metrics token, so the page must ask for both; then it
// shows live counts, its inbox (built on the SDK) shows the history and a notification sent over REST
// with the unread badge, marking one read updates the badge and the server, and the form sends.
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import { after, before, test } from 'node:test';
import puppeteer from 'puppeteer-core';

import { RestClient } from '../index.js';
import { TestServer, signJwt, waitFor } from '../test/server.mjs';

const API_KEY = 'monitor-key';
const METRICS_TOKEN = 'monitor-metrics';
const USER = 'ana';

let server;
let browser;
let page;
const problems = [];

before(async () => {
  server = await TestServer.start({ env: { API_KEY, METRICS_TOKEN } });
  browser = await puppeteer.launch({
    executablePath: process.env.CHROMIUM ?? 'chromium',
    headless: true,
    // --no-sandbox: CI runs as root, where Chromium's sandbox cannot start.
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
  page = await browser.newPage();
  await page.setViewport({ width: 1280, height: 980 });
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    // The 401s the page provokes on purpose (to find out what the server wants) are logged by Chromium.
    if (m.type() === 'error' && !/status of 401/.test(m.text())) problems.push(`console: ${m.text()}`);
  });
});

after(async () => {
  await browser?.close();
  await server?.dispose();
});

const text = (selector) => page.$eval(selector, (e) => e.textContent.trim());
const attr = (selector, name) => page.$eval(selector, (e, n) => e.getAttribute(n), name);
const badge = () => attr('#inbox-badge', 'data-count');

/** Types into an input and fires `change`, as a user leaving the field does. */
async function fill(selector, value) {
  await page.$eval(selector, (e) => {
    e.value = '';
  });
  await page.type(selector, value);
  await page.$eval(selector, (e) => e.dispatchEvent(new Event('change')));
}

test('the monitor page: credentials, counts, live inbox with badge, mark read, history pages, send form', async () => {
  const rest = new RestClient(server.httpUrl, { apiKey: API_KEY });
  // An inbox with history: 22 unread, more than one page of 20.
  const { ids: old } = await rest.batch(
    Array.from({ length: 22 }, (_, i) => ({ user_id: USER, type: 'tarea', title: `Tarea ${i + 1}`, message: `Revisar el informe ${i + 1}` })),
  );

  const response = await page.goto(server.httpUrl, { waitUntil: 'domcontentloaded' });
  assert.equal(response.status(), 200, 'the page loads without an API key');

  // /metrics answers 401: the page asks for the metrics token.
  await page.waitForSelector('#credentials.needs #metrics-token.needs');
  assert.match(await text('#credentials-note'), /METRICS_TOKEN/);
  await fill('#metrics-token', METRICS_TOKEN);
  await page.waitForFunction(() => /^\d/.test(document.getElementById('stat-stored').textContent));
  assert.equal(await text('#stat-stored'), '22');
  assert.equal(await attr('#health', 'data-status'), 'ok');

  // The inbox without an API key: live works, history asks for the key.
  await fill('#inbox-user', USER);
  await page.click('#connect-button');
  await page.waitForSelector('#inbox-state[data-state="open"]');
  await page.waitForSelector('#api-key.needs');
  await fill('#api-key', API_KEY);
  // Reconnect, now with the key: the first history page and the unread count of the whole inbox.
  await page.click('#connect-button');
  await page.click('#connect-button');
  await page.waitForFunction(() => document.querySelectorAll('#inbox-list .notification').length === 20);
  await waitFor('the badge at 22', async () => (await badge()) === '22');
  assert.equal(await page.$eval('#older-button', (e) => e.hidden), false);

  // Sent over REST: appears live, unread, and the badge counts it.
  const { id } = await rest.send({
    user_id: USER,
    type: 'tarea',
    title: 'Nueva Tarea Asignada',
    message: 'Se te ha asignado una tarea importante',
    data: { priority: 'high', task_id: 'task456' },
  });
  const item = `.notification[data-id="${id}"]`;
  await page.waitForSelector(item);
  assert.match(await page.$eval(item, (e) => e.textContent), /Se te ha asignado una tarea importante/);
  assert.equal(await attr(item, 'data-read'), 'false');
  await waitFor('the badge at 23', async () => (await badge()) === '23');
  const first = await page.$eval('#inbox-list .notification', (e) => e.dataset.id);
  assert.equal(first, id, 'newest first');

  // Mark read: the badge goes down, the item shows read, and the server has it read.
  await page.click(`${item} .mark-read`);
  await waitFor('the badge at 22 again', async () => (await badge()) === '22');
  assert.equal(await attr(item, 'data-read'), 'true');
  await waitFor('read on the server', async () => (await rest.history(USER, { limit: 1 })).notifications[0].read);
  assert.equal((await rest.history(USER)).unread, 22);

  // Older: the second history page.
  await page.click('#older-button');
  await page.waitForFunction(() => document.querySelectorAll('#inbox-list .notification').length === 23);
  assert.equal(await page.$$eval(`.notification[data-id="${old[0]}"]`, (e) => e.length), 1);
  assert.equal(await page.$eval('#older-button', (e) => e.hidden), true);
  assert.equal(await badge(), '22');

  // The form sends over REST with the key; the inbox gets it live.
  await fill('#send-user', USER);
  await fill('#send-title', 'Recordatorio');
  await fill('#send-message', 'La reunión empieza en 10 minutos');
  await fill('#send-data', '{"room": "B-12"}');
  await page.click('#send-button');
  await page.waitForFunction(() => document.getElementById('send-result').textContent.startsWith('sent '));
  const sentId = (await text('#send-result')).slice('sent '.length);
  await page.waitForSelector(`.notification[data-id="${sentId}"]`);
  await waitFor('the badge at 23', async () => (await badge()) === '23');
  // A bad data field is refused by the page, not sent.
  await fill('#send-data', '{not json');
  await page.click('#send-button');
  await page.waitForFunction(() => document.getElementById('send-result').textContent.startsWith('data is not JSON'));

  // The live counts move with what was sent (polled every 2 s).
  await page.waitForFunction(() => document.getElementById('stat-stored').textContent === '24');
  assert.equal(await text('#stat-connections'), '1');

  // The screenshot the README shows: the form as it was used, the list scrolled to the top.
  await fill('#send-data', '{"room": "B-12"}');
  await page.$eval('#send-result', (e) => {
    e.textContent = '';
  });
  await page.evaluate(() => {
    document.activeElement?.blur();
    window.scrollTo(0, 0);
  });
  const path = process.env.MONITOR_SCREENSHOT;
  if (path) {
    mkdirSync(dirname(path), { recursive: true });
    await page.screenshot({ path });
  }
  assert.deepEqual(problems, []);
});

test('with JWT_SECRET the page asks for a token, and connects the inbox with it', async (t) => {
  const secret = 'monitor-secret';
  const jwtServer = await TestServer.start({ env: { JWT_SECRET: secret } });
  t.after(() => jwtServer.dispose());
  const tab = await browser.newPage();
  t.after(() => tab.close());
  await tab.goto(jwtServer.httpUrl, { waitUntil: 'domcontentloaded' });
  await tab.$eval('#inbox-token', (e) => {
    e.value = '';
  });
  await tab.$eval('#inbox-user', (e) => {
    e.value = 'bea';
  });
  await tab.click('#connect-button');
  // The upgrade is refused (401), which a browser sees only as a close: the page asks for a token.
  await tab.waitForSelector('#inbox-token.needs');
  await tab.click('#connect-button'); // disconnect
  const token = signJwt(secret, { sub: 'bea', exp: Math.floor(Date.now() / 1000) + 600 });
  await tab.$eval('#inbox-user', (e) => {
    e.value = '';
  });
  await tab.type('#inbox-token', token);
  await tab.click('#connect-button');
  await tab.waitForSelector('#inbox-state[data-state="open"]');
  await tab.waitForFunction(() => !document.getElementById('inbox-token').classList.contains('needs'));
  // The user comes from the token's sub; a send (no API_KEY here) arrives live.
  const { id } = await new RestClient(jwtServer.httpUrl).send({ user_id: 'bea', message: 'con token' });
  await tab.waitForSelector(`.notification[data-id="${id}"]`);
  assert.equal(await tab.$eval('#inbox-badge', (e) => e.dataset.count), '1');
});
