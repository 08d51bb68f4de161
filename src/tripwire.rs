//! The exfiltration tripwire: refuse a request that carries a credential out. An agent that got
//! hold of a real key (a file on disk, an environment variable, a log) must not be able to send
//! it anywhere, on any route.
//!
//! Two things are searched for, in one pass of one automaton over the agent's request (its
//! target, its header values and, as it streams, its body):
//!
//! - the value of every stored credential, in every encoding `redact::encoded_forms` builds
//!   (raw, percent, base64, hex, JSON escapes); the set is built from the secret backend once
//!   and rebuilt when the secrets change ([`Tripwire::build`]), never per request;
//! - well-known formats of real credentials ([`Kind`]): a literal prefix, then a bounded
//!   charset/length check. A format is not flagged on a route that injects a credential of
//!   that kind (the route's kind is the format of its own secret value, [`kind_of`]): the
//!   agent's `Authorization` is replaced there anyway.
//!
//! SECURITY: the needles live in zeroizing buffers until the automaton is built (which keeps
//! its own copy, as `redact::Needles` does); a [`Hit`] names a credential or a kind, never a
//! value, and nothing here logs. This module knows nothing of the proxy.

use std::sync::Arc;

use aho_corasick::{AhoCorasick, Input, MatchKind};
use bytes::{Bytes, BytesMut};
use http::request::Parts;
use zeroize::Zeroizing;

use crate::deny::Leak;
use crate::redact::encoded_forms;
use crate::secrets::{BackendError, Secrets};

/// Stored values shorter than this are not searched for: they (and their encodings) would
/// match ordinary text.
pub const MIN_SECRET: usize = 8;

/// Encoded forms shorter than this are dropped for the same reason (a base64 core of a short
/// secret can be a handful of characters).
const MIN_NEEDLE: usize = 6;

/// A well-known credential format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `ghp_`/`gho_`/`ghu_`/`ghs_`/`ghr_` + 36 alphanumerics, `github_pat_` + 82.
    GitHub,
    /// `sk-` / `sk-proj-` + 32 or more of `[A-Za-z0-9_-]`.
    OpenAi,
    /// `sk-ant-` + 32 or more of `[A-Za-z0-9_-]`.
    Anthropic,
    /// `AKIA` / `ASIA` + 16 of `[A-Z0-9]`.
    Aws,
    /// `xoxa-`/`xoxb-`/`xoxp-`/`xoxr-`/`xoxs-` + 10 or more of `[A-Za-z0-9-]`.
    Slack,
    /// `sk_live_` / `rk_live_` + 16 or more alphanumerics.
    Stripe,
    /// `AIza` + 35 of `[A-Za-z0-9_-]`.
    Google,
}

impl Kind {
    /// The stable name used in the refusal's detail and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::GitHub => "github",
            Kind::OpenAi => "openai",
            Kind::Anthropic => "anthropic",
            Kind::Aws => "aws",
            Kind::Slack => "slack",
            Kind::Stripe => "stripe",
            Kind::Google => "google",
        }
    }
}

fn alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}
fn alnum_underscore(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}
fn token_chars(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}
fn upper_digit(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_digit()
}
fn alnum_dash(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-'
}

/// One format: a prefix, then between `min` and `max` bytes of `charset` (`max == usize::MAX`:
/// no upper bound).
struct Format {
    prefix: &'static str,
    kind: Kind,
    charset: fn(u8) -> bool,
    min: usize,
    max: usize,
}

const fn f(
    prefix: &'static str,
    kind: Kind,
    charset: fn(u8) -> bool,
    min: usize,
    max: usize,
) -> Format {
    Format {
        prefix,
        kind,
        charset,
        min,
        max,
    }
}

const LONG: usize = usize::MAX;

/// The formats recognised. The automaton matches leftmost-longest, so `sk-ant-` wins over `sk-`
/// at the same place.
const FORMATS: &[Format] = &[
    f("ghp_", Kind::GitHub, alnum, 36, 36),
    f("gho_", Kind::GitHub, alnum, 36, 36),
    f("ghu_", Kind::GitHub, alnum, 36, 36),
    f("ghs_", Kind::GitHub, alnum, 36, 36),
    f("ghr_", Kind::GitHub, alnum, 36, 36),
    f("github_pat_", Kind::GitHub, alnum_underscore, 82, 82),
    f("sk-ant-", Kind::Anthropic, token_chars, 32, LONG),
    f("sk-proj-", Kind::OpenAi, token_chars, 32, LONG),
    f("sk-", Kind::OpenAi, token_chars, 32, LONG),
    f("AKIA", Kind::Aws, upper_digit, 16, 16),
    f("ASIA", Kind::Aws, upper_digit, 16, 16),
    f("xoxa-", Kind::Slack, alnum_dash, 10, LONG),
    f("xoxb-", Kind::Slack, alnum_dash, 10, LONG),
    f("xoxp-", Kind::Slack, alnum_dash, 10, LONG),
    f("xoxr-", Kind::Slack, alnum_dash, 10, LONG),
    f("xoxs-", Kind::Slack, alnum_dash, 10, LONG),
    f("sk_live_", Kind::Stripe, alnum, 16, LONG),
    f("rk_live_", Kind::Stripe, alnum, 16, LONG),
    f("AIza", Kind::Google, token_chars, 35, 35),
];

impl Format {
    /// Bytes that must be seen after the start of the prefix to decide: the prefix, the
    /// longest run that can match, and one more byte to see that the run ended.
    fn span(&self) -> usize {
        self.prefix.len()
            + if self.max == LONG {
                self.min
            } else {
                self.max + 1
            }
    }

    /// Whether the bytes after the prefix (`rest`, which may be cut short by the end of what
    /// is known: then a run reaching its end counts as ended) make a credential.
    fn fits(&self, rest: &[u8]) -> bool {
        let bound = if self.max == LONG {
            self.min
        } else {
            self.max + 1
        };
        let run = rest
            .iter()
            .take(bound)
            .take_while(|&&b| (self.charset)(b))
            .count();
        run >= self.min && run <= self.max
    }
}

/// What to do when a request is caught carrying a credential (`--on-exfiltration`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OnExfiltration {
    /// Refuse the request (403 `secret_in_request`).
    #[default]
    Refuse,
    /// Refuse it and revoke the session (the token's jti) at once, as `token revoke` does.
    Revoke,
}

/// What a request was caught carrying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hit {
    /// An encoding of the stored credential of this name.
    Stored(Arc<str>),
    /// Something in a well-known format of this kind.
    Format(Kind),
}

impl Hit {
    /// The metric label: `stored` or the format's name.
    pub fn label(&self) -> &'static str {
        match self {
            Hit::Stored(_) => "stored",
            Hit::Format(k) => k.as_str(),
        }
    }

    /// What the refusal says (a name or a kind, never a value).
    pub fn to_leak(&self) -> Leak {
        match self {
            Hit::Stored(name) => Leak::Stored(name.to_string()),
            Hit::Format(k) => Leak::Format(k.as_str()),
        }
    }
}

/// The kind of a credential value, when it is in a well-known format (the route's own secret:
/// what kind of credential the route injects).
pub fn kind_of(value: &[u8]) -> Option<Kind> {
    // Built once: this runs per request, on the route's secret.
    static FORMATS_ONLY: std::sync::LazyLock<Tripwire> =
        std::sync::LazyLock::new(Tripwire::formats_only);
    match FORMATS_ONLY.find(value, None) {
        Some(Hit::Format(k)) => Some(k),
        _ => None,
    }
}

/// The needles of every stored credential and the format prefixes, in one automaton.
pub struct Tripwire {
    searcher: AhoCorasick,
    /// The credential name of each stored pattern; patterns past its length are formats.
    owners: Vec<Arc<str>>,
    /// Bytes of a body held back so a needle or format split across chunks is caught: the
    /// longest needle (or format span) less one.
    hold: usize,
    /// The fewest bytes any hit takes (a stored value's shortest form, or a format's prefix
    /// and its shortest run): a whole value shorter than this is not searched.
    shortest: usize,
}

impl std::fmt::Debug for Tripwire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tripwire([redacted] x{})", self.owners.len())
    }
}

impl Tripwire {
    /// Formats only (no stored credential known yet, or none stored).
    pub fn formats_only() -> Tripwire {
        Tripwire::new(Vec::new())
    }

    /// The tripwire for these stored values (name, value); values shorter than
    /// [`MIN_SECRET`] are skipped.
    pub fn new(stored: Vec<(Arc<str>, Zeroizing<Vec<u8>>)>) -> Tripwire {
        let mut needles: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        let mut owners: Vec<Arc<str>> = Vec::new();
        for (name, value) in stored {
            if value.len() < MIN_SECRET {
                continue;
            }
            for form in encoded_forms(&value) {
                if form.len() >= MIN_NEEDLE && !needles.iter().any(|n| **n == *form) {
                    needles.push(form);
                    owners.push(name.clone());
                }
            }
        }
        let longest = needles
            .iter()
            .map(|n| n.len())
            .chain(FORMATS.iter().map(Format::span))
            .max()
            .unwrap_or(1);
        let shortest = needles
            .iter()
            .map(|n| n.len())
            .chain(FORMATS.iter().map(|f| f.prefix.len() + f.min))
            .min()
            .unwrap_or(0);
        let patterns: Vec<&[u8]> = needles
            .iter()
            .map(|n| n.as_slice())
            .chain(FORMATS.iter().map(|f| f.prefix.as_bytes()))
            .collect();
        let searcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(patterns)
            .expect("a few hundred short literal patterns fit the automaton's limits");
        Tripwire {
            searcher,
            owners,
            hold: longest - 1,
            shortest,
        }
    }

    /// Read every stored credential and build the tripwire. A value that cannot be read is
    /// skipped (and named in the log); the list itself failing is an error (keep the last set).
    pub async fn build(secrets: &Secrets) -> Result<Tripwire, BackendError> {
        let mut stored = Vec::new();
        for meta in secrets.list().await? {
            match secrets.get(&meta.name).await {
                Ok(Some(v)) => {
                    // A typed credential is searched for by each of its secret values.
                    let name = Arc::<str>::from(meta.name.as_str());
                    for value in crate::secrets::typed::secret_values(&v) {
                        stored.push((name.clone(), value));
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    credential = %meta.name, error = %e,
                    "cannot read a credential for the exfiltration tripwire; it is not searched for"
                ),
            }
        }
        Ok(Tripwire::new(stored))
    }

    /// How many bytes of a body are held back between chunks.
    pub fn hold(&self) -> usize {
        self.hold
    }

    /// The first credential in `hay`, ignoring formats of kind `allowed` (the route's own).
    /// The end of `hay` counts as the end of a run (see [`BodyScan`] for streams).
    pub fn find(&self, hay: &[u8], allowed: Option<Kind>) -> Option<Hit> {
        if hay.len() < self.shortest {
            return None;
        }
        self.find_in(hay, allowed, true)
    }

    /// As [`Tripwire::find`]; unless `complete`, a format that could still go on past the end
    /// of `hay` is left undecided (a stream's next chunk decides it).
    fn find_in(&self, hay: &[u8], allowed: Option<Kind>, complete: bool) -> Option<Hit> {
        let mut from = 0;
        while let Some(m) = self.searcher.find(Input::new(hay).range(from..)) {
            let id = m.pattern().as_usize();
            if let Some(name) = self.owners.get(id) {
                return Some(Hit::Stored(name.clone()));
            }
            let format = &FORMATS[id - self.owners.len()];
            // A prefix in the middle of a word (`risk-...`, `xAKIA...`) is not a credential.
            let bounded = m.start() == 0 || !hay[m.start() - 1].is_ascii_alphanumeric();
            let decidable = complete || m.start() + format.span() <= hay.len();
            if bounded && decidable && Some(format.kind) != allowed && format.fits(&hay[m.end()..])
            {
                return Some(Hit::Format(format.kind));
            }
            from = m.start() + 1;
        }
        None
    }

    /// Search the request target and every header value of the agent's head, before anything
    /// is stripped or injected. `Proxy-Authorization` (the latchkey token, removed before the
    /// request goes up) is skipped.
    pub fn find_in_head(&self, parts: &Parts, allowed: Option<Kind>) -> Option<Hit> {
        if let Some(pq) = parts.uri.path_and_query() {
            if let Some(hit) = self.find(pq.as_str().as_bytes(), allowed) {
                return Some(hit);
            }
        }
        parts
            .headers
            .iter()
            .filter(|(name, _)| **name != http::header::PROXY_AUTHORIZATION)
            .find_map(|(_, value)| self.find(value.as_bytes(), allowed))
    }
}

/// A body scanned as it streams: each chunk is searched together with the tail held back from
/// the previous one, and the last [`Tripwire::hold`] bytes are held again, so a credential
/// split across chunks is caught before any of its bytes are released.
pub struct BodyScan {
    tripwire: Arc<Tripwire>,
    allowed: Option<Kind>,
    held: BytesMut,
}

impl BodyScan {
    /// Scan with `tripwire`, ignoring formats of kind `allowed`.
    pub fn new(tripwire: Arc<Tripwire>, allowed: Option<Kind>) -> BodyScan {
        BodyScan {
            tripwire,
            allowed,
            held: BytesMut::new(),
        }
    }

    /// Take the next chunk: the bytes that may go on (possibly empty), or what was found.
    pub fn push(&mut self, chunk: Bytes) -> Result<Bytes, Hit> {
        let hold = self.tripwire.hold();
        let data = if self.held.is_empty() {
            chunk
        } else {
            self.held.extend_from_slice(&chunk);
            std::mem::take(&mut self.held).freeze()
        };
        // A format whose run may go on in the next chunk is decided then, from the held tail
        // (which is at least as long as any format's span).
        if let Some(hit) = self.tripwire.find_in(&data, self.allowed, false) {
            return Err(hit);
        }
        let keep = data.len().min(hold);
        self.held.extend_from_slice(&data[data.len() - keep..]);
        Ok(data.slice(..data.len() - keep))
    }

    /// The end of the body: decide what was left undecided in the held tail, and release it.
    pub fn finish(&mut self) -> Result<Bytes, Hit> {
        let held = std::mem::take(&mut self.held).freeze();
        match self.tripwire.find_in(&held, self.allowed, true) {
            Some(hit) => Err(hit),
            None => Ok(held),
        }
    }

    /// How many bytes are held back.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Search a complete value outside the stream (a trailer's).
    pub fn find(&self, value: &[u8]) -> Option<Hit> {
        self.tripwire.find(value, self.allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tw(stored: &[(&str, &str)]) -> Arc<Tripwire> {
        Arc::new(Tripwire::new(
            stored
                .iter()
                .map(|(n, v)| (Arc::from(*n), Zeroizing::new(v.as_bytes().to_vec())))
                .collect(),
        ))
    }

    #[tokio::test]
    async fn a_typed_credential_is_searched_for_by_each_secret_value_and_not_its_settings() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::secrets::SecretStore::open_with_key(dir.path(), [7; 32]).unwrap();
        store
            .set(
                "conn",
                crate::secrets::typed::encode(
                    "kind = \"oauth2\"\ntoken_url = \"https://auth.example.test/token\"\n\
                     [secret]\nclient_secret = \"cs-0123456789abcdef\"\n\
                     refresh_token = \"rt-fedcba9876543210\"\n",
                ),
            )
            .unwrap();
        let tw = Tripwire::build(&Secrets::File(Box::new(store)))
            .await
            .unwrap();
        for value in ["cs-0123456789abcdef", "rt-fedcba9876543210"] {
            let hay = format!("{{\"leak\":\"{value}\"}}");
            assert!(
                matches!(tw.find(hay.as_bytes(), None), Some(Hit::Stored(_))),
                "{value} not found"
            );
        }
        // Settings are not secrets: a request may name the token endpoint.
        assert!(tw
            .find(b"see https://auth.example.test/token", None)
            .is_none());
    }

    #[test]
    fn the_shortest_hit_is_still_found_and_shorter_values_are_not_searched() {
        // The shortest format hit: a Slack prefix and its 10-byte minimum run.
        assert_eq!(kind("xoxb-0123456789"), Some(Kind::Slack));
        assert_eq!(kind("xoxb-012345678"), None);
        let tw = Tripwire::new(vec![(
            Arc::from("short"),
            Zeroizing::new(b"abcdefgh-12345678".to_vec()),
        )]);
        assert_eq!(tw.shortest, "xoxb-0123456789".len());
        assert!(matches!(
            tw.find(b"abcdefgh-12345678", None),
            Some(Hit::Stored(_))
        ));
    }

    fn kind(s: &str) -> Option<Kind> {
        match Tripwire::formats_only().find(s.as_bytes(), None) {
            Some(Hit::Format(k)) => Some(k),
            _ => None,
        }
    }

    const A36: &str = "aB3dE5fG7hI9jK1lM2nO4pQ6rS8tU0vW2xYz";

    #[test]
    fn each_format_is_recognised_in_text() {
        assert_eq!(A36.len(), 36);
        for p in ["ghp_", "gho_", "ghu_", "ghs_", "ghr_"] {
            assert_eq!(
                kind(&format!("token={p}{A36}&x")),
                Some(Kind::GitHub),
                "{p}"
            );
        }
        let pat = format!("github_pat_{}", "a_B1".repeat(20) + "zz");
        assert_eq!(kind(&pat), Some(Kind::GitHub));
        let long = "abcDEF123_-".repeat(4);
        assert_eq!(kind(&format!("\"sk-{long}\"")), Some(Kind::OpenAi));
        assert_eq!(kind(&format!("sk-proj-{long}")), Some(Kind::OpenAi));
        assert_eq!(
            kind(&format!("Bearer sk-ant-api03-{long}")),
            Some(Kind::Anthropic)
        );
        assert_eq!(kind("id=AKIAIOSFODNN7EXAMPLE;"), Some(Kind::Aws));
        assert_eq!(kind("ASIAIOSFODNN7EXAMPLE"), Some(Kind::Aws));
        for p in ["xoxa-", "xoxb-", "xoxp-", "xoxr-", "xoxs-"] {
            assert_eq!(
                kind(&format!("{p}1234567890-abc")),
                Some(Kind::Slack),
                "{p}"
            );
        }
        assert_eq!(kind("sk_live_4eC39HqLyjWDarjtT1zdp7dc"), Some(Kind::Stripe));
        assert_eq!(kind("rk_live_4eC39HqLyjWDarjtT1zdp7dc"), Some(Kind::Stripe));
        assert_eq!(
            kind("AIzaSyA1234567890abcdefghijklmnopqrstuv"),
            Some(Kind::Google)
        );
    }

    #[test]
    fn near_misses_are_not_credentials() {
        // One character short, one too many, wrong charset, inside a word, wrong case.
        assert_eq!(kind(&format!("ghp_{}", &A36[1..])), None);
        assert_eq!(kind(&format!("ghp_{A36}x")), None);
        assert_eq!(kind(&format!("ghx_{A36}")), None);
        assert_eq!(kind(&format!("xghp_{A36}")), None);
        assert_eq!(kind("sk-short-key"), None);
        assert_eq!(kind(&format!("risk-{}", "a".repeat(40))), None);
        assert_eq!(kind("AKIAIOSFODNN7EXAMPL"), None);
        assert_eq!(kind("AKIAIOSFODNN7EXAMPLE1"), None);
        assert_eq!(kind("akiaiosfodnn7example"), None);
        assert_eq!(kind("xoxz-1234567890-abc"), None);
        assert_eq!(kind("xoxb-12345"), None);
        assert_eq!(kind("sk_test_4eC39HqLyjWDarjtT1zdp7dc"), None);
        assert_eq!(kind("sk_live_short"), None);
        assert_eq!(kind("the task-skip list has ghp_ and AKIA in prose"), None);
    }

    #[test]
    fn the_routes_own_kind_is_not_flagged_but_others_are() {
        let t = Tripwire::formats_only();
        let gh = format!("Bearer ghp_{A36}");
        assert_eq!(t.find(gh.as_bytes(), Some(Kind::GitHub)), None);
        assert_eq!(
            t.find(gh.as_bytes(), Some(Kind::Stripe)),
            Some(Hit::Format(Kind::GitHub))
        );
        assert_eq!(kind_of(format!("ghp_{A36}").as_bytes()), Some(Kind::GitHub));
        assert_eq!(kind_of(b"plain-old-secret-value"), None);
    }

    #[test]
    fn stored_values_are_found_in_every_encoding_and_named() {
        let t = tw(&[("billing", "s3cr3t/val+ue=42"), ("other", "zzzzzzzzzzzz")]);
        let name = Some(Hit::Stored(Arc::from("billing")));
        assert_eq!(t.find(b"x=s3cr3t/val+ue=42", None), name);
        assert_eq!(t.find(b"x=s3cr3t%2Fval%2Bue%3D42", None), name);
        let b64 = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            "user:s3cr3t/val+ue=42",
        );
        assert_eq!(t.find(format!("Basic {b64}").as_bytes(), None), name);
        assert_eq!(t.find(b"s3cr3t/val+ue=4", None), None);
        // Too short to search for: never matches ordinary text.
        let short = tw(&[("pin", "1234")]);
        assert_eq!(short.find(b"call 1234", None), None);
    }

    fn scan(t: &Arc<Tripwire>, chunks: &[&[u8]]) -> Result<Vec<u8>, Hit> {
        let mut s = BodyScan::new(t.clone(), None);
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&s.push(Bytes::copy_from_slice(c))?);
        }
        out.extend_from_slice(&s.finish()?);
        Ok(out)
    }

    #[test]
    fn body_scan_catches_a_value_split_across_chunks_before_releasing_it() {
        let t = tw(&[("billing", "s3cr3t-value-0042")]);
        let filler = vec![b' '; 4096];
        let mut s = BodyScan::new(t.clone(), None);
        let mut first = filler.clone();
        first.extend_from_slice(b"{\"k\":\"s3cr3t-va");
        let released = s.push(Bytes::from(first)).unwrap();
        // Nothing of the value went on: its start is held.
        assert!(!released.windows(2).any(|w| w == b"s3"));
        let hit = s.push(Bytes::from_static(b"lue-0042\"}")).unwrap_err();
        assert_eq!(hit, Hit::Stored(Arc::from("billing")));
        // Split one byte per chunk.
        let value = b"{\"k\":\"s3cr3t-value-0042\"}";
        let bytes: Vec<&[u8]> = value.chunks(1).collect();
        assert!(scan(&t, &bytes).is_err());
        // A format split across chunks, and one ending exactly at a chunk end.
        let gh = format!("ghp_{A36}");
        let (a, b) = gh.as_bytes().split_at(10);
        assert_eq!(
            scan(&t, &[&filler, a, b]).unwrap_err(),
            Hit::Format(Kind::GitHub)
        );
        assert!(scan(&t, &[&filler, gh.as_bytes(), b"\n"]).is_err());
        assert!(scan(&t, &[gh.as_bytes()]).is_err());
    }

    #[test]
    fn body_scan_passes_similar_text_through_whole_and_in_order() {
        let t = tw(&[("billing", "s3cr3t-value-0042")]);
        let body: Vec<u8> = (0..20_000u32)
            .flat_map(|i| format!("s3cr3t-value-004{} ghp_short ", i % 2).into_bytes())
            .collect();
        // `...0040` and `...0041` only.
        let chunks: Vec<&[u8]> = body.chunks(777).collect();
        assert_eq!(scan(&t, &chunks).unwrap(), body);
        assert_eq!(scan(&t, &[b"", b"tiny", b""]).unwrap(), b"tiny");
    }
}
