// WebSocket echo through latchkey with Node's `ws` and `https-proxy-agent` (what Node agents
// use: Node's own WebSocket ignores HTTPS_PROXY). The CA comes from NODE_EXTRA_CA_CERTS, the
// proxy (with the token as its password) from HTTPS_PROXY, both set by `latchkey run`.
//   node ws_echo.js URL N SIZE   -> one JSON line: {"ok":true,"messages":N,"bytes":...}
const WebSocket = require('ws');
const { HttpsProxyAgent } = require('https-proxy-agent');

const [url, n, size] = [process.argv[2], Number(process.argv[3]), Number(process.argv[4])];
const agent = new HttpsProxyAgent(process.env.HTTPS_PROXY);
const ws = new WebSocket(url, {
  agent,
  headers: { Authorization: 'Bearer agent-own-credential-1234' },
  maxPayload: 0,
  perMessageDeflate: false,
});
let i = 0;
let bytes = 0;
let expected;
const start = Date.now();
function next() {
  if (i === n) {
    ws.close(1000);
    return;
  }
  expected = i % 2 === 0 ? Buffer.from(('n' + i + '-' + 'y'.repeat(size)).slice(0, size)) : Buffer.alloc(size, i % 256);
  ws.send(expected, { binary: i % 2 === 1 });
}
ws.on('open', next);
ws.on('message', (data) => {
  if (!Buffer.from(data).equals(expected)) {
    console.error('echo ' + i + ' differs');
    process.exit(2);
  }
  bytes += expected.length;
  i += 1;
  next();
});
ws.on('close', (code) => {
  console.log(JSON.stringify({ ok: i === n, messages: i, bytes, code, seconds: (Date.now() - start) / 1000 }));
  process.exit(i === n ? 0 : 3);
});
ws.on('error', (e) => {
  console.error('ws error: ' + e.message);
  process.exit(4);
});
