"""An agent using AWS through latchkey with placeholder keys only (tests/e2e/aws.rs).

Environment: LK_PROXY (http://bot:TOKEN@127.0.0.1:PORT), LK_ENDPOINT (http://s3.moto.test:PORT),
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (placeholders, as `latchkey run` sets them).
`python3 agent.py STEP [ARGS]` prints one JSON object with what the agent saw.
"""
import base64
import hashlib
import json
import os
import sys
import zlib

import boto3
import requests
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

# Under `latchkey run`, HTTP_PROXY is in the environment and LK_PROXY is not set.
PROXY = os.environ.get("LK_PROXY")
ENDPOINT = os.environ["LK_ENDPOINT"]
PROXIES = {"http": PROXY} if PROXY else None
ZEROS = "0" * 64


def s3():
    return boto3.client(
        "s3",
        endpoint_url=ENDPOINT,
        region_name="us-east-1",
        config=Config(proxies=PROXIES, retries={"max_attempts": 1}),
    )


def error_of(e):
    resp = getattr(e, "response", None) or {}
    return {
        "status": resp.get("ResponseMetadata", {}).get("HTTPStatusCode"),
        "code": resp.get("Error", {}).get("Code"),
        "message": str(e),
    }


def agent_auth(date, signed):
    return (
        f"AWS4-HMAC-SHA256 Credential={os.environ['AWS_ACCESS_KEY_ID']}/{date[:8]}/us-east-1/s3/"
        f"aws4_request, SignedHeaders={signed}, Signature={ZEROS}"
    )


def now():
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def step(name, args):
    c = s3()
    if name == "basic":
        key = args[0] if args else "data/hello.txt"
        bucket, obj = key.split("/", 1)
        c.put_object(Bucket=bucket, Key=obj, Body=b"hello through latchkey")
        got = c.get_object(Bucket=bucket, Key=obj)["Body"].read().decode()
        listed = [o["Key"] for o in c.list_objects_v2(Bucket=bucket).get("Contents", [])]
        return {"got": got, "listed": listed}
    if name == "put":
        bucket, obj = args[0].split("/", 1)
        try:
            c.put_object(Bucket=bucket, Key=obj, Body=b"x")
            return {"ok": True}
        except Exception as e:  # noqa: BLE001
            return {"ok": False, **error_of(e)}
    if name == "multipart":
        size = int(args[0])
        path = args[1]
        data = os.urandom(size)
        with open(path, "wb") as f:
            f.write(data)
        cfg = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
        c.upload_file(path, "data", "big.bin", Config=cfg)
        head = c.head_object(Bucket="data", Key="big.bin")
        back = c.get_object(Bucket="data", Key="big.bin")["Body"].read()
        return {
            "length": head["ContentLength"],
            "etag": head["ETag"],
            "same": hashlib.sha256(back).hexdigest() == hashlib.sha256(data).hexdigest(),
        }
    if name == "chunked":
        # STREAMING-AWS4-HMAC-SHA256-PAYLOAD by hand (as the Java SDK sends it): the agent's
        # chunk signatures are placeholders too; latchkey computes the real chain.
        data = bytes(range(256)) * 1200  # 300 KiB, in 64 KiB chunks
        body = b""
        for i in range(0, len(data), 65536):
            part = data[i : i + 65536]
            body += f"{len(part):x};chunk-signature={ZEROS}\r\n".encode() + part + b"\r\n"
        body += f"0;chunk-signature={ZEROS}\r\n\r\n".encode()
        date = now()
        signed = "content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length"
        r = requests.put(
            f"{ENDPOINT}/data/chunked.bin",
            data=body,
            proxies=PROXIES,
            headers={
                "x-amz-date": date,
                "x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
                "content-encoding": "aws-chunked",
                "x-amz-decoded-content-length": str(len(data)),
                "authorization": agent_auth(date, signed),
            },
        )
        back = c.get_object(Bucket="data", Key="chunked.bin")["Body"].read() if r.ok else b""
        return {"status": r.status_code, "body": r.text[:300], "same": back == data}
    if name == "trailer":
        data = b"trailer checksum payload " * 1000
        crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
        body = (
            f"{len(data):x}\r\n".encode()
            + data
            + b"\r\n0\r\n"
            + f"x-amz-checksum-crc32:{crc}\r\n\r\n".encode()
        )
        date = now()
        signed = "content-encoding;host;x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;x-amz-trailer"
        r = requests.put(
            f"{ENDPOINT}/data/trailer.bin",
            data=body,
            proxies=PROXIES,
            headers={
                "x-amz-date": date,
                "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
                "content-encoding": "aws-chunked",
                "x-amz-trailer": "x-amz-checksum-crc32",
                "x-amz-decoded-content-length": str(len(data)),
                "authorization": agent_auth(date, signed),
            },
        )
        back = c.get_object(Bucket="data", Key="trailer.bin")["Body"].read() if r.ok else b""
        return {"status": r.status_code, "body": r.text[:300], "same": back == data}
    if name == "wrong-hash":
        # A declared x-amz-content-sha256 that is not the body's: latchkey must cut the body
        # off before its last byte, so the upstream never stores it.
        data = b"the body that was sent"
        date = now()
        signed = "content-length;host;x-amz-content-sha256;x-amz-date"
        try:
            r = requests.put(
                f"{ENDPOINT}/data/wrong-hash.txt",
                data=data,
                proxies=PROXIES,
                headers={
                    "x-amz-date": date,
                    "x-amz-content-sha256": hashlib.sha256(b"another body").hexdigest(),
                    "authorization": agent_auth(date, signed),
                },
                timeout=30,
            )
            status, text = r.status_code, r.text[:300]
        except requests.RequestException as e:
            status, text = None, str(e)
        try:
            c.head_object(Bucket="data", Key="wrong-hash.txt")
            stored = True
        except Exception:  # noqa: BLE001
            stored = False
        return {"status": status, "body": text, "stored": stored}
    if name == "presigned-v2":
        url = c.generate_presigned_url(
            "get_object", Params={"Bucket": "data", "Key": "hello.txt"}, ExpiresIn=300
        )
        r = requests.get(url, proxies=PROXIES)
        return {"status": r.status_code, "body": r.text[:300], "url": url}
    if name == "presigned":
        c = boto3.client(
            "s3",
            endpoint_url=ENDPOINT,
            region_name="us-east-1",
            config=Config(proxies=PROXIES, signature_version="s3v4"),
        )
        url = c.generate_presigned_url(
            "get_object", Params={"Bucket": "data", "Key": "hello.txt"}, ExpiresIn=300
        )
        r = requests.get(url, proxies=PROXIES)
        return {"status": r.status_code, "body": r.text[:300], "url": url}
    raise SystemExit(f"unknown step {name}")


print(json.dumps(step(sys.argv[1], sys.argv[2:])))
