// Quota taken ahead from Redis (`redis.lease`) through the official OpenAI
// Node SDK: two instances on one redis-server share tenant acme's limit,
// the SDK sees OpenAI's rate-limit error with the limit's headers, and each
// request is billed once, whichever instance served it.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import { Mock, Gateway, Redis, metricSum } from './harness.js';

let mock, redis, gateways;
before(async () => {
  mock = await Mock.start();
  redis = await Redis.start();
  const lease = `redis: { url: "${redis.url}", timeout_ms: 2000, lease: { share: 0.25, ms: 5000 } }`;
  // 20 a minute (one more every 3 s); a share of 5 ahead per instance.
  const limits = '{ requests_per_minute: 20, max_concurrent: 8 }';
  gateways = [await Gateway.start(mock, lease, undefined, limits), await Gateway.start(mock, lease, undefined, limits)];
  // Until Redis has answered, each instance would admit in process, alone.
  for (const g of gateways) await g.ready();
});
after(() => { gateways?.forEach((g) => g.stop()); redis?.stop(); mock?.stop(); });

test('two leasing instances share one limit and bill each request once', async () => {
  const chats = async () => (await mock.requests()).filter((r) => r.path.includes('chat/completions')).length;
  const before = await chats();
  let served = 0;
  let refused = 0;
  let streamed = 0;
  const started = Date.now();
  for (let i = 0; i < 30; i++) {
    const client = gateways[i % 2].client();
    try {
      if (i % 3 === 0) {
        const stream = await client.chat.completions.create({
          model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }], stream: true, stream_options: { include_usage: true },
        });
        let usage = null;
        for await (const chunk of stream) if (chunk.usage) usage = chunk.usage;
        assert.ok(usage && usage.completion_tokens > 0);
        streamed++;
      } else {
        const { data, response } = await client.chat.completions.create({
          model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }],
        }).withResponse();
        assert.ok(data.choices[0].message.content);
        const header = response.headers.get('x-ratelimit-remaining-requests');
        assert.notEqual(header, null);
        const remaining = Number(header);
        assert.ok(remaining >= 0 && remaining < 20, `remaining ${header}`);
      }
      served++;
    } catch (e) {
      assert.ok(e instanceof OpenAI.RateLimitError, String(e));
      assert.equal(e.code, 'rate_limit_exceeded');
      assert.equal(e.headers.get('x-ratelimit-limit-requests'), '20');
      assert.ok(Number(e.headers.get('retry-after')) >= 1);
      refused++;
    }
  }
  // Never more than the limit and its refill (one every 3 s) while the
  // test ran; what each instance holds unused is at most its share.
  const refill = Math.floor((Date.now() - started) / 3000) + 1;
  assert.ok(served >= 10 && served <= 20 + refill, `served ${served}, refused ${refused}, refill ${refill}`);
  assert.ok(streamed >= 1);
  assert.equal((await chats()) - before, served);
  // Both instances admitted some without a round trip to Redis.
  for (const g of gateways) {
    assert.ok(metricSum(await g.metrics(), 'runestone_leased_admissions_total', ['tenant="acme"']) >= 1);
  }
  // Owed usage reaches Redis within a quarter lease: both instances see
  // every request once.
  for (const g of gateways) {
    const deadline = Date.now() + 10000;
    for (;;) {
      const usage = await g.usage();
      if (usage.requests === served) break;
      assert.ok(Date.now() < deadline, JSON.stringify(usage));
      await new Promise((r) => setTimeout(r, 50));
    }
  }
});
