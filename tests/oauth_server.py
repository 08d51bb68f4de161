#!/usr/bin/env python3
"""An OAuth 2.1 authorization server for latchkey's tests, built with Authlib (Flask).

Started per test on 127.0.0.1 port 0; prints "PORT <n>" once it listens. Grants:
authorization code with PKCE (S256 required), refresh token with rotation (the old refresh
token is revoked when a new one is issued), client credentials, and the device authorization
grant (RFC 8628). Test controls (loopback only, test use only):

  GET  /authorize?...&approve_as=USER   auto-approves as USER and redirects (the headless
                                        browser stand-in follows the redirect); &deny=1 refuses
  POST /device/approve  user_code=..&user=..   approves a device code
  POST /control   JSON {"lifetime": s, "slow": s, "broken": bool, "revoke_refresh": bool}
  GET  /stats     counts per grant type, tokens issued, and which refresh tokens are live
"""

import argparse
import json
import secrets
import sys
import threading
import time

from flask import Flask, jsonify, request
from werkzeug.serving import make_server

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, TokenMixin, grants
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc8628 import (
    DeviceAuthorizationEndpoint,
    DeviceCodeGrant,
    DeviceCredentialDict,
)

LOCK = threading.Lock()
STATE = {
    "lifetime": 3600,
    "slow": 0.0,
    "broken": False,
    "counts": {},
    "issued": [],  # access tokens, in order
    "codes": {},
    "tokens": {},  # refresh_token -> Token
    "access": {},  # access_token -> Token
    "devices": {},  # device_code -> DeviceCredentialDict
    "device_grants": {},  # user_code -> user
    "pkce_checked": 0,
}

ALL_GRANTS = [
    "authorization_code",
    "refresh_token",
    "client_credentials",
    "urn:ietf:params:oauth:grant-type:device_code",
]


class Client(ClientMixin):
    def __init__(self, client_id, secret):
        self.client_id = client_id
        self.secret = secret

    def get_client_id(self):
        return self.client_id

    def get_default_redirect_uri(self):
        return None

    def get_allowed_scope(self, scope):
        return scope or ""

    def check_redirect_uri(self, redirect_uri):
        # RFC 8252 7.3: any port on the loopback address, path /callback.
        prefix = "http://127.0.0.1:"
        if not redirect_uri.startswith(prefix):
            return False
        rest = redirect_uri[len(prefix):]
        port, _, path = rest.partition("/")
        return port.isdigit() and path == "callback"

    def check_client_secret(self, client_secret):
        return self.secret is not None and secrets.compare_digest(
            self.secret, client_secret
        )

    def check_endpoint_auth_method(self, method, endpoint):
        if self.secret is None:
            return method == "none"
        return method in ("client_secret_post", "client_secret_basic")

    def check_response_type(self, response_type):
        return response_type == "code"

    def check_grant_type(self, grant_type):
        return grant_type in ALL_GRANTS


CLIENTS = {}


class Token(TokenMixin):
    def __init__(self, client_id, user, scope, data):
        self.client_id = client_id
        self.user = user
        self.scope = scope
        self.data = data
        self.revoked = False
        self.issued_at = time.time()

    def check_client(self, client):
        return client.get_client_id() == self.client_id

    def get_scope(self):
        return self.scope

    def get_expires_in(self):
        return self.data.get("expires_in", 0)

    def is_expired(self):
        return False

    def is_revoked(self):
        return self.revoked

    def get_user(self):
        return self.user

    def get_client(self):
        return CLIENTS[self.client_id]


class Code:
    def __init__(self, code, client_id, redirect_uri, scope, user, challenge, method):
        self.code = code
        self.client_id = client_id
        self.redirect_uri = redirect_uri
        self.scope = scope
        self.user = user
        self.code_challenge = challenge
        self.code_challenge_method = method

    def get_redirect_uri(self):
        return self.redirect_uri

    def get_scope(self):
        return self.scope

    def get_nonce(self):
        return None

    def get_auth_time(self):
        return None


AUTH_METHODS = ["client_secret_basic", "client_secret_post", "none"]


class AuthorizationCodeGrant(grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = AUTH_METHODS

    def save_authorization_code(self, code, req):
        with LOCK:
            STATE["codes"][code] = Code(
                code,
                req.client.get_client_id(),
                req.payload.redirect_uri,
                req.payload.scope,
                req.user,
                req.payload.data.get("code_challenge"),
                req.payload.data.get("code_challenge_method"),
            )

    def query_authorization_code(self, code, client):
        with LOCK:
            item = STATE["codes"].get(code)
        if item and item.client_id == client.get_client_id():
            return item
        return None

    def delete_authorization_code(self, authorization_code):
        with LOCK:
            STATE["codes"].pop(authorization_code.code, None)

    def authenticate_user(self, authorization_code):
        return authorization_code.user


class S256Only(CodeChallenge):
    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]

    def validate_code_verifier(self, grant, result):
        super().validate_code_verifier(grant, result)
        with LOCK:
            STATE["pkce_checked"] += 1


class RefreshTokenGrant(grants.RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = AUTH_METHODS
    INCLUDE_NEW_REFRESH_TOKEN = True

    def authenticate_refresh_token(self, refresh_token):
        with LOCK:
            item = STATE["tokens"].get(refresh_token)
        if item and not item.revoked:
            return item
        return None

    def authenticate_user(self, refresh_token):
        return refresh_token.user

    def revoke_old_credential(self, refresh_token):
        with LOCK:
            refresh_token.revoked = True


class ClientCredentialsGrant(grants.ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]


class DeviceEndpoint(DeviceAuthorizationEndpoint):
    CLIENT_AUTH_METHODS = AUTH_METHODS
    INTERVAL = 1

    def get_verification_uri(self):
        return request.host_url.rstrip("/") + "/device"

    def save_device_credential(self, client_id, scope, data):
        cred = DeviceCredentialDict(client_id=client_id, scope=scope, **data)
        cred["expires_at"] = int(time.time()) + data["expires_in"]
        with LOCK:
            STATE["devices"][data["device_code"]] = cred


class DeviceGrant(DeviceCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = AUTH_METHODS

    def query_device_credential(self, device_code):
        with LOCK:
            return STATE["devices"].get(device_code)

    def query_user_grant(self, user_code):
        with LOCK:
            user = STATE["device_grants"].get(user_code)
        return (user, True) if user else None

    def should_slow_down(self, credential):
        return False


def access_token_generator(client, grant_type, user, scope):
    return "at-" + secrets.token_urlsafe(24)


def refresh_token_generator(client, grant_type, user, scope):
    return "rt-" + secrets.token_urlsafe(24)


def expires_generator(client, grant_type):
    with LOCK:
        return STATE["lifetime"]


def save_token(token, req):
    user = getattr(req, "user", None)
    client_id = req.client.get_client_id()
    item = Token(client_id, user, token.get("scope", ""), dict(token))
    with LOCK:
        STATE["issued"].append(token["access_token"])
        STATE["access"][token["access_token"]] = item
        if "refresh_token" in token:
            STATE["tokens"][token["refresh_token"]] = item


app = Flask(__name__)
server = AuthorizationServer(app, query_client=lambda cid: CLIENTS.get(cid), save_token=save_token)
server.register_token_generator(
    "default",
    BearerTokenGenerator(access_token_generator, refresh_token_generator, expires_generator),
)
server.register_grant(AuthorizationCodeGrant, [S256Only(required=True)])
server.register_grant(RefreshTokenGrant)
server.register_grant(ClientCredentialsGrant)
server.register_grant(DeviceGrant)
server.register_endpoint(DeviceEndpoint)


@app.route("/authorize", methods=["GET"])
def authorize():
    if request.args.get("deny"):
        # The user refuses: Authlib redirects with error=access_denied.
        return server.create_authorization_response(grant_user=None)
    user = request.args.get("approve_as")
    if not user:
        return "test server: add approve_as=USER to approve", 400
    return server.create_authorization_response(grant_user=user)


@app.route("/token", methods=["POST"])
def token():
    grant_type = request.form.get("grant_type", "")
    with LOCK:
        STATE["counts"][grant_type] = STATE["counts"].get(grant_type, 0) + 1
        slow = STATE["slow"]
        broken = STATE["broken"]
    if slow:
        time.sleep(slow)
    if broken:
        return "internal error", 500
    return server.create_token_response()


@app.route("/device/code", methods=["POST"])
def device_code():
    return server.create_endpoint_response("device_authorization")


@app.route("/device/approve", methods=["POST"])
def device_approve():
    with LOCK:
        STATE["device_grants"][request.form["user_code"]] = request.form["user"]
    return "approved"


@app.route("/control", methods=["POST"])
def control():
    body = request.get_json(force=True)
    with LOCK:
        for key in ("lifetime", "slow", "broken"):
            if key in body:
                STATE[key] = body[key]
        if body.get("revoke_refresh"):
            for item in STATE["tokens"].values():
                item.revoked = True
    return "ok"


@app.route("/stats", methods=["GET"])
def stats():
    with LOCK:
        return jsonify(
            counts=STATE["counts"],
            issued=STATE["issued"],
            live_refresh=[k for k, v in STATE["tokens"].items() if not v.revoked],
            users={k: v.user for k, v in STATE["access"].items()},
            pkce_checked=STATE["pkce_checked"],
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--client", action="append", default=[], help="ID:SECRET or ID: (public)")
    ap.add_argument("--lifetime", type=int, default=3600)
    args = ap.parse_args()
    for spec in args.client:
        cid, _, secret = spec.partition(":")
        CLIENTS[cid] = Client(cid, secret or None)
    STATE["lifetime"] = args.lifetime
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    print(f"PORT {srv.server_port}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    import os

    # Authlib refuses plain http unless told; this server only ever listens on loopback.
    os.environ["AUTHLIB_INSECURE_TRANSPORT"] = "1"
    sys.exit(main())
