#!/usr/bin/env python3
"""A GitHub-App-like installation token endpoint for latchkey's tests.

Generates the app's RSA key pair, writes the private key (PEM) to --private-key-out for the
test to store in latchkey, and keeps the public key to verify the app's RS256 JWT with PyJWT
(iss = the app id, iat/exp present and at most ten minutes apart, as GitHub checks). Answers

  POST /app/installations/<id>/access_tokens   201 {"token", "expires_at", "permissions",
                                               "repositories"} echoing what was asked
  GET  /requests                               every mint request: installation,
                                               repositories, permissions, the token issued

Listens on 127.0.0.1 port 0 and prints "PORT <n>".
"""

import argparse
import datetime
import json
import secrets
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

LOCK = threading.Lock()
REQUESTS = []


def make_handler(app_id, public_key, lifetime):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/requests":
                with LOCK:
                    return self.reply(200, REQUESTS)
            self.reply(404, {"message": "Not Found"})

        def do_POST(self):
            parts = self.path.strip("/").split("/")
            length = int(self.headers.get("content-length", "0"))
            raw = self.rfile.read(length)
            if len(parts) != 4 or parts[:2] != ["app", "installations"] or parts[3] != "access_tokens":
                return self.reply(404, {"message": "Not Found"})
            auth = self.headers.get("authorization", "")
            if not auth.startswith("Bearer "):
                return self.reply(401, {"message": "A JSON web token could not be decoded"})
            try:
                claims = jwt.decode(
                    auth[7:],
                    public_key,
                    algorithms=["RS256"],
                    options={"require": ["iat", "exp", "iss"]},
                    leeway=60,
                )
            except jwt.PyJWTError as e:
                return self.reply(401, {"message": f"bad JWT: {type(e).__name__}"})
            if str(claims["iss"]) != app_id or claims["exp"] - claims["iat"] > 660:
                return self.reply(401, {"message": "wrong issuer or lifetime"})
            body = json.loads(raw or b"{}")
            token = "ghs_" + secrets.token_urlsafe(27)
            expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
                seconds=lifetime
            )
            with LOCK:
                REQUESTS.append(
                    {
                        "installation": parts[2],
                        "repositories": body.get("repositories"),
                        "permissions": body.get("permissions"),
                        "token": token,
                    }
                )
            self.reply(
                201,
                {
                    "token": token,
                    "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "permissions": body.get("permissions", {}),
                    "repositories": [{"name": r} for r in body.get("repositories", [])],
                },
            )

    return Handler


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--app-id", required=True)
    ap.add_argument("--private-key-out", required=True)
    ap.add_argument("--lifetime", type=int, default=3600)
    args = ap.parse_args()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with open(args.private_key_out, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
    srv = ThreadingHTTPServer(
        ("127.0.0.1", 0), make_handler(args.app_id, key.public_key(), args.lifetime)
    )
    print(f"PORT {srv.server_address[1]}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
