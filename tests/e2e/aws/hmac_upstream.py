"""A plain-HTTP upstream that verifies two HMAC request-signing schemes (tests/e2e/aws.rs).

/coinbase/...: Coinbase Exchange style. CB-ACCESS-KEY must be the key id, CB-ACCESS-PASSPHRASE
the passphrase, CB-ACCESS-TIMESTAMP within 60 s of now, and CB-ACCESS-SIGN the base64
HMAC-SHA256, keyed with the base64-decoded secret, of timestamp + method + path(?query) + body.
/stripe/...: Stripe webhook style. Stripe-Signature is `t=TIMESTAMP,v1=HEX` with HEX the
HMAC-SHA256 of `TIMESTAMP.BODY` keyed with the secret.

Argv: coinbase key id, coinbase secret (base64), coinbase passphrase, stripe secret.
Prints the port, then serves until killed. Answers 200 {"ok": true, ...} or 401 with the reason.
"""
import base64
import hashlib
import hmac
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEY_ID, CB_SECRET, PASSPHRASE, STRIPE_SECRET = sys.argv[1:5]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, status, doc):
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def check(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n)
        if self.path.startswith("/coinbase/"):
            ts = self.headers.get("CB-ACCESS-TIMESTAMP", "")
            if self.headers.get("CB-ACCESS-KEY") != KEY_ID:
                return "key id"
            if self.headers.get("CB-ACCESS-PASSPHRASE") != PASSPHRASE:
                return "passphrase"
            if not ts.isdigit() or abs(time.time() - int(ts)) > 60:
                return "timestamp"
            msg = ts.encode() + self.command.encode() + self.path.encode() + body
            want = base64.b64encode(
                hmac.new(base64.b64decode(CB_SECRET), msg, hashlib.sha256).digest()
            ).decode()
            if not hmac.compare_digest(self.headers.get("CB-ACCESS-SIGN", ""), want):
                return "signature"
            return None
        if self.path.startswith("/stripe/"):
            parts = dict(p.split("=", 1) for p in self.headers.get("Stripe-Signature", "").split(",") if "=" in p)
            ts = parts.get("t", "")
            if not ts.isdigit() or abs(time.time() - int(ts)) > 60:
                return "timestamp"
            want = hmac.new(STRIPE_SECRET.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(parts.get("v1", ""), want):
                return "signature"
            return None
        return "unknown scheme"

    def handle_one(self):
        why = self.check()
        if why:
            self.answer(401, {"ok": False, "why": why})
        else:
            self.answer(200, {"ok": True, "path": self.path})

    do_GET = do_POST = do_PUT = handle_one


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
