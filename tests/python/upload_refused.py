"""Send a refused 5 MB upload through latchkey with Python requests and httpx (HTTP/1.1 and
HTTP/2) and print, per client, what it reported: status and the reason of the JSON body, or
the exception it raised. Used by tests/e2e/uploads.rs.

    upload_refused.py PROXY_URL CA URL
"""
import json
import sys

import httpx
import requests

proxy, ca, url = sys.argv[1:4]
body = b"z" * (5 * 1024 * 1024)
out = {}


def report(name, fn):
    try:
        r = fn()
        try:
            reason = r.json().get("reason")
        except Exception:  # noqa: BLE001
            reason = None
        out[name] = {"status": r.status_code, "reason": reason, "version": getattr(r, "http_version", "HTTP/1.1")}
    except Exception as e:  # noqa: BLE001
        out[name] = {"error": "%s: %s" % (type(e).__name__, e)}


report(
    "requests",
    lambda: requests.post(url, data=body, proxies={"https": proxy}, verify=ca, timeout=20),
)
for h2 in (False, True):
    with httpx.Client(proxy=proxy, verify=ca, http2=h2, http1=not h2, timeout=20) as c:
        report("httpx_h2" if h2 else "httpx_h1", lambda: c.post(url, content=body))
print(json.dumps(out))
