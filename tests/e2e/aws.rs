//! AWS through latchkey: boto3 and the AWS CLI holding only placeholder keys, latchkey
//! re-signing with keys a real moto server issued, moto (IAM authentication on) verifying
//! every signature with botocore's own `SigV4Auth` / `S3SigV4Auth`. Moto is plain HTTP, so
//! the routes set `insecure_http = true`; the agent speaks to latchkey as an HTTP proxy.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use serde_json::Value;

use crate::common::*;

const PLACEHOLDER_SECRET: &str = "latchkey-placeholder-secret-not-a-real-key";

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/e2e/aws")
        .join(name)
}

/// A moto server with IAM authentication on (`aws/moto_iam.py`).
struct Moto {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    port: u16,
    access_key_id: String,
    secret: String,
    role_arn: String,
}

impl Moto {
    fn start() -> Moto {
        let mut child = Command::new("python3")
            .arg(script("moto_iam.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs (scripts/test installs moto[server])");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let v: Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("moto did not start: {line:?}"));
        Moto {
            child,
            stdin,
            stdout,
            port: v["port"].as_u64().unwrap() as u16,
            access_key_id: v["access_key_id"].as_str().unwrap().into(),
            secret: v["secret_access_key"].as_str().unwrap().into(),
            role_arn: v["role_arn"].as_str().unwrap().into(),
        }
    }

    fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_owned()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A home whose agent `bot` may use S3 bucket `data` on moto with credential `aws`, and a
/// proxy serving it.
fn setup(moto: &Moto, credential_doc: &str, route_extra: &str) -> (Home, Proxy, String) {
    let home = Home::new();
    let port = moto.port;
    home.write_policy(
        "bot.toml",
        &format!(
            r#"agent = "bot"
max_ttl = "1h"

[[routes]]
id = "s3-data"
host = "s3.moto.test:{port}"
methods = ["GET", "HEAD", "PUT", "POST", "DELETE"]
paths = ["/data", "/data/**"]
credential = "aws"
service = "s3"
region = "us-east-1"
insecure_http = true
max_body = "64MiB"
{route_extra}
"#
        ),
    );
    home.set_typed("aws", "aws_sigv4", credential_doc);
    let out = home.run(&["policy", "check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let proxy = home.serve(&[
        "--resolve",
        &format!("s3.moto.test:{port}:127.0.0.1"),
        "--resolve",
        &format!("sts.moto.test:{port}:127.0.0.1"),
    ]);
    let token = home.issue("bot", &[]);
    (home, proxy, token)
}

fn long_term_doc(moto: &Moto) -> String {
    format!(
        "kind = \"aws_sigv4\"\naccess_key_id = \"{}\"\n\n[secret]\nsecret_access_key = \"{}\"\n",
        moto.access_key_id, moto.secret
    )
}

/// The environment `latchkey run` gives an AWS client, with the proxy as an explicit URL.
fn agent_env(cmd: &mut Command, proxy: &Proxy, token: &str, moto: &Moto) {
    cmd.env("LK_PROXY", proxy.url_with(token))
        .env("LK_ENDPOINT", format!("http://s3.moto.test:{}", moto.port))
        .env("AWS_ACCESS_KEY_ID", "latchkey")
        .env("AWS_SECRET_ACCESS_KEY", PLACEHOLDER_SECRET)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy");
}

/// Run one step of `aws/agent.py`; returns its JSON and everything it printed.
fn agent(proxy: &Proxy, token: &str, moto: &Moto, step: &[&str]) -> (Value, String) {
    let mut cmd = Command::new("python3");
    cmd.arg(script("agent.py")).args(step);
    agent_env(&mut cmd, proxy, token, moto);
    let out = cmd.output().unwrap();
    let printed = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        out.status.success(),
        "agent {step:?} failed: {printed}\nlatchkey: {}",
        proxy.log()
    );
    let v = serde_json::from_str(stdout(&out).trim())
        .unwrap_or_else(|_| panic!("agent {step:?} printed {printed}"));
    (v, printed)
}

/// Nothing secret in the proxy's log, the audit log or what the agent saw.
fn assert_no_key_material(home: &Home, proxy: &Proxy, seen: &str, secrets: &[&str]) {
    let audit = std::fs::read_to_string(home.state().join("audit.jsonl")).unwrap();
    for secret in secrets {
        let forms = [
            secret.to_string(),
            base64_std(secret.as_bytes()),
            hex_lower(secret.as_bytes()),
            secret.replace('/', "%2F").replace('+', "%2B"),
        ];
        for form in forms {
            for (what, text) in [
                ("log", proxy.log()),
                ("audit", audit.clone()),
                ("agent", seen.to_owned()),
            ] {
                assert!(!text.contains(&form), "a key form is in the {what}");
            }
        }
    }
}

fn base64_std(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn boto3_with_placeholder_keys_puts_gets_and_lists_through_latchkey() {
    let moto = Moto::start();
    let (home, proxy, token) = setup(&moto, &long_term_doc(&moto), "");
    let (v, mut seen) = agent(&proxy, &token, &moto, &["basic"]);
    assert_eq!(v["got"], "hello through latchkey", "{v}");
    assert_eq!(v["listed"], serde_json::json!(["hello.txt"]));

    // A SigV4 presigned URL is re-signed too, but moto (IAM auth on) answers 500 to every
    // presigned URL, even one made with its own keys: query signing is checked against the
    // published test vectors instead (src/credential/sigv4/tests.rs). A SigV2 one is refused.
    let (v, out) = agent(&proxy, &token, &moto, &["presigned-v2"]);
    seen.push_str(&out);
    assert_eq!(v["status"], 400, "{v}");
    assert!(
        v["body"].as_str().unwrap().contains("SigV2 presigned"),
        "{v}"
    );

    // Outside the route: latchkey refuses before anything is signed.
    let (v, out) = agent(&proxy, &token, &moto, &["put", "other/x"]);
    seen.push_str(&out);
    assert_eq!(v["ok"], false);
    assert_eq!(v["status"], 403, "{v}");

    let lines = home.wait_audit(5);
    let allowed: Vec<&Value> = lines.iter().filter(|l| l["decision"] == "allow").collect();
    assert_eq!(allowed.len(), 3, "{lines:?}");
    for l in &allowed {
        assert_eq!(l["credential_kind"], "aws_sigv4", "{l}");
        assert_eq!(l["credential"], "aws", "{l}");
        assert_eq!(l["status"], 200, "{l}");
    }
    assert!(lines
        .iter()
        .any(|l| l["decision"] == "deny" && l["reason"] == "no_route"));
    assert_no_key_material(&home, &proxy, &seen, &[&moto.secret]);
}

#[test]
fn a_multipart_upload_file_and_streaming_uploads_are_re_signed() {
    let moto = Moto::start();
    let (home, proxy, token) = setup(&moto, &long_term_doc(&moto), "");
    let file = home.path().join("big.bin");
    let size = 12 << 20;
    let (v, _) = agent(
        &proxy,
        &token,
        &moto,
        &["multipart", &size.to_string(), file.to_str().unwrap()],
    );
    assert_eq!(v["length"], size, "{v}");
    assert_eq!(v["same"], true);
    // Three parts of 5, 5 and 2 MiB: an S3 multipart ETag ends in -3.
    assert!(v["etag"].as_str().unwrap().ends_with("-3\""), "{v}");

    // aws-chunked with a signature per chunk: moto checks the seed signature (the head) and
    // decodes the chunks; the chunk chain itself is checked against the S3 documentation's
    // example in the unit tests (moto does not verify chunk signatures).
    let (v, _) = agent(&proxy, &token, &moto, &["chunked"]);
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["same"], true, "{v}");

    // A declared payload hash that is not the body's: cut off before the last byte; moto
    // never stores the object.
    let (v, _) = agent(&proxy, &token, &moto, &["wrong-hash"]);
    assert_ne!(v["status"], 200, "{v}");
    assert_eq!(v["stored"], false, "{v}");

    // aws-chunked, unsigned chunks, checksum trailer.
    let (v, _) = agent(&proxy, &token, &moto, &["trailer"]);
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["same"], true, "{v}");
    let lines = home.audit();
    assert!(lines.iter().all(|l| l["decision"] == "allow"), "{lines:?}");
}

#[test]
fn the_aws_cli_copies_and_lists_with_placeholder_keys() {
    let moto = Moto::start();
    let (home, proxy, token) = setup(&moto, &long_term_doc(&moto), "");
    let file = home.path().join("cli.txt");
    std::fs::write(&file, "from the aws cli").unwrap();
    let endpoint = format!("http://s3.moto.test:{}", moto.port);
    let aws = |args: &[&str]| {
        let mut cmd = Command::new("aws");
        cmd.args(args).args(["--endpoint-url", &endpoint]);
        agent_env(&mut cmd, &proxy, &token, &moto);
        cmd.env("HTTP_PROXY", proxy.url_with(&token))
            .env("http_proxy", proxy.url_with(&token));
        let out = cmd
            .output()
            .expect("aws is installed (scripts/test installs awscli)");
        assert!(out.status.success(), "aws {args:?}: {}", stderr(&out));
        format!("{}{}", stdout(&out), stderr(&out))
    };
    let mut seen = aws(&["s3", "cp", file.to_str().unwrap(), "s3://data/cli.txt"]);
    // `aws s3 ls` itself fails against moto even with the real keys and no latchkey (moto
    // recomputes the signature of its `delimiter=/` query wrongly); the same ListObjectsV2
    // through s3api signs and verifies.
    let listed = aws(&["s3api", "list-objects-v2", "--bucket", "data"]);
    assert!(listed.contains("cli.txt"), "{listed}");
    let back = home.path().join("back.txt");
    seen.push_str(&aws(&[
        "s3",
        "cp",
        "s3://data/cli.txt",
        back.to_str().unwrap(),
    ]));
    assert_eq!(std::fs::read_to_string(back).unwrap(), "from the aws cli");
    seen.push_str(&listed);
    let lines = home.audit();
    assert!(
        lines.len() >= 3
            && lines
                .iter()
                .all(|l| l["decision"] == "allow" && l["credential_kind"] == "aws_sigv4"),
        "{lines:?}"
    );
    assert_no_key_material(&home, &proxy, &seen, &[&moto.secret]);
}

#[test]
fn an_assumed_role_is_scoped_down_to_the_route() {
    let mut moto = Moto::start();
    let doc = format!(
        "kind = \"aws_sigv4\"\naccess_key_id = \"{}\"\nrole_arn = \"{}\"\nrole_session_name = \"lk\"\nsts_endpoint = \"http://sts.moto.test:{}\"\n\n[secret]\nsecret_access_key = \"{}\"\n",
        moto.access_key_id, moto.role_arn, moto.port, moto.secret
    );
    let (home, proxy, token) = setup(&moto, &doc, "");
    let (v, mut seen) = agent(&proxy, &token, &moto, &["basic"]);
    assert_eq!(v["got"], "hello through latchkey", "{v}");
    let (v, out) = agent(&proxy, &token, &moto, &["basic", "data/second.txt"]);
    seen.push_str(&out);
    assert_eq!(v["got"], "hello through latchkey", "{v}");

    // One AssumeRole for all those requests (cached), with a session policy from the route.
    let sessions: Value = serde_json::from_str(&moto.ask("sessions")).unwrap();
    let sessions = sessions.as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let session = &sessions[0];
    assert_eq!(session["session"], "lk-bot");
    assert_eq!(session["role"], moto.role_arn.as_str());
    let policy: Value = serde_json::from_str(session["policy"].as_str().unwrap()).unwrap();
    assert_eq!(
        policy["Statement"][0]["Resource"],
        serde_json::json!(["arn:aws:s3:::data", "arn:aws:s3:::data/*"])
    );
    // moto's own IAM evaluator on that session policy: the route's actions on its bucket
    // only. (moto does not apply session policies to requests itself.)
    for (action, resource, want) in [
        ("s3:GetObject", "arn:aws:s3:::data/x", "permitted"),
        ("s3:PutObject", "arn:aws:s3:::data/x", "permitted"),
        ("s3:ListBucket", "arn:aws:s3:::data", "permitted"),
        ("s3:PutObject", "arn:aws:s3:::other/x", "neutral"),
        ("s3:DeleteBucket", "arn:aws:s3:::data", "neutral"),
        ("iam:CreateUser", "*", "neutral"),
    ] {
        assert_eq!(
            moto.ask(&format!("eval {action} {resource}")),
            want,
            "{action} {resource}"
        );
    }

    let lines = home.wait_audit(6);
    for l in lines.iter().filter(|l| l["decision"] == "allow") {
        assert_eq!(l["credential_kind"], "aws_sigv4", "{l}");
        assert_eq!(
            l["credential_detail"],
            format!("role={} session=lk-bot", moto.role_arn),
            "{l}"
        );
    }
    let token_value = session["session_token"].as_str().unwrap().to_owned();
    let temp_secret = session["secret_access_key"].as_str().unwrap().to_owned();
    assert_no_key_material(
        &home,
        &proxy,
        &seen,
        &[&moto.secret, &token_value, &temp_secret],
    );
}

#[test]
fn sts_that_does_not_answer_is_credential_unavailable() {
    let moto = Moto::start();
    let dead = dead_port();
    let doc = format!(
        "kind = \"aws_sigv4\"\naccess_key_id = \"{}\"\nrole_arn = \"{}\"\nsts_endpoint = \"http://sts.moto.test:{dead}\"\n\n[secret]\nsecret_access_key = \"{}\"\n",
        moto.access_key_id, moto.role_arn, moto.secret
    );
    let (home, proxy, token) = setup(&moto, &doc, "");
    let mut cmd = Command::new("python3");
    cmd.arg(script("agent.py")).args(["put", "data/x"]);
    agent_env(&mut cmd, &proxy, &token, &moto);
    let out = cmd.output().unwrap();
    let v: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["status"], 503, "{v}");
    let lines = home.wait_audit(1);
    let l = lines.last().unwrap();
    assert_eq!(l["reason"], "credential_unavailable", "{l}");
    assert!(
        l["detail"].as_str().unwrap_or("").contains(&moto.role_arn)
            || proxy.log().contains("assuming role"),
        "{l}"
    );
    assert_no_key_material(&home, &proxy, &stdout(&out), &[&moto.secret]);
}

#[test]
fn a_request_signed_for_another_region_or_unsigned_is_refused_before_moto() {
    let moto = Moto::start();
    let (home, proxy, token) = setup(&moto, &long_term_doc(&moto), "");
    let url = format!("http://s3.moto.test:{}/data/x", moto.port);
    let proxy_arg = proxy.url_with(&token);
    let curl = |headers: &[&str]| {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--noproxy",
            "",
            "--proxy",
            &proxy_arg,
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
        ]);
        for h in headers {
            cmd.args(["-H", h]);
        }
        let out = cmd.arg(&url).output().unwrap();
        stdout(&out)
    };
    let zeros = "0".repeat(64);
    let eu = format!("Authorization: AWS4-HMAC-SHA256 Credential=latchkey/20240101/eu-west-1/s3/aws4_request, SignedHeaders=host, Signature={zeros}");
    let out = curl(&[&eu]);
    assert!(
        out.ends_with("403") && out.contains("signing_scope_not_allowed"),
        "{out}"
    );
    let out = curl(&[]);
    assert!(out.ends_with("400") && out.contains("cannot_sign"), "{out}");
    let v4a = format!("Authorization: AWS4-ECDSA-P256-SHA256 Credential=latchkey/20240101/s3/aws4_request, SignedHeaders=host, Signature={zeros}");
    let out = curl(&[&v4a]);
    assert!(out.ends_with("400") && out.contains("SigV4a"), "{out}");
    let lines = home.wait_audit(3);
    let reasons: Vec<&str> = lines
        .iter()
        .map(|l| l["reason"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        reasons,
        ["signing_scope_not_allowed", "cannot_sign", "cannot_sign"]
    );
    assert!(
        lines
            .iter()
            .all(|l| l["sent"] == false || l.get("sent").is_none()),
        "{lines:?}"
    );
}

/// One request as latchkey sends it upstream after re-signing `agent` (method, target,
/// headers, body) for `host` with `keys`.
fn latchkey_resigns(
    host: &str,
    agent: http::Request<Vec<u8>>,
    keys: &latchkey::credential::sigv4::Keys,
) -> (http::request::Parts, Vec<u8>) {
    use http_body_util::BodyExt;
    use latchkey::credential::sigv4::{resign, AgentSignature};
    use latchkey::policy::{AgentPolicy, Grant, Scheme};
    let policy = AgentPolicy::from_toml(
        std::path::Path::new("x.toml"),
        &format!(
            "agent = \"x\"\n[[routes]]\nid = \"r\"\nhost = \"{host}\"\nmethods = [\"GET\", \"PUT\", \"POST\"]\npaths = [\"/**\"]\ncredential = \"aws\"\n"
        ),
    )
    .unwrap();
    let authority = latchkey::authority::Authority::parse(host, Some(443)).unwrap();
    let (mut parts, data) = agent.into_parts();
    let path = latchkey::policy::normalize(parts.uri.path())
        .unwrap()
        .into_owned();
    let query = parts.uri.query().map(str::to_owned);
    let allowed = policy
        .decide(Scheme::Https, &authority, &parts.method, &path, Grant::ALL)
        .unwrap();
    let rewrite = latchkey::inject::Rewrite {
        scheme: Scheme::Https,
        authority: &authority,
        path: &path,
        query: query.as_deref(),
        allowed: &allowed,
    };
    let signature = AgentSignature::read(&parts).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let body = http_body_util::Full::new(bytes::Bytes::from(data))
        .map_err(|never| match never {})
        .boxed_unsync();
    let sent = rt.block_on(async {
        let out = resign(
            &mut parts,
            &rewrite,
            body,
            &signature,
            keys,
            std::time::SystemTime::now(),
        )
        .await
        .unwrap();
        out.collect().await.unwrap().to_bytes().to_vec()
    });
    (parts, sent)
}

/// Host, service, the agent's request, the session token latchkey holds.
type CrossCheck<'a> = (&'a str, &'a str, http::Request<Vec<u8>>, Option<&'a str>);

#[test]
fn latchkey_signs_as_botocore_does() {
    use latchkey::credential::sigv4::Keys;
    let zeros = "0".repeat(64);
    let secret = "real/secret+key==";
    let header_auth = |scope: &str, signed: &str| {
        format!("AWS4-HMAC-SHA256 Credential=latchkey/20240101/{scope}/aws4_request, SignedHeaders={signed}, Signature={zeros}")
    };
    let chunk = format!("5;chunk-signature={zeros}\r\nhello\r\n0;chunk-signature={zeros}\r\n\r\n");
    let cases: Vec<CrossCheck> = vec![
        (
            "s3.amazonaws.com",
            "s3",
            http::Request::put("/data/a%20b%2Bc~d.txt?x-id=PutObject&tagging=")
                .header("authorization", header_auth("us-east-1/s3", "content-type;host;x-amz-content-sha256;x-amz-date;x-amz-meta-note"))
                .header("x-amz-date", "20240101T000000Z")
                .header("x-amz-content-sha256", "UNSIGNED-PAYLOAD")
                .header("content-type", "text/plain")
                .header("x-amz-meta-note", "  spaced   value ")
                .body(b"hello".to_vec())
                .unwrap(),
            None,
        ),
        (
            "s3.amazonaws.com",
            "s3",
            http::Request::put("/data/streamed.bin")
                .header("authorization", header_auth("us-east-1/s3", "content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length"))
                .header("x-amz-date", "20240101T000000Z")
                .header("x-amz-content-sha256", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
                .header("content-encoding", "aws-chunked")
                .header("x-amz-decoded-content-length", "5")
                .header("content-length", chunk.len().to_string())
                .body(chunk.clone().into_bytes())
                .unwrap(),
            Some("temporary-session-token/with+chars="),
        ),
        (
            "sqs.eu-west-1.amazonaws.com",
            "sqs",
            http::Request::post("/123456789012/queue")
                .header("authorization", header_auth("eu-west-1/sqs", "content-type;host;x-amz-date"))
                .header("x-amz-date", "20240101T000000Z")
                .header("content-type", "application/x-www-form-urlencoded; charset=utf-8")
                .body(b"Action=SendMessage&MessageBody=hello%20world&Version=2012-11-05".to_vec())
                .unwrap(),
            None,
        ),
        (
            "s3.amazonaws.com",
            "s3",
            http::Request::get(format!("/data/report%201.csv?response-content-type=text%2Fcsv&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=latchkey%2F20240101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20240101T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Signature={zeros}"))
                .body(Vec::new())
                .unwrap(),
            Some("temporary-session-token/with+chars="),
        ),
    ];
    let mut json_cases = Vec::new();
    let mut ours = Vec::new();
    for (host, service, agent, token) in cases {
        let keys = Keys::new("AKIDREAL", secret, token);
        let (parts, sent) = latchkey_resigns(host, agent, &keys);
        let query = parts.headers.get("authorization").is_none();
        let signature = if query {
            let q = parts.uri.query().unwrap();
            q.split('&')
                .find_map(|p| p.strip_prefix("X-Amz-Signature="))
                .unwrap()
                .to_owned()
        } else {
            let auth = parts.headers["authorization"].to_str().unwrap();
            auth.split("Signature=").nth(1).unwrap().to_owned()
        };
        ours.push(signature);
        let headers: serde_json::Map<String, Value> = parts
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), Value::from(v.to_str().unwrap())))
            .collect();
        json_cases.push(serde_json::json!({
            "method": parts.method.as_str(),
            "url": parts.uri.to_string(),
            "headers": headers,
            "body": base64_std(&sent),
            "secret": secret,
            "service": service,
            "region": if service == "sqs" { "eu-west-1" } else { "us-east-1" },
            "query": query,
        }));
    }
    let mut child = Command::new("python3")
        .arg(script("botocore_check.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&json_cases).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let botocore: Vec<String> = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(ours, botocore);
}

/// The HMAC-verifying upstream (`aws/hmac_upstream.py`).
struct HmacUpstream {
    child: Child,
    port: u16,
}

impl Drop for HmacUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const CB_KEY_ID: &str = "cb-key-id-1";
const CB_SECRET_B64: &str = "c2VrcmV0LWNvaW5iYXNlLWhtYWMta2V5LTAxMjM0NTY3";
const CB_PASSPHRASE: &str = "pass-phrase-secret-42";
const STRIPE_SECRET: &str = "whsec_stripeLikeSecret0123456789";

#[test]
fn hmac_schemes_are_signed_as_a_verifying_upstream_expects() {
    let mut child = Command::new("python3")
        .arg(script("hmac_upstream.py"))
        .args([CB_KEY_ID, CB_SECRET_B64, CB_PASSPHRASE, STRIPE_SECRET])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let upstream = HmacUpstream {
        port: line.trim().parse().expect("the upstream prints its port"),
        child,
    };
    let port = upstream.port;
    let home = Home::new();
    home.write_policy(
        "bot.toml",
        &format!(
            r#"agent = "bot"
max_ttl = "1h"

[[routes]]
id = "coinbase"
host = "hmac.test:{port}"
methods = ["GET", "POST"]
paths = ["/coinbase/**"]
credential = "coinbase"
insecure_http = true
max_body = "4KiB"

[[routes]]
id = "stripe"
host = "hmac.test:{port}"
methods = ["POST"]
paths = ["/stripe/**"]
credential = "stripe"
insecure_http = true
"#
        ),
    );
    home.set_typed(
        "coinbase",
        "hmac",
        &format!(
            r#"kind = "hmac"
algorithm = "sha256"
encoding = "base64"
key_encoding = "base64"
timestamp = "unix"
message = "{{timestamp}}{{method}}{{path_query}}{{body}}"

[headers]
CB-ACCESS-KEY = "{CB_KEY_ID}"
CB-ACCESS-SIGN = "{{signature}}"
CB-ACCESS-TIMESTAMP = "{{timestamp}}"
CB-ACCESS-PASSPHRASE = "{{secret.passphrase}}"

[secret]
key = "{CB_SECRET_B64}"
passphrase = "{CB_PASSPHRASE}"
"#
        ),
    );
    home.set_typed(
        "stripe",
        "hmac",
        &format!(
            r#"kind = "hmac"
message = "{{timestamp}}.{{body}}"

[headers]
Stripe-Signature = "t={{timestamp}},v1={{signature}}"

[secret]
key = "{STRIPE_SECRET}"
"#
        ),
    );
    let out = home.run(&["policy", "check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let proxy = home.serve(&["--resolve", &format!("hmac.test:{port}:127.0.0.1")]);
    let token = home.issue("bot", &[]);
    let proxy_arg = proxy.url_with(&token);
    let curl = |args: &[&str], path: &str| {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--noproxy",
                "",
                "--proxy",
                &proxy_arg,
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
            ])
            .args(args)
            .arg(format!("http://hmac.test:{port}{path}"))
            .output()
            .unwrap();
        stdout(&out)
    };
    let mut seen = String::new();
    for (args, path) in [
        (
            vec!["-d", r#"{"size":"0.01","side":"buy"}"#],
            "/coinbase/orders?client=1&x=a%20b",
        ),
        (vec![], "/coinbase/accounts"),
        // The agent's own signature headers are replaced, not trusted.
        (
            vec!["-H", "CB-ACCESS-SIGN: forged", "-H", "CB-ACCESS-KEY: other"],
            "/coinbase/accounts",
        ),
        (vec!["-d", r#"{"type":"invoice.paid"}"#], "/stripe/webhook"),
        (
            vec!["-H", "Stripe-Signature: t=1,v1=forged", "-d", "x"],
            "/stripe/webhook",
        ),
    ] {
        let out = curl(&args, path);
        assert!(
            out.ends_with("200") && out.contains("\"ok\": true"),
            "{path}: {out}"
        );
        seen.push_str(&out);
    }
    // A body over the route's limit is refused, never signed over a part of it.
    let big = "x".repeat(8192);
    let out = curl(
        &["-H", "Transfer-Encoding: chunked", "-d", &big],
        "/coinbase/orders",
    );
    assert!(out.ends_with("413"), "{out}");
    seen.push_str(&out);
    // A body carrying a stored secret is caught by the tripwire while the kind reads it.
    let leak = format!("leak={STRIPE_SECRET}");
    let out = curl(
        &["-H", "Transfer-Encoding: chunked", "-d", &leak],
        "/stripe/webhook",
    );
    assert!(
        out.ends_with("403") && out.contains("secret_in_request"),
        "{out}"
    );
    assert!(!out.contains(STRIPE_SECRET));
    let lines = home.wait_audit(7);
    assert_eq!(lines[6]["reason"], "secret_in_request", "{}", lines[6]);
    for l in &lines[..5] {
        assert_eq!(l["credential_kind"], "hmac", "{l}");
        assert_eq!(l["status"], 200, "{l}");
    }
    assert_eq!(lines[5]["reason"], "body_too_large", "{}", lines[5]);
    assert_no_key_material(
        &home,
        &proxy,
        &seen,
        &[
            CB_SECRET_B64,
            "sekret-coinbase-hmac-key-01234567",
            CB_PASSPHRASE,
            STRIPE_SECRET,
        ],
    );
}

#[test]
fn latchkey_run_gives_aws_clients_placeholder_keys_only() {
    let moto = Moto::start();
    let (home, _proxy, _token) = setup(&moto, &long_term_doc(&moto), "");
    let endpoint = format!("http://s3.moto.test:{}", moto.port);
    let run = |cmd: &[&str]| {
        let out = home
            .cmd()
            .args(["run", "--agent", "bot", "--"])
            .args(cmd)
            .env("LK_ENDPOINT", &endpoint)
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            // What the user's shell may hold: never handed to the agent.
            .env("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
            .env("AWS_SECRET_ACCESS_KEY", "users-own-secret-key")
            .env("AWS_SESSION_TOKEN", "users-own-session-token")
            .env_remove("LK_PROXY")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}{}",
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    };
    let env = run(&["env"]);
    assert!(
        env.lines().any(|l| l == "AWS_ACCESS_KEY_ID=latchkey"),
        "{env}"
    );
    assert!(env
        .lines()
        .any(|l| l == format!("AWS_SECRET_ACCESS_KEY={PLACEHOLDER_SECRET}")));
    assert!(
        !env.contains("AWS_SESSION_TOKEN") && !env.contains("users-own"),
        "{env}"
    );
    let v: Value = serde_json::from_str(
        run(&["python3", script("agent.py").to_str().unwrap(), "basic"]).trim(),
    )
    .unwrap();
    assert_eq!(v["got"], "hello through latchkey", "{v}");
    let listed = run(&[
        "aws",
        "s3api",
        "list-objects-v2",
        "--bucket",
        "data",
        "--endpoint-url",
        &endpoint,
    ]);
    assert!(listed.contains("hello.txt"), "{listed}");
    let lines = home.audit();
    assert!(
        lines.len() >= 4 && lines.iter().all(|l| l["decision"] == "allow"),
        "{lines:?}"
    );
}

#[test]
fn trace_logging_never_shows_the_key_or_the_session_token() {
    let mut moto = Moto::start();
    let doc = format!(
        "kind = \"aws_sigv4\"\naccess_key_id = \"{}\"\nrole_arn = \"{}\"\nsts_endpoint = \"http://sts.moto.test:{}\"\n\n[secret]\nsecret_access_key = \"{}\"\n",
        moto.access_key_id, moto.role_arn, moto.port, moto.secret
    );
    let home = Home::new();
    let port = moto.port;
    home.write_policy(
        "bot.toml",
        &format!(
            "agent = \"bot\"\n[[routes]]\nid = \"s3\"\nhost = \"s3.moto.test:{port}\"\nmethods = [\"GET\", \"PUT\"]\npaths = [\"/data\", \"/data/**\"]\ncredential = \"aws\"\nservice = \"s3\"\ninsecure_http = true\n"
        ),
    );
    home.set_typed("aws", "aws_sigv4", &doc);
    // The real binary, with every target at trace (aws-sigv4 traces canonical requests).
    let proxy = home.serve_env(
        &[
            "--resolve",
            &format!("s3.moto.test:{port}:127.0.0.1"),
            "--resolve",
            &format!("sts.moto.test:{port}:127.0.0.1"),
        ],
        &[("RUST_LOG", "trace")],
    );
    let token = home.issue("bot", &[]);
    let (v, seen) = agent(&proxy, &token, &moto, &["basic"]);
    assert_eq!(v["got"], "hello through latchkey", "{v}");
    let sessions: Value = serde_json::from_str(&moto.ask("sessions")).unwrap();
    let session = &sessions[0];
    eventually(
        std::time::Duration::from_secs(10),
        "the log has the requests",
        || proxy.log().contains("route=\"s3\"").then_some(()),
    );
    let log = proxy.log();
    assert!(log.contains(" TRACE "), "trace logging is on: {log}");
    assert_no_key_material(
        &home,
        &proxy,
        &seen,
        &[
            &moto.secret,
            session["session_token"].as_str().unwrap(),
            session["secret_access_key"].as_str().unwrap(),
        ],
    );
}
