// The official OpenAI Node SDK (7.x) through runestone, against runestone-mock.
import { test, before, after } from 'node:test';
import { createServer } from 'node:http';
import assert from 'node:assert/strict';
import OpenAI, { toFile } from 'openai';
import { Mock, Gateway, OTHER_KEY, metricSum } from './harness.js';

let mock, gw, client;
before(async () => {
  mock = await Mock.start();
  gw = await Gateway.start(mock);
  client = gw.client();
});
after(() => { gw?.stop(); mock?.stop(); });

test('chat completions, JSON and streamed with usage', async () => {
  const answer = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }] });
  assert.equal(answer.object, 'chat.completion');
  assert.ok(answer.usage.completion_tokens > 0);
  let text = '';
  let usage = null;
  const stream = await client.chat.completions.create({
    model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }], stream: true, stream_options: { include_usage: true },
  });
  for await (const chunk of stream) {
    text += chunk.choices[0]?.delta?.content ?? '';
    if (chunk.usage) usage = chunk.usage;
  }
  assert.ok(text.startsWith('tok0 '));
  assert.ok(usage && usage.completion_tokens > 0);
});

test('the chat helpers: stream() to its final completion, and a streamed tool call through the Anthropic translation', async () => {
  const runner = client.chat.completions.stream({
    model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }], stream_options: { include_usage: true },
  });
  let deltas = '';
  runner.on('content', (delta) => { deltas += delta; });
  const final = await runner.finalChatCompletion();
  assert.equal(final.choices[0].message.content, deltas);
  assert.ok(deltas.startsWith('tok0 '));
  assert.ok(final.usage.completion_tokens > 0);
  const tools = [{ type: 'function', function: { name: 'lookup', parameters: { type: 'object' } } }];
  const called = await client.chat.completions.stream({
    model: 'claude', messages: [{ role: 'user', content: 'use the tool' }], tools, parallel_tool_calls: false,
  }).finalChatCompletion();
  const message = called.choices[0].message;
  assert.equal(message.tool_calls[0].function.name, 'lookup');
  assert.doesNotThrow(() => JSON.parse(message.tool_calls[0].function.arguments));
  assert.equal(called.choices[0].finish_reason, 'tool_calls');
});

test('embeddings in the SDK default (base64) come back decoded', async () => {
  const resp = await client.embeddings.create({ model: 'text-embedding-3-small', input: ['a', 'b'] });
  assert.equal(resp.data.length, 2);
  assert.ok(Array.isArray(resp.data[0].embedding) && resp.data[0].embedding.length > 0);
});

test('models: list and retrieve, scoped to the tenant', async () => {
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  assert.deepEqual(ids.sort(), ['claude', 'dall-e-3', 'gpt-4o-mini', 'omni-moderation-latest', 'text-embedding-3-small', 'tts-1', 'whisper-1']);
  const model = await client.models.retrieve('gpt-4o-mini');
  assert.equal(model.id, 'gpt-4o-mini');
  assert.equal(model.object, 'model');
  await assert.rejects(gw.client(OTHER_KEY).models.retrieve('gpt-4o-mini'), (e) => e instanceof OpenAI.NotFoundError && e.code === 'model_not_found');
  await assert.rejects(client.models.retrieve('no-such-model'), OpenAI.NotFoundError);
});

test('errors keep their classes: a bad key, a model not allowed', async () => {
  await assert.rejects(gw.client('sk-wrong-key-000000').chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'x' }] }), OpenAI.AuthenticationError);
  await assert.rejects(gw.client(OTHER_KEY).chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'x' }] }), (e) => e.status === 403 || e.status === 404);
  const metrics = await gw.metrics();
  assert.ok(metricSum(metrics, 'runestone_requests_total') >= 2);
});

test('responses: create, stream, retrieve, input items, delete; another tenant gets 404', async () => {
  const created = await client.responses.create({ model: 'gpt-4o-mini', input: 'hello there', max_output_tokens: 4 });
  assert.ok(created.id.startsWith('resp_'));
  assert.equal(created.usage.output_tokens, 4);
  const events = [];
  const stream = await client.responses.create({ model: 'gpt-4o-mini', input: 'hi', stream: true, previous_response_id: created.id });
  for await (const event of stream) events.push(event.type);
  assert.equal(events[0], 'response.created');
  assert.equal(events.at(-1), 'response.completed');
  const helper = client.responses.stream({ model: 'gpt-4o-mini', input: 'hi' });
  const final = await helper.finalResponse();
  assert.equal(final.status, 'completed');
  const got = await client.responses.retrieve(created.id);
  assert.equal(got.id, created.id);
  const items = [];
  for await (const item of client.responses.inputItems.list(created.id)) items.push(item);
  assert.equal(items[0].content[0].text, 'hello there');
  await assert.rejects(gw.client(OTHER_KEY).responses.retrieve(created.id), (e) => e instanceof OpenAI.NotFoundError && e.code === 'response_not_found');
  await client.responses.delete(created.id);
  await assert.rejects(client.responses.retrieve(created.id), OpenAI.NotFoundError);
});

test('a Responses stream that breaks after its text began ends with the error event, numbered past the others', async () => {
  await mock.fault({ disconnect_after_chunks: 6, count: 1, path: '/v1/responses' });
  const events = [];
  const stream = await client.responses.create({ model: 'gpt-4o-mini', input: 'hi', stream: true, max_output_tokens: 20 });
  // SDK 7 throws a stream's `event: error` as an APIError carrying the
  // event (6.x yielded it): the events before it arrive first.
  await assert.rejects(
    (async () => { for await (const event of stream) events.push(event); })(),
    (error) => {
      assert.ok(error instanceof OpenAI.APIError, String(error));
      assert.match(error.message, /broke off|before it finished/);
      assert.equal(error.code, 'upstream_error');
      assert.equal(error.error.type, 'error');
      // The SDK's ResponseStream, resuming `starting_after` a number, passes
      // on only events numbered past it: the error is numbered after the last.
      assert.equal(error.error.sequence_number, events.length);
      return true;
    },
  );
  assert.ok(events.some((e) => e.type === 'response.output_text.delta'));
  assert.deepEqual(events.map((e) => e.sequence_number), events.map((_, i) => i));
});

test('moderations, images, speech and a multipart transcription', async () => {
  const moderation = await client.moderations.create({ input: ['fine', 'flagme'] });
  assert.deepEqual(moderation.results.map((r) => r.flagged), [false, true]);
  const images = await client.images.generate({ model: 'dall-e-3', prompt: 'a cat', n: 2 });
  assert.equal(images.data.length, 2);
  const speech = await client.audio.speech.create({ model: 'tts-1', voice: 'alloy', input: 'Hello' });
  assert.equal(speech.headers.get('content-type'), 'audio/mpeg');
  const audio = Buffer.from(await speech.arrayBuffer());
  assert.equal(audio.length, 5 * 64);
  const file = await toFile(Buffer.alloc(32000), 'clip.wav', { type: 'audio/wav' });
  const transcript = await client.audio.transcriptions.create({ model: 'whisper-1', file });
  assert.equal(transcript.text, 'mock transcript of 32000 bytes');
  const sent = (await mock.requests()).filter((r) => r.path.includes('transcriptions')).at(-1);
  assert.equal(sent.model, 'whisper-prod');
});

test('async jobs: one per Idempotency-Key, polled, listed and cancelled; a reused key is a ConflictError', async () => {
  const submit = (content, key) => client.chat.completions
    .create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content }] },
      { headers: { prefer: 'respond-async', 'Idempotency-Key': key } })
    .asResponse();
  const first = await submit('node job', 'node-order-1');
  assert.equal(first.status, 202);
  const { id } = await first.json();
  const again = await submit('node job', 'node-order-1');
  assert.equal(again.headers.get('idempotent-replayed'), 'true');
  assert.equal(again.headers.get('location'), `/v1/jobs/${id}`);
  await assert.rejects(submit('another body', 'node-order-1'),
    (e) => e instanceof OpenAI.ConflictError && e.code === 'idempotency_key_reused');
  let done;
  for (let i = 0; i < 400; i++) {
    done = await client.get(`/jobs/${id}`).asResponse();
    if (done.status !== 202) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  assert.equal(done.status, 200);
  assert.equal((await done.json()).object, 'chat.completion');
  const page = await client.get('/jobs', { query: { limit: 1 } });
  assert.deepEqual(page.data.map((j) => [j.id, j.status]), [[id, 'completed']]);
  const ended = await client.delete(`/jobs/${id}`);
  assert.equal(ended.status, 'completed');
  await assert.rejects(gw.client(OTHER_KEY).get(`/jobs/${id}`), OpenAI.NotFoundError);
});

test('the response cache: a stream replays a JSON answer, JSON a stream, base64 embeddings hit', async () => {
  const cached = await Gateway.start(mock, 'cache: {}');
  try {
    const c = cached.client();
    const ask = { model: 'gpt-4o-mini', temperature: 0, messages: [{ role: 'user', content: 'node cache' }] };
    const first = await c.chat.completions.create(ask).withResponse();
    assert.equal(first.response.headers.get('x-runestone-cache'), 'miss');
    const stream = await c.chat.completions.create({ ...ask, stream: true, stream_options: { include_usage: true } }).withResponse();
    assert.equal(stream.response.headers.get('x-runestone-cache'), 'hit');
    let text = '';
    let usage = null;
    for await (const chunk of stream.data) {
      text += chunk.choices[0]?.delta?.content ?? '';
      if (chunk.usage) usage = chunk.usage;
    }
    assert.equal(text, first.data.choices[0].message.content);
    assert.deepEqual(usage, first.data.usage);

    const streamed = { model: 'gpt-4o-mini', seed: 7, messages: [{ role: 'user', content: 'node stream first' }] };
    let original = '';
    for await (const chunk of await c.chat.completions.create({ ...streamed, stream: true })) {
      original += chunk.choices[0]?.delta?.content ?? '';
    }
    const replay = await c.chat.completions.create(streamed).withResponse();
    assert.equal(replay.response.headers.get('x-runestone-cache'), 'hit');
    assert.equal(replay.data.choices[0].message.content, original);

    const input = { model: 'text-embedding-3-small', input: ['x', 'y'] };
    const e1 = await c.embeddings.create(input).withResponse();
    const e2 = await c.embeddings.create(input).withResponse();
    assert.equal(e2.response.headers.get('x-runestone-cache'), 'hit');
    assert.deepEqual(e2.data.data[1].embedding, e1.data.data[1].embedding);
    assert.equal(metricSum(await cached.metrics(), 'runestone_cache_total', ['outcome="hit"']), 3);
  } finally {
    cached.stop();
  }
});

test('a loosely written stream (retry, id, an event with no data, stray blank lines, \\r line ends, a comment not UTF-8) reaches the SDK whole', async () => {
  const ident = { id: 'chatcmpl-quirky', object: 'chat.completion.chunk', created: 7, model: 'm' };
  const chunk = (delta, finish = null) => JSON.stringify({ ...ident, choices: [{ index: 0, delta, finish_reason: finish }] });
  const usage = JSON.stringify({ ...ident, choices: [], usage: { prompt_tokens: 5, completion_tokens: 3, total_tokens: 8 } });
  const body = Buffer.concat([
    Buffer.from(`retry: 3000\r\n\r\nid: 1\rdata: ${chunk({ role: 'assistant', content: '' })}\r\revent: ping\n\n`),
    Buffer.from([0x3a, 0x20, 0xff, 0xfe, 0x0a, 0x0a]),
    Buffer.from(`\ndata: ${chunk({ content: 'Hello ' })}\r\n\r\nid\ndata: ${chunk({ content: 'world.' })}\n\n\n`),
    Buffer.from(`data: ${chunk({}, 'stop')}\r\rdata: ${usage}\n\ndata: [DONE]\n\n`),
  ]);
  const provider = createServer((req, res) => {
    req.resume();
    req.on('end', () => { res.writeHead(200, { 'content-type': 'text/event-stream' }); res.end(body); });
  });
  await new Promise((done) => provider.listen(0, '127.0.0.1', done));
  const { port } = provider.address();
  const quirky = await Gateway.start({ baseURL: `http://127.0.0.1:${port}/v1`, port });
  try {
    for (const includeUsage of [true, false]) {
      const billed = metricSum(await quirky.metrics(), 'runestone_tokens_total', ['kind="completion"']);
      let text = '';
      const usages = [];
      const stream = await quirky.client().chat.completions.create({
        model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }], stream: true,
        stream_options: { include_usage: includeUsage },
      });
      for await (const c of stream) {
        text += c.choices[0]?.delta?.content ?? '';
        if (c.usage) usages.push(c.usage.completion_tokens);
      }
      assert.equal(text, 'Hello world.');
      assert.deepEqual(usages, includeUsage ? [3] : []);
      assert.equal(metricSum(await quirky.metrics(), 'runestone_tokens_total', ['kind="completion"']) - billed, 3);
    }
  } finally {
    quirky.stop();
    provider.close();
  }
});

test('processing tiers: billed at the tier the answer names, a tier not priced refused', async () => {
  const tiered = await Gateway.start(mock, '',
    '{ input: 1.0, output: 2.0, service_tiers: { priority: { input: 3.0, output: 6.0 } } }');
  try {
    const client = tiered.client();
    const cost = async () => metricSum(await tiered.metrics(), 'runestone_cost_usd_total');
    // Streamed through SDK 7's helper: every chunk names the tier.
    const runner = client.chat.completions.stream({
      model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }],
      service_tier: 'fast', stream_options: { include_usage: true },
    });
    const streamed = await runner.finalChatCompletion();
    assert.equal(streamed.service_tier, 'priority');
    const atPriority = (u) => (u.prompt_tokens * 3 + u.completion_tokens * 6) / 1e6;
    assert.ok(Math.abs(await cost() - atPriority(streamed.usage)) < 1e-12);
    // Asked for priority, served (and so billed) at the standard tier.
    const before = await cost();
    const downgraded = await client.chat.completions.create({
      model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }],
      service_tier: 'priority', mock_service_tier: 'default',
    });
    assert.equal(downgraded.service_tier, 'default');
    const u = downgraded.usage;
    assert.ok(Math.abs(await cost() - before - (u.prompt_tokens * 1 + u.completion_tokens * 2) / 1e6) < 1e-12);
    // A Responses answer says its tier too.
    const response = await client.responses.create({ model: 'gpt-4o-mini', input: 'hi', service_tier: 'priority' });
    assert.equal(response.service_tier, 'priority');
    await assert.rejects(
      client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }], service_tier: 'flex' }),
      (e) => e instanceof OpenAI.BadRequestError && e.param === 'service_tier' && /accepted: auto, default, priority/.test(e.message),
    );
  } finally {
    tiered.stop();
  }
});
