// One chat completion through latchkey's gateway mode with the `openai` npm SDK on Node's
// built-in fetch (tests/e2e/gateway.rs). Environment: BASE_URL (the gateway URL, e.g.
// http://127.0.0.1:PORT/gw/openai/v1), API_KEY (the latchkey token), STREAM=1 for a streamed
// answer. Prints one JSON line: the answer (or the error) and when each streamed event arrived.
import OpenAI from 'openai';

// Count the calls that go through the built-in fetch: the SDK must use it (no polyfill).
const builtinFetch = globalThis.fetch;
let fetchCalls = 0;
globalThis.fetch = (...args) => {
  fetchCalls += 1;
  return builtinFetch(...args);
};

const client = new OpenAI({
  baseURL: process.env.BASE_URL,
  apiKey: process.env.API_KEY,
  maxRetries: 0,
  timeout: 20000,
});
const out = { node: process.version };
const t0 = performance.now();
const request = { model: 'fake-model', messages: [{ role: 'user', content: 'hi' }] };
try {
  if (process.env.STREAM === '1') {
    const stream = await client.chat.completions.create({ ...request, stream: true });
    out.events = [];
    for await (const chunk of stream) {
      const text = chunk.choices[0]?.delta?.content ?? '';
      if (text) out.events.push({ ms: performance.now() - t0, text });
    }
  } else {
    const r = await client.chat.completions.create(request);
    out.text = r.choices[0].message.content;
  }
} catch (e) {
  out.error = { status: e.status ?? null, name: e.constructor.name, message: String(e.message) };
}
out.total_ms = performance.now() - t0;
out.fetch_calls = fetchCalls;
console.log(JSON.stringify(out));
