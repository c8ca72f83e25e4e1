// Starts runestone-mock and runestone on free loopback ports (the binaries
// cargo built: target/debug, or RUNESTONE_BIN_DIR), waits for readiness,
// and stops them. The Node counterpart of tests/sdk/conftest.py.
import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync, rmSync, readFileSync } from 'node:fs';
import { createServer, connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import OpenAI from 'openai';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const BIN = process.env.RUNESTONE_BIN_DIR ?? join(ROOT, 'target', 'debug');
export const TENANT_KEY = 'sk-node-tenant-key-0001';
export const OTHER_KEY = 'sk-node-other-key-0002';
export const PROVIDER_KEY = 'sk-node-provider-key-0003';

export function freePort() {
  return new Promise((ok, fail) => {
    const server = createServer();
    server.unref();
    server.on('error', fail);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => ok(port));
    });
  });
}

async function waitReady(url, child, what) {
  const deadline = Date.now() + 20000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`${what} exited during start-up`);
    try {
      const resp = await fetch(url);
      if (resp.ok) return;
    } catch {}
    if (Date.now() > deadline) throw new Error(`${what} not ready at ${url}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** runestone-mock, with its control API. */
export class Mock {
  static async start(...args) {
    const mock = new Mock();
    mock.port = await freePort();
    mock.proc = spawn(join(BIN, 'runestone-mock'), ['--listen', `127.0.0.1:${mock.port}`, '--api-key', PROVIDER_KEY, ...args], { stdio: 'ignore' });
    await waitReady(`http://127.0.0.1:${mock.port}/health`, mock.proc, 'runestone-mock');
    return mock;
  }
  get baseURL() { return `http://127.0.0.1:${this.port}/v1`; }
  async fault(spec) {
    await fetch(`http://127.0.0.1:${this.port}/_mock/faults`, { method: 'POST', body: JSON.stringify(spec) });
  }
  async requests() { return (await fetch(`http://127.0.0.1:${this.port}/_mock/requests`)).json(); }
  stop() { this.proc.kill('SIGKILL'); }
}

/** redis-server (from PATH) on a free port, answering PING. */
export class Redis {
  static async start() {
    const redis = new Redis();
    redis.port = await freePort();
    redis.proc = spawn('redis-server', ['--port', String(redis.port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
    let failed = null;
    redis.proc.on('error', (e) => { failed = e; });
    const deadline = Date.now() + 20000;
    while (!(await redis.ping())) {
      if (failed) throw new Error(`cannot start redis-server: ${failed.message}`);
      if (redis.proc.exitCode !== null) throw new Error('redis-server exited during start-up');
      if (Date.now() > deadline) throw new Error(`redis-server not ready on port ${redis.port}`);
      await new Promise((r) => setTimeout(r, 20));
    }
    return redis;
  }
  get url() { return `redis://127.0.0.1:${this.port}/0`; }
  /** Whether it answers PING within half a second. */
  ping() {
    return new Promise((ok) => {
      const socket = connect(this.port, '127.0.0.1');
      let answer = '';
      const done = (answered) => { socket.destroy(); ok(answered); };
      socket.setTimeout(500, () => done(false));
      socket.on('connect', () => socket.write('PING\r\n'));
      socket.on('data', (data) => {
        answer += data;
        if (answer.includes('\r\n')) done(answer.startsWith('+PONG'));
      });
      socket.on('error', () => done(false));
      socket.on('close', () => done(false));
    });
  }
  stop() { this.proc.kill('SIGKILL'); }
}

/** runestone in front of `mock`: models `gpt-4o-mini` (at `price`),
 * `claude`, an embeddings model, and moderation, image, speech and
 * transcription models; tenants `acme` (all, with `acmeLimits` as its
 * `limits` when given) and `other`; `extra` is YAML added at the top
 * level. */
export class Gateway {
  static async start(mock, extra = '', price = '{ input: 1.0, output: 2.0 }', acmeLimits = '') {
    const gw = new Gateway();
    gw.port = await freePort();
    gw.metricsPort = await freePort();
    gw.dir = mkdtempSync(join(tmpdir(), 'runestone-node-'));
    const config = `
server:
  listen: "127.0.0.1:${gw.port}"
  metrics_listen: "127.0.0.1:${gw.metricsPort}"
  grace_period_seconds: 1
  pid_file: "${gw.dir}/gw.pid"
  upgrade_sock: "${gw.dir}/gw.sock"
providers:
  - { name: mock, base_url: "${mock.baseURL}", api_key: "${PROVIDER_KEY}" }
  - { name: claude, kind: anthropic, base_url: "http://127.0.0.1:${mock.port}", api_key: "${PROVIDER_KEY}" }
models:
  - name: gpt-4o-mini
    targets: [{ provider: mock, model: mock-small }]
  - name: text-embedding-3-small
    targets: [{ provider: mock }]
  - name: claude
    targets: [{ provider: claude, model: claude-test }]
  - name: omni-moderation-latest
    targets: [{ provider: mock }]
  - name: dall-e-3
    targets: [{ provider: mock }]
  - name: tts-1
    targets: [{ provider: mock }]
  - name: whisper-1
    targets: [{ provider: mock, model: whisper-prod }]
tenants:
  - id: acme
    keys: ["${TENANT_KEY}"]${acmeLimits ? `\n    limits: ${acmeLimits}` : ''}
  - id: other
    keys: ["${OTHER_KEY}"]
    models: [text-embedding-3-small]
pricing:
  gpt-4o-mini: ${price}
${extra}`;
    const path = join(gw.dir, 'runestone.yaml');
    writeFileSync(path, config);
    gw.proc = spawn(join(BIN, 'runestone'), ['--config', path], { stdio: 'ignore' });
    await waitReady(`http://127.0.0.1:${gw.port}/health`, gw.proc, 'runestone');
    await waitReady(`http://127.0.0.1:${gw.metricsPort}/metrics`, gw.proc, "runestone's metrics");
    return gw;
  }
  client(key = TENANT_KEY) {
    return new OpenAI({ baseURL: `http://127.0.0.1:${this.port}/v1`, apiKey: key, maxRetries: 0, timeout: 30000 });
  }
  async metrics() { return (await fetch(`http://127.0.0.1:${this.metricsPort}/metrics`)).text(); }
  /** Waits until `/ready` answers 200 (with Redis: once Redis answered). */
  async ready() {
    await waitReady(`http://127.0.0.1:${this.port}/ready`, this.proc, 'runestone, ready');
  }
  /** `/v1/usage` as `key`'s tenant sees it. */
  async usage(key = TENANT_KEY) {
    return (await fetch(`http://127.0.0.1:${this.port}/v1/usage`, { headers: { authorization: `Bearer ${key}` } })).json();
  }
  stop() {
    this.proc.kill('SIGKILL');
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** The sum of `name`'s samples whose labels contain every one of `labels`. */
export function metricSum(text, name, labels = []) {
  return text.split('\n')
    .filter((l) => l.startsWith(`${name}{`) && labels.every((x) => l.includes(x)))
    .reduce((sum, l) => sum + Number(l.split(' ').pop()), 0);
}
