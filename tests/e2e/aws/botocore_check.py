"""Recompute the SigV4 signature of requests latchkey signed, with botocore (tests/e2e/aws.rs).

Reads a JSON list of {method, url, headers, body (base64), secret, service, region, query}
from stdin: each is a request as latchkey sends it upstream. For a header signature, botocore's
SigV4Auth (S3SigV4Auth for s3) builds the canonical request over the headers latchkey's
Authorization lists and the x-amz-content-sha256 it declares; for a query signature, the URL
without X-Amz-Signature. Prints the list of signatures botocore computes.
"""
import base64
import json
import sys
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from botocore.auth import S3SigV4Auth, SigV4Auth, S3SigV4QueryAuth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

out = []
for case in json.load(sys.stdin):
    headers = case["headers"]
    token = headers.get("x-amz-security-token")
    creds = Credentials("unused-in-signature", case["secret"], token)
    body = base64.b64decode(case["body"])
    if not case["query"]:
        auth_header = headers["authorization"]
        signed = auth_header.split("SignedHeaders=")[1].split(",")[0].split(";")
        req = AWSRequest(
            method=case["method"],
            url=case["url"],
            headers={k: v for k, v in headers.items() if k in signed},
            data=body,
        )
        req.context["timestamp"] = headers["x-amz-date"]
        cls = S3SigV4Auth if case["service"] == "s3" else SigV4Auth
        auth = cls(creds, case["service"], case["region"])
    else:
        parts = urlsplit(case["url"])
        params = parse_qsl(parts.query, keep_blank_values=True)
        stamp = dict(params)["X-Amz-Date"]
        kept = [(k, v) for k, v in params if k != "X-Amz-Signature"]
        url = urlunsplit(parts._replace(query=urlencode(kept)))
        req = AWSRequest(method=case["method"], url=url, headers={"host": headers["host"]}, data=body)
        req.context["timestamp"] = stamp
        cls = S3SigV4QueryAuth if case["service"] == "s3" else SigV4QueryAuth
        auth = cls(creds, case["service"], case["region"], expires=int(dict(params)["X-Amz-Expires"]))
    canonical = auth.canonical_request(req)
    string_to_sign = auth.string_to_sign(req, canonical)
    out.append(auth.signature(string_to_sign, req))
print(json.dumps(out))
