// Test harness: the real notification-service binary, started like tests/common/mod.rs starts it (its
// own SQLite file, 127.0.0.1, two shards), found through NOTIFICATION_SERVICE_BIN (tests/js_sdk.rs sets
// it to the binary cargo built).
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** How long a single expectation may wait before the test fails. */
export const WAIT_MS = 10_000;

export function serverBinary() {
  const bin = process.env.NOTIFICATION_SERVICE_BIN;
  if (!bin) {
    throw new Error(
      'NOTIFICATION_SERVICE_BIN is not set: run these tests through `cargo test --test js_sdk`, or set it to target/debug/notification-service',
    );
  }
  return bin;
}

/** A port that was free a moment ago (for a server that must come back on the same port). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** A fresh folder for a server's database, removed by `dispose`. */
export function tempDir() {
  return mkdtempSync(join(tmpdir(), 'notif-js-'));
}

/** A running server process. */
export class TestServer {
  /**
   * Starts the binary with `env` on top of the defaults; resolves once it logs `listening`.
   * `dir` keeps the database (to restart on the same data); `port` 0 picks a free one.
   */
  static async start({ env = {}, dir = tempDir(), port = 0 } = {}) {
    const server = new TestServer(dir);
    await server._spawn(env, port);
    return server;
  }

  constructor(dir) {
    this.dir = dir;
    this.log = [];
  }

  _spawn(env, port) {
    this.env = env;
    const child = spawn(serverBinary(), [], {
      env: {
        PATH: process.env.PATH,
        PORT: String(port),
        HOST: '127.0.0.1',
        SHARDS: '2',
        DATABASE_URL: `sqlite://${this.dir}/notifications.db`,
        RUST_LOG: 'info',
        ...env,
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.child = child;
    this.exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        child.kill('SIGKILL');
        reject(new Error(`the server did not start:\n${this.log.join('\n')}`));
      }, WAIT_MS);
      const onLine = (line) => {
        this.log.push(line);
        const m = line.includes('listening') && line.match(/addr=(\S+)/);
        if (m) {
          clearTimeout(timer);
          this.addr = m[1];
          this.port = Number(m[1].split(':').pop());
          resolve();
        }
      };
      for (const stream of [child.stdout, child.stderr]) {
        let buffered = '';
        stream.setEncoding('utf8');
        stream.on('data', (chunk) => {
          buffered += chunk;
          let nl;
          while ((nl = buffered.indexOf('\n')) >= 0) {
            onLine(buffered.slice(0, nl));
            buffered = buffered.slice(nl + 1);
          }
        });
      }
      child.once('exit', (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`the server exited (${code ?? signal}) before listening:\n${this.log.join('\n')}`));
      });
    });
  }

  get httpUrl() {
    return `http://${this.addr}`;
  }

  get wsUrl() {
    return `ws://${this.addr}/ws`;
  }

  /** Sends `signal` and waits for the exit. */
  async stop(signal = 'SIGTERM') {
    if (this.child.exitCode != null || this.child.signalCode != null) return this.exited;
    this.child.kill(signal);
    return this.exited;
  }

  /** Stops with `signal` and starts again on the same port and database. */
  async restart(signal = 'SIGKILL') {
    await this.stop(signal);
    // A killed process's listening socket can outlive it by a few milliseconds (the kernel tears
    // down its io_uring instance asynchronously), and the new server refuses a port that is still
    // listened on: try again until it is free.
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
      try {
        await this._spawn(this.env, this.port);
        return;
      } catch (e) {
        if (!/Address already in use/.test(e.message) || Date.now() > deadline) throw e;
        this.log = [];
        await new Promise((r) => setTimeout(r, 50));
      }
    }
  }

  async dispose() {
    await this.stop('SIGKILL');
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** An HS256 JWT signed with `secret` (what a Laravel app would mint for its users). */
export function signJwt(secret, claims) {
  const b64 = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  const signature = createHmac('sha256', secret).update(body).digest('base64url');
  return `${body}.${signature}`;
}

/** Resolves when `check()` is truthy (with its value); rejects after `ms`, naming `what`. */
export async function waitFor(what, check, ms = WAIT_MS) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Resolves with the next `event` of an SDK client, or rejects after `ms`. */
export function nextEvent(client, event, ms = WAIT_MS) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`timed out after ${ms} ms waiting for the ${event} event`));
    }, ms);
    const off = client.on(event, (value) => {
      clearTimeout(timer);
      off();
      resolve(value);
    });
  });
}

/**
 * Clients made through `track` are closed by `closeTracked` (an afterEach hook), so a failing test
 * leaves no client reconnecting forever, which would keep node from exiting.
 */
const tracked = new Set();
export function track(client) {
  tracked.add(client);
  return client;
}
export function closeTracked() {
  for (const c of tracked) c.close();
  tracked.clear();
}
