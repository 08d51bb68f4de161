//! Re-signing checked against the published SigV4 test vectors, the S3 chunked-upload example
//! of the AWS documentation, and what a hostile agent sends.

use std::path::Path;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::request::Parts;
use http_body_util::BodyExt;

use sha2::Digest;

use super::chunked::{self, ChunkKey};
use super::*;
use crate::authority::Authority;
use crate::policy::{AgentPolicy, Grant, Scheme};

const ZEROS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn policy(host: &str, extra: &str) -> AgentPolicy {
    AgentPolicy::from_toml(
        Path::new("t.toml"),
        &format!(
            "agent = \"t\"\n[[routes]]\nid = \"aws\"\nhost = \"{host}\"\nmethods = [\"GET\", \"PUT\", \"POST\"]\npaths = [\"/**\"]\ncredential = \"aws\"\n{extra}\n"
        ),
    )
    .expect("test policy loads")
}

fn body(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Re-sign `parts` + `data` for `host` as the kind would; returns the upstream head and body.
async fn resign_for(
    host: &str,
    extra: &str,
    mut parts: Parts,
    data: Bytes,
    keys: &Keys,
    time: SystemTime,
) -> Result<(Parts, Bytes), Deny> {
    let policy = policy(host, extra);
    let authority = Authority::parse(host, Some(443)).unwrap();
    let path = crate::policy::normalize(parts.uri.path())
        .unwrap()
        .into_owned();
    let query = parts.uri.query().map(str::to_owned);
    let allowed = policy.decide(Scheme::Https, &authority, &parts.method, &path, Grant::ALL)?;
    let rewrite = Rewrite {
        scheme: Scheme::Https,
        authority: &authority,
        path: &path,
        query: query.as_deref(),
        allowed: &allowed,
    };
    let agent = AgentSignature::read(&parts)?;
    agent.check_scope(allowed.route())?;
    let out = resign(&mut parts, &rewrite, body(data), &agent, keys, time).await?;
    let bytes = out
        .collect()
        .await
        .map_err(|e| Deny::CannotSign(e.to_string()))?
        .to_bytes();
    Ok((parts, bytes))
}

struct Vector {
    parts: Parts,
    body: Bytes,
    keys: Keys,
    time: SystemTime,
    signed_headers: String,
    header_signature: String,
    query_signature: String,
    region: String,
    service: String,
}

fn vector(name: &str) -> Vector {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/sigv4")
        .join(name);
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let ctx: serde_json::Value = serde_json::from_str(&read("context.json")).unwrap();
    let request = read("request.txt");
    let (head, body) = request.split_once("\n\n").unwrap_or((&request, ""));
    let mut lines = head.lines();
    let first: Vec<&str> = lines.next().unwrap().split(' ').collect();
    let mut builder = http::Request::builder().method(first[0]).uri(first[1]);
    for line in lines {
        let (k, v) = line.split_once(':').unwrap();
        builder = builder.header(k, v);
    }
    let canonical = read("header-canonical-request.txt");
    let canon: Vec<&str> = canonical.lines().collect();
    let signed_headers = canon[canon.len() - 2].to_owned();
    // The declared payload hash, when the vector signs it as a header.
    if let Some(line) = canon
        .iter()
        .find(|l| l.starts_with("x-amz-content-sha256:"))
    {
        builder = builder.header(
            "x-amz-content-sha256",
            &line["x-amz-content-sha256:".len()..],
        );
    }
    let creds = &ctx["credentials"];
    let time: chrono::DateTime<chrono::Utc> = ctx["timestamp"].as_str().unwrap().parse().unwrap();
    Vector {
        parts: builder.body(()).unwrap().into_parts().0,
        body: Bytes::from(body.to_owned()),
        keys: Keys::new(
            creds["access_key_id"].as_str().unwrap(),
            creds["secret_access_key"].as_str().unwrap(),
            creds["token"].as_str(),
        ),
        time: time.into(),
        // The agent did not sign the token: it has none; latchkey's signer adds it.
        signed_headers: signed_headers.replace(";x-amz-security-token", ""),
        header_signature: read("header-signature.txt").trim().to_owned(),
        query_signature: read("query-signature.txt").trim().to_owned(),
        region: ctx["region"].as_str().unwrap().to_owned(),
        service: ctx["service"].as_str().unwrap().to_owned(),
    }
}

fn signature_of(auth: &str) -> &str {
    auth.split("Signature=").nth(1).unwrap()
}

const VECTORS: [&str; 5] = [
    "get-vanilla",
    "get-vanilla-query-order-key-case",
    "post-x-www-form-urlencoded",
    "get-vanilla-with-session-token",
    "post-vanilla",
];

#[tokio::test]
async fn header_signatures_equal_the_published_test_vectors() {
    for name in VECTORS {
        let mut v = vector(name);
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential=latchkey/20150830/{}/{}/aws4_request, SignedHeaders={}, Signature={ZEROS}",
            v.region, v.service, v.signed_headers
        );
        v.parts
            .headers
            .insert("authorization", auth.parse().unwrap());
        v.parts
            .headers
            .insert("x-amz-date", "20991231T000000Z".parse().unwrap());
        let (parts, sent) = resign_for(
            "example.amazonaws.com",
            "",
            v.parts,
            v.body.clone(),
            &v.keys,
            v.time,
        )
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let auth = parts.headers["authorization"].to_str().unwrap();
        assert_eq!(signature_of(auth), v.header_signature, "{name}: {auth}");
        assert!(auth.contains("Credential=AKIDEXAMPLE/20150830/"), "{name}");
        assert_eq!(parts.headers["x-amz-date"], "20150830T123600Z", "{name}");
        assert_eq!(sent, v.body, "{name}: the body goes out as it came");
    }
}

#[tokio::test]
async fn query_signatures_equal_the_published_test_vectors() {
    for name in [
        "get-vanilla",
        "get-vanilla-query-order-key-case",
        "get-vanilla-with-session-token",
    ] {
        let mut v = vector(name);
        let target = v.parts.uri.to_string();
        let sep = if target.contains('?') { '&' } else { '?' };
        // The agent's own presigned parameters, signature and date included, in any case.
        v.parts.uri = format!(
            "{target}{sep}X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=latchkey%2F20150830%2F{}%2F{}%2Faws4_request&x-amz-date=20991231T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature={ZEROS}",
            v.region, v.service
        )
        .parse()
        .unwrap();
        let (parts, _) = resign_for(
            "example.amazonaws.com",
            "",
            v.parts,
            v.body,
            &v.keys,
            v.time,
        )
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let query = parts.uri.query().unwrap().to_owned();
        let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        let get = |k: &str| {
            let found: Vec<&String> = params
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(k))
                .map(|(_, v)| v)
                .collect();
            assert_eq!(found.len(), 1, "{name}: {k} once in {query}");
            found[0].clone()
        };
        assert_eq!(get("X-Amz-Signature"), v.query_signature, "{name}: {query}");
        assert_eq!(get("X-Amz-Date"), "20150830T123600Z");
        assert!(get("X-Amz-Credential").starts_with("AKIDEXAMPLE/"));
        assert!(!parts.headers.contains_key("authorization"));
    }
}

/// The example of the S3 documentation, "Signature Calculations for the Authorization Header:
/// Transferring Payload in Multiple Chunks (Chunked Upload)": 65 KiB of 'a' in a 64 KiB and a
/// 1 KiB chunk, with its published seed and chunk signatures.
#[tokio::test]
async fn chunked_upload_equals_the_s3_documentation_example() {
    let keys = Keys::new(
        "AKIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        None,
    );
    let time: SystemTime = "2013-05-24T00:00:00Z"
        .parse::<chrono::DateTime<chrono::Utc>>()
        .unwrap()
        .into();
    let data = vec![b'a'; 65536 + 1024];
    // The agent's body, chunk-signed with the placeholder key from a made-up seed.
    let placeholder = ChunkKey {
        key: Zeroizing::new(b"placeholder".to_vec()),
        date_time: "20130524T000000Z".into(),
        scope: "20130524/us-east-1/s3/aws4_request".into(),
    };
    let agent_body = chunked::encode(&data, 65536, &placeholder, ZEROS);
    assert_eq!(agent_body.len(), 66824);
    let parts = http::Request::put("/examplebucket/chunkObject.txt")
        .header("authorization", format!("AWS4-HMAC-SHA256 Credential=latchkey/20130524/us-east-1/s3/aws4_request,SignedHeaders=content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;x-amz-storage-class,Signature={ZEROS}"))
        .header("x-amz-date", "20130524T000000Z")
        .header("x-amz-storage-class", "REDUCED_REDUNDANCY")
        .header("x-amz-content-sha256", STREAMING_SIGNED)
        .header("content-encoding", "aws-chunked")
        .header("x-amz-decoded-content-length", "66560")
        .header("content-length", "66824")
        .body(())
        .unwrap()
        .into_parts()
        .0;
    let (parts, sent) = resign_for(
        "s3.amazonaws.com",
        "service = \"s3\"\nregion = \"us-east-1\"",
        parts,
        Bytes::from(agent_body),
        &keys,
        time,
    )
    .await
    .unwrap();
    let auth = parts.headers["authorization"].to_str().unwrap();
    assert_eq!(
        signature_of(auth),
        "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
    );
    assert_eq!(
        sent.len(),
        66824,
        "the re-signed body keeps the agent's length"
    );
    let sigs: Vec<String> = sent
        .windows(17)
        .enumerate()
        .filter(|(_, w)| *w == b";chunk-signature=")
        .map(|(i, _)| String::from_utf8(sent[i + 17..i + 81].to_vec()).unwrap())
        .collect();
    assert_eq!(
        sigs,
        [
            "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
            "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
            "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9",
        ]
    );
    assert!(sent[88..88 + 65536].iter().all(|&b| b == b'a'));
}

fn s3_put(content_sha256: &str, extra: &[(&str, &str)]) -> Parts {
    let mut b = http::Request::put("/bucket/key")
        .header("authorization", format!("AWS4-HMAC-SHA256 Credential=latchkey/20240101/us-east-1/s3/aws4_request, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={ZEROS}"))
        .header("x-amz-date", "20240101T000000Z")
        .header("x-amz-content-sha256", content_sha256);
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn test_keys() -> Keys {
    Keys::new("AKIDREAL", "real-secret-key-value", None)
}

#[tokio::test]
async fn unsupported_signatures_and_modes_are_refused_with_a_reason() {
    let cases: Vec<(Parts, &str)> = vec![
        (
            http::Request::get("/bucket/key").body(()).unwrap().into_parts().0,
            "no AWS SigV4 signature",
        ),
        (
            http::Request::get("/bucket/key")
                .header("authorization", "AWS latchkey:c2lnbmF0dXJl")
                .body(())
                .unwrap()
                .into_parts()
                .0,
            "SigV2",
        ),
        (
            http::Request::get("/bucket/key")
                .header("authorization", format!("AWS4-ECDSA-P256-SHA256 Credential=latchkey/20240101/s3/aws4_request, SignedHeaders=host, Signature={ZEROS}"))
                .body(())
                .unwrap()
                .into_parts()
                .0,
            "SigV4a",
        ),
        (
            http::Request::get("/bucket/key")
                .header("authorization", "AWS4-HMAC-SHA256 Credential=latchkey/20240101/us-east-1/s3/aws4_request")
                .body(())
                .unwrap()
                .into_parts()
                .0,
            "lacks",
        ),
        (
            s3_put("STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER", &[]),
            "not supported",
        ),
        (s3_put("not-a-hash", &[]), "not a payload mode"),
        (s3_put(STREAMING_SIGNED, &[]), "x-amz-decoded-content-length"),
    ];
    for (parts, why) in cases {
        let err = resign_for(
            "s3.amazonaws.com",
            "",
            parts,
            Bytes::new(),
            &test_keys(),
            SystemTime::now(),
        )
        .await
        .expect_err("refused");
        assert_eq!(err.code(), "cannot_sign", "{err}");
        assert!(err.to_string().contains(why), "{err} lacks {why}");
        assert!(!err.to_string().contains("real-secret"), "{err}");
    }
    // Signed both ways at once.
    let mut both = s3_put(UNSIGNED_PAYLOAD, &[]);
    both.uri = format!("/bucket/key?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=latchkey%2F20240101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Expires=60&X-Amz-SignedHeaders=host&X-Amz-Signature={ZEROS}")
        .parse()
        .unwrap();
    let err = AgentSignature::read(&both).unwrap_err();
    assert!(err.to_string().contains("both"), "{err}");
}

#[tokio::test]
async fn a_signature_for_another_service_or_region_is_refused() {
    for (extra, why) in [
        ("service = \"sqs\"", "s3/us-east-1"),
        ("region = \"eu-west-1\"", "*/eu-west-1"),
    ] {
        let err = resign_for(
            "s3.amazonaws.com",
            extra,
            s3_put(UNSIGNED_PAYLOAD, &[]),
            Bytes::new(),
            &test_keys(),
            SystemTime::now(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), "signing_scope_not_allowed");
        assert_eq!(err.status(), 403);
        assert!(err.to_string().contains(why), "{err}");
    }
}

#[tokio::test]
async fn the_agents_signing_headers_are_replaced_not_kept() {
    let parts = s3_put(
        UNSIGNED_PAYLOAD,
        &[
            ("x-amz-security-token", "agent-token"),
            ("x-amz-meta-a", "1"),
        ],
    );
    let keys = Keys::new(
        "AKIDREAL",
        "real-secret-key-value",
        Some("real-session-token"),
    );
    let (parts, _) = resign_for(
        "s3.amazonaws.com",
        "",
        parts,
        Bytes::new(),
        &keys,
        SystemTime::now(),
    )
    .await
    .unwrap();
    assert_eq!(parts.headers["x-amz-security-token"], "real-session-token");
    assert!(parts.headers["x-amz-security-token"].is_sensitive());
    assert!(parts.headers["authorization"].is_sensitive());
    assert_eq!(parts.headers["x-amz-content-sha256"], UNSIGNED_PAYLOAD);
    assert_eq!(parts.headers.get_all("x-amz-date").iter().count(), 1);
    // Not signed by the agent: forwarded, not signed by latchkey either.
    assert_eq!(parts.headers["x-amz-meta-a"], "1");
    let auth = parts.headers["authorization"].to_str().unwrap();
    assert!(
        auth.contains("SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token,"),
        "{auth}"
    );
    assert!(!auth.contains("real-secret"));
}

#[tokio::test]
async fn a_declared_hash_is_checked_before_the_last_byte_goes_out() {
    let data = Bytes::from_static(b"hello world");
    let good = hex::encode(sha2::Sha256::digest(&data));
    let len = data.len().to_string();
    let ok = resign_for(
        "s3.amazonaws.com",
        "",
        s3_put(&good, &[("content-length", &len)]),
        data.clone(),
        &test_keys(),
        SystemTime::now(),
    )
    .await
    .unwrap();
    assert_eq!(ok.1, data);
    let bad = hex::encode(sha2::Sha256::digest(b"something else"));
    let err = resign_for(
        "s3.amazonaws.com",
        "",
        s3_put(&bad, &[("content-length", &len)]),
        data,
        &test_keys(),
        SystemTime::now(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
    // Without a Content-Length (chunked), the check runs when the body ends.
    let err = resign_for(
        "s3.amazonaws.com",
        "",
        s3_put(&bad, &[]),
        Bytes::from_static(b"hello world"),
        &test_keys(),
        SystemTime::now(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
}

/// Feed `agent_body` to a chunk signer and return how it ends.
async fn resign_chunks(agent_body: Vec<u8>, announced: u64) -> Result<Bytes, String> {
    let key = ChunkKey {
        key: Zeroizing::new(vec![7; 32]),
        date_time: "20240101T000000Z".into(),
        scope: "20240101/us-east-1/s3/aws4_request".into(),
    };
    chunked::ChunkSigner::new(body(agent_body), key, ZEROS.into(), announced)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn broken_chunk_framing_ends_the_body_with_an_error() {
    let key = ChunkKey {
        key: Zeroizing::new(b"agent".to_vec()),
        date_time: "20240101T000000Z".into(),
        scope: "20240101/us-east-1/s3/aws4_request".into(),
    };
    let good = chunked::encode(b"0123456789", 4, &key, ZEROS);
    assert_eq!(
        resign_chunks(good.clone(), 10).await.unwrap().len(),
        good.len()
    );
    let sig = "a".repeat(64);
    let cases: Vec<(Vec<u8>, u64, &str)> = vec![
        (
            good[..good.len() - 5].to_vec(),
            10,
            "ended before its final chunk",
        ),
        (good.clone(), 9, "x-amz-decoded-content-length"),
        (good.clone(), 11, "x-amz-decoded-content-length"),
        ([&good[..], b"extra"].concat(), 10, "follow the final chunk"),
        (b"4;chunk-signature=abc\r\n0123\r\n".to_vec(), 4, "64 hex"),
        (
            format!("zz;chunk-signature={sig}\r\n").into_bytes(),
            4,
            "hexadecimal",
        ),
        (
            format!("4;sig={sig}\r\n0123\r\n").into_bytes(),
            4,
            "no chunk-signature",
        ),
        (
            format!("4;chunk-signature={sig}\r\n0123XX").into_bytes(),
            4,
            "CRLF",
        ),
        (
            format!("200000;chunk-signature={sig}\r\n").into_bytes(),
            1 << 21,
            "larger than",
        ),
        (vec![b'1'; 4096], 4, "too long"),
    ];
    for (agent_body, announced, why) in cases {
        let err = resign_chunks(agent_body, announced).await.unwrap_err();
        assert!(err.contains(why), "{err} lacks {why}");
    }
}

#[test]
fn session_policies_follow_the_route() {
    let p = policy("s3.moto.test:9000", "service = \"s3\"\n");
    let doc: serde_json::Value =
        serde_json::from_str(&sts::session_policy(&p.routes()[0], "aws")).unwrap();
    // `/**`: no bucket named, so every resource of the actions.
    assert_eq!(doc["Statement"][0]["Resource"], serde_json::json!(["*"]));
    let p = AgentPolicy::from_toml(
        Path::new("t.toml"),
        "agent = \"t\"\n[[routes]]\nid = \"r\"\nhost = \"s3.moto.test\"\nmethods = [\"GET\", \"PUT\"]\npaths = [\"/data/reports/**\", \"/data\"]\ncredential = \"aws\"\nservice = \"s3\"\n",
    )
    .unwrap();
    let doc: serde_json::Value =
        serde_json::from_str(&sts::session_policy(&p.routes()[0], "aws")).unwrap();
    let st = &doc["Statement"][0];
    assert_eq!(st["Effect"], "Allow");
    assert_eq!(
        st["Resource"],
        serde_json::json!(["arn:aws:s3:::data", "arn:aws:s3:::data/reports/*"])
    );
    let actions: Vec<&str> = st["Action"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(actions.contains(&"s3:GetObject") && actions.contains(&"s3:PutObject"));
    assert!(!actions.contains(&"s3:DeleteObject"), "{actions:?}");
    // Explicit actions win; virtual-hosted buckets come from the host.
    let p = AgentPolicy::from_toml(
        Path::new("t.toml"),
        "agent = \"t\"\n[[routes]]\nid = \"r\"\nhost = \"logs.s3.eu-west-1.amazonaws.com\"\nmethods = [\"GET\"]\npaths = [\"/2024/**\"]\ncredential = \"aws\"\nservice = \"s3\"\nactions = [\"s3:GetObject\"]\n",
    )
    .unwrap();
    let doc: serde_json::Value =
        serde_json::from_str(&sts::session_policy(&p.routes()[0], "aws-cn")).unwrap();
    assert_eq!(
        doc["Statement"][0]["Action"],
        serde_json::json!(["s3:GetObject"])
    );
    assert_eq!(
        doc["Statement"][0]["Resource"],
        serde_json::json!(["arn:aws-cn:s3:::logs/2024/*"])
    );
    // Another service: that service only.
    let p = policy("sqs.us-east-1.amazonaws.com", "service = \"sqs\"");
    let doc: serde_json::Value =
        serde_json::from_str(&sts::session_policy(&p.routes()[0], "aws")).unwrap();
    assert_eq!(doc["Statement"][0]["Action"], serde_json::json!(["sqs:*"]));
}

#[test]
fn documents_are_checked_and_errors_name_no_secret() {
    use crate::credential::Kind;
    let kind = SigV4Kind::new(None);
    let build = |doc: &str| kind.build("aws", &crate::secrets::typed::parse_text(doc).unwrap());
    let base = "kind = \"aws_sigv4\"\naccess_key_id = \"AKIDREAL\"\n[secret]\nsecret_access_key = \"sekrit-aws-key\"\n";
    assert!(build(base).is_ok());
    let with_role = base.replace(
        "[secret]",
        "role_arn = \"arn:aws:iam::123456789012:role/agent\"\nduration = \"30m\"\n[secret]",
    );
    assert!(build(&with_role).is_ok());
    for (bad, why) in [
        (
            base.replace("access_key_id = \"AKIDREAL\"\n", ""),
            "access_key_id",
        ),
        (
            base.replace("secret_access_key", "secret_key"),
            "unknown secret",
        ),
        (
            base.replace("[secret]", "sts_endpoint = \"https://x\"\n[secret]"),
            "needs `role_arn`",
        ),
        (
            base.replace("[secret]", "role_arn = \"nope\"\n[secret]"),
            "not an IAM role ARN",
        ),
        (with_role.replace("30m", "5m"), "15m to 12h"),
        (
            base.replace("[secret]", "colour = \"red\"\n[secret]"),
            "unknown setting",
        ),
    ] {
        let err = build(&bad).err().expect("refused").to_string();
        assert!(err.contains(why), "{err}");
        assert!(!err.contains("sekrit"), "{err}");
    }
    let _ = Duration::ZERO;
}

#[test]
fn the_kind_fits_routes_without_inject_and_a_role_needs_a_service() {
    use crate::credential::Kind;
    let doc = |extra: &str| {
        crate::secrets::typed::parse_text(&format!(
            "kind = \"aws_sigv4\"\naccess_key_id = \"AKIDREAL\"\n{extra}[secret]\nsecret_access_key = \"k\"\n"
        ))
        .unwrap()
    };
    let plain = SigV4Kind::new(None).build("aws", &doc("")).unwrap();
    let role = SigV4Kind::new(None)
        .build("aws", &doc("role_arn = \"arn:aws:iam::1:role/r\"\n"))
        .unwrap();
    let no_service = policy("s3.amazonaws.com", "");
    let with_service = policy("s3.amazonaws.com", "service = \"s3\"");
    let with_inject = policy(
        "s3.amazonaws.com",
        "inject = { header = \"x-k\", value = \"{secret}\" }",
    );
    assert!(plain.fits(&no_service.routes()[0]).is_ok());
    assert!(plain
        .fits(&with_inject.routes()[0])
        .unwrap_err()
        .contains("remove the route's `inject`"));
    assert!(role
        .fits(&no_service.routes()[0])
        .unwrap_err()
        .contains("`service`"));
    assert!(role.fits(&with_service.routes()[0]).is_ok());
    assert_eq!(plain.kind(), "aws_sigv4");
    assert_eq!(plain.tripwire_kind(), Some(tripwire::Kind::Aws));
}
