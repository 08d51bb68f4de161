"""A moto server with IAM authentication on, for tests/e2e/aws.rs.

Starts moto on 127.0.0.1 (a free port) with INITIAL_NO_AUTH_ACTION_COUNT set so that exactly
the setup below runs unauthenticated: after it, moto verifies every SigV4 signature against the
access keys it issued (botocore's SigV4Auth / S3SigV4Auth recompute them) and checks the caller's
IAM policies. Setup: a user `latchkey` allowed everything, with an access key; a role `agent`
that the account may assume, allowed s3:*; buckets `data` and `other`.

Prints one JSON line (port, keys, role ARN), then answers commands on stdin, one per line:
  sessions                  -> JSON list of the roles assumed so far (session name, role,
                               session policy, access key id, session token)
  eval ACTION RESOURCE      -> "permitted" / "denied" / "neutral": moto's own IAM evaluator on
                               the last session policy latchkey sent
EOF stops the server.
"""
import json
import os
import sys

SETUP_CALLS = 5
os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = str(SETUP_CALLS)
os.environ["S3_IGNORE_SUBDOMAIN_BUCKETNAME"] = "true"
os.environ.setdefault("MOTO_ALLOW_NONEXISTENT_REGION", "true")

import boto3  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
_, port = server.get_host_and_port()
endpoint = f"http://127.0.0.1:{port}"

anon = dict(
    endpoint_url=endpoint,
    region_name="us-east-1",
    aws_access_key_id="setup",
    aws_secret_access_key="setup",
)
iam = boto3.client("iam", **anon)
allow_all = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
)
iam.create_user(UserName="latchkey")  # 1
iam.put_user_policy(UserName="latchkey", PolicyName="all", PolicyDocument=allow_all)  # 2
key = iam.create_access_key(UserName="latchkey")["AccessKey"]  # 3
trust = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": "arn:aws:iam::123456789012:user/latchkey"},
                "Action": "sts:AssumeRole",
            }
        ],
    }
)
role = iam.create_role(RoleName="agent", AssumeRolePolicyDocument=trust)["Role"]  # 4
s3_all = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
)
iam.put_role_policy(RoleName="agent", PolicyName="s3", PolicyDocument=s3_all)  # 5

# From here on every request must be signed with keys moto issued.
s3 = boto3.client(
    "s3",
    endpoint_url=endpoint,
    region_name="us-east-1",
    aws_access_key_id=key["AccessKeyId"],
    aws_secret_access_key=key["SecretAccessKey"],
)
for bucket in ("data", "other"):
    s3.create_bucket(Bucket=bucket)
try:
    boto3.client("s3", **anon).list_buckets()
    raise SystemExit("moto accepted an unsigned-by-a-known-key request: auth is not on")
except Exception as e:  # noqa: BLE001
    if "InvalidAccessKeyId" not in str(e) and "SignatureDoesNotMatch" not in str(e):
        raise

print(
    json.dumps(
        {
            "port": port,
            "access_key_id": key["AccessKeyId"],
            "secret_access_key": key["SecretAccessKey"],
            "role_arn": role["Arn"],
        }
    ),
    flush=True,
)

from moto.sts.models import sts_backends  # noqa: E402
from moto.iam.access_control import IAMPolicy, PermissionResult  # noqa: E402


def sessions():
    out = []
    for account in sts_backends.values():
        for backend in account.values():
            for r in backend.assumed_roles:
                out.append(
                    {
                        "session": r.session_name,
                        "role": r.role_arn,
                        "policy": r.policy,
                        "access_key_id": r.access_key_id,
                        "session_token": r.session_token,
                        "secret_access_key": r.secret_access_key,
                    }
                )
    return out


for line in sys.stdin:
    words = line.split()
    if not words:
        continue
    if words[0] == "sessions":
        print(json.dumps(sessions()), flush=True)
    elif words[0] == "eval":
        policy = sessions()[-1]["policy"]
        result = IAMPolicy(policy).is_action_permitted(words[1], words[2])
        print(
            {
                PermissionResult.PERMITTED: "permitted",
                PermissionResult.DENIED: "denied",
                PermissionResult.NEUTRAL: "neutral",
            }[result],
            flush=True,
        )
server.stop()
