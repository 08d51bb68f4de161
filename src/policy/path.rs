//! Request path normalisation: the single place that turns what the agent sent into the form
//! that policy matches on and that is forwarded upstream.
//!
//! SECURITY: path-based authorisation is only as good as its agreement with the upstream's own
//! reading of the path (Envoy CVE-2021-29492 and CVE-2019-9901, Istio CVE-2021-31920). So the
//! forms that upstreams read in different ways (encoded `/` or `\`, NUL, `..;`, dot segments
//! above the root) are refused outright, and everything else is brought into one canonical
//! form, which the proxy must then forward byte for byte.

use std::borrow::Cow;

use crate::deny::BadPath;

/// Normalise a request path (without its query string).
///
/// Decodes `%XX` escapes of unreserved characters, upper-cases the hex of the others, merges
/// duplicate slashes and resolves `.` and `..` segments, keeping a trailing slash. Returns
/// `Cow::Borrowed` when `raw` is already normal, which is the common case and allocates nothing.
/// The result is a fixed point: normalising it again returns it unchanged.
pub fn normalize(raw: &str) -> Result<Cow<'_, str>, BadPath> {
    if !raw.starts_with('/') {
        return Err(BadPath::NotAbsolute);
    }
    if is_normal(raw) {
        return Ok(Cow::Borrowed(raw));
    }
    normalize_slow(raw).map(Cow::Owned)
}

/// True when `raw` (which starts with '/') is exactly what `normalize_slow` would return.
/// Conservative: when in doubt it answers false and the slow path decides. One pass over the
/// bytes, no allocation: this is the per-request common case.
fn is_normal(raw: &str) -> bool {
    let b = raw.as_bytes();
    let n = b.len();
    let mut seg_start = 1;
    let mut i = 1;
    while i <= n {
        if i == n || b[i] == b'/' {
            let seg = &b[seg_start..i];
            // An empty segment is only normal as the trailing slash (or the root "/").
            if (seg.is_empty() && i != n) || seg == b"." || seg == b".." || seg.starts_with(b"..;")
            {
                return false;
            }
            i += 1;
            seg_start = i;
            continue;
        }
        match b[i] {
            b'%' => {
                let (Some(&h), Some(&l)) = (b.get(i + 1), b.get(i + 2)) else {
                    return false;
                };
                if !(is_upper_hex(h) && is_upper_hex(l)) {
                    return false;
                }
                let v = (hex_val(h) << 4) | hex_val(l);
                if is_unreserved(v) || matches!(v, b'/' | b'\\' | 0) {
                    return false;
                }
                i += 3;
            }
            c if !is_allowed_raw(c) => return false,
            _ => i += 1,
        }
    }
    true
}

/// The full normalisation, allocating the result.
fn normalize_slow(raw: &str) -> Result<String, BadPath> {
    let rest = &raw[1..];
    let mut out = String::with_capacity(raw.len());
    // Start offsets (in `out`) of the segments kept so far, so `..` can pop one.
    let mut starts: Vec<usize> = Vec::new();
    let mut seg = String::new();
    let mut trailing_slash = false;
    let mut segments = rest.split('/').peekable();
    while let Some(raw_seg) = segments.next() {
        let is_last = segments.peek().is_none();
        decode_segment(raw_seg, &mut seg)?;
        // SECURITY: Tomcat and other servlet containers read "..;x" as "..", so a policy that
        // allowed "/public/..;/admin" would really grant "/admin".
        if seg.starts_with("..;") {
            return Err(BadPath::DotDotSemicolon);
        }
        match seg.as_str() {
            "" | "." => trailing_slash = is_last,
            ".." => {
                // SECURITY: refusing (rather than clamping at the root as RFC 3986 does) keeps
                // an agent from probing how each upstream treats "/../".
                let start = starts.pop().ok_or(BadPath::AboveRoot)?;
                out.truncate(start);
                trailing_slash = is_last;
            }
            _ => {
                starts.push(out.len());
                out.push('/');
                out.push_str(&seg);
                trailing_slash = false;
            }
        }
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(out)
}

/// Decode one raw segment into `out` (cleared first): unreserved escapes become literal
/// characters, other escapes keep upper-case hex, forbidden bytes are refused.
fn decode_segment(raw: &str, out: &mut String) -> Result<(), BadPath> {
    out.clear();
    let b = raw.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'%' => {
                let (Some(&h), Some(&l)) = (b.get(i + 1), b.get(i + 2)) else {
                    return Err(BadPath::InvalidEscape);
                };
                if !(h.is_ascii_hexdigit() && l.is_ascii_hexdigit()) {
                    return Err(BadPath::InvalidEscape);
                }
                let v = (hex_val(h) << 4) | hex_val(l);
                match v {
                    // SECURITY: an encoded separator makes one segment here and two upstream.
                    b'/' => return Err(BadPath::EncodedSlash),
                    b'\\' => return Err(BadPath::Backslash),
                    0 => return Err(BadPath::Nul),
                    v if is_unreserved(v) => out.push(char::from(v)),
                    v => {
                        out.push('%');
                        out.push(char::from(HEX_UPPER[usize::from(v >> 4)]));
                        out.push(char::from(HEX_UPPER[usize::from(v & 0x0f)]));
                    }
                }
                i += 3;
            }
            0 => return Err(BadPath::Nul),
            b'\\' => return Err(BadPath::Backslash),
            c if !is_allowed_raw(c) => return Err(BadPath::InvalidChar),
            c => {
                out.push(char::from(c));
                i += 1;
            }
        }
    }
    Ok(())
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// Printable ASCII other than space, '%' (handled apart), '\\' and the delimiters that cannot
/// be part of a path ('?' starts the query, '#' a fragment).
fn is_allowed_raw(c: u8) -> bool {
    c.is_ascii_graphic() && !matches!(c, b'\\' | b'?' | b'#')
}

/// RFC 3986 unreserved: ALPHA / DIGIT / "-" / "." / "_" / "~".
fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

fn is_upper_hex(c: u8) -> bool {
    c.is_ascii_digit() || (b'A'..=b'F').contains(&c)
}

/// Value of an ASCII hex digit; callers check `is_ascii_hexdigit` first.
fn hex_val(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BadPath as B;

    /// (input, expected normal form or error).
    fn table() -> Vec<(&'static str, Result<&'static str, BadPath>)> {
        vec![
            // Already normal.
            ("/", Ok("/")),
            ("/a", Ok("/a")),
            ("/a/", Ok("/a/")),
            (
                "/repos/acme/backend/issues",
                Ok("/repos/acme/backend/issues"),
            ),
            ("/a/b:c@d!$&'()*+,;=", Ok("/a/b:c@d!$&'()*+,;=")),
            ("/a%20b", Ok("/a%20b")),
            ("/caf%C3%A9", Ok("/caf%C3%A9")),
            ("/a/..b/c..", Ok("/a/..b/c..")),
            ("/a/...", Ok("/a/...")),
            ("/a;..;/b", Ok("/a;..;/b")),
            // Dot segments.
            ("/a/./b", Ok("/a/b")),
            ("/a/b/..", Ok("/a/")),
            ("/a/b/../", Ok("/a/")),
            ("/a/.", Ok("/a/")),
            ("/a/..", Ok("/")),
            ("/.", Ok("/")),
            ("/a/b/../../c", Ok("/c")),
            ("/a/%2e%2e/b", Ok("/b")),
            ("/a/%2E%2e/", Ok("/")),
            ("/a/.%2E/b", Ok("/b")),
            ("/a/%2e/b", Ok("/a/b")),
            // Duplicate slashes.
            ("//a//b", Ok("/a/b")),
            ("//", Ok("/")),
            ("/a//", Ok("/a/")),
            ("///a///b///", Ok("/a/b/")),
            ("//a/..//b", Ok("/b")),
            // Escapes.
            ("/%7euser", Ok("/~user")),
            ("/%7Euser", Ok("/~user")),
            ("/%41%62%2D%5f", Ok("/Ab-_")),
            ("/a%3ab", Ok("/a%3Ab")),
            ("/a%3Ab", Ok("/a%3Ab")),
            ("/caf%c3%a9", Ok("/caf%C3%A9")),
            ("/a%2520", Ok("/a%2520")),
            ("/a%0a", Ok("/a%0A")),
            // Refused.
            ("", Err(B::NotAbsolute)),
            ("a/b", Err(B::NotAbsolute)),
            ("*", Err(B::NotAbsolute)),
            ("/a/..%2fb", Err(B::EncodedSlash)),
            ("/a%2Fb", Err(B::EncodedSlash)),
            ("/a%5cb", Err(B::Backslash)),
            ("/a%5Cb", Err(B::Backslash)),
            ("/a\\b", Err(B::Backslash)),
            ("/a%00", Err(B::Nul)),
            ("/a\0b", Err(B::Nul)),
            ("/a%", Err(B::InvalidEscape)),
            ("/a%4", Err(B::InvalidEscape)),
            ("/a%z1", Err(B::InvalidEscape)),
            ("/a%%41", Err(B::InvalidEscape)),
            ("/..", Err(B::AboveRoot)),
            ("/./../x", Err(B::AboveRoot)),
            ("/a/../../x", Err(B::AboveRoot)),
            ("/%2e%2e/x", Err(B::AboveRoot)),
            ("//..//x", Err(B::AboveRoot)),
            ("/a/..;/b", Err(B::DotDotSemicolon)),
            ("/a/..;x/b", Err(B::DotDotSemicolon)),
            ("/a/%2e%2e;/b", Err(B::DotDotSemicolon)),
            ("/a/.%2e;/b", Err(B::DotDotSemicolon)),
            ("/a b", Err(B::InvalidChar)),
            ("/a\tb", Err(B::InvalidChar)),
            ("/a\x7f", Err(B::InvalidChar)),
            ("/café", Err(B::InvalidChar)),
            ("/a?b", Err(B::InvalidChar)),
            ("/a#b", Err(B::InvalidChar)),
        ]
    }

    #[test]
    fn normalisation_table() {
        for (input, want) in table() {
            let got = normalize(input);
            assert_eq!(got.as_deref().map_err(|e| *e), want, "normalize({input:?})");
        }
    }

    #[test]
    fn normal_paths_are_borrowed_and_others_owned() {
        for (input, want) in table() {
            if let (Ok(got), Ok(want)) = (normalize(input), want) {
                let borrowed = matches!(got, Cow::Borrowed(_));
                assert_eq!(borrowed, input == want, "{input:?}");
            }
        }
    }

    #[test]
    fn random_paths_normalise_to_safe_fixed_points() {
        // A small deterministic generator over the bytes that matter for dot segments and
        // escapes; no external crate needed and failures are reproducible.
        const ALPHABET: &[u8] = b"/./%2eEfF5cC;~7a0A/%";
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..50_000 {
            let len = usize::try_from(next() % 14).expect("small");
            let mut s = String::from("/");
            for _ in 0..len {
                let i = usize::try_from(next() % ALPHABET.len() as u64).expect("small");
                s.push(char::from(ALPHABET[i]));
            }
            let slow = normalize_slow(&s);
            assert_eq!(is_normal(&s), slow.as_deref() == Ok(s.as_str()), "{s:?}");
            if let Ok(n) = normalize(&s) {
                assert!(
                    matches!(normalize(&n), Ok(Cow::Borrowed(m)) if m == n),
                    "{s:?}"
                );
                assert!(n.starts_with('/'), "{s:?}");
                assert!(!n.contains("//"), "{s:?} -> {n:?}");
                for seg in n.split('/') {
                    assert!(
                        seg != "." && seg != ".." && !seg.starts_with("..;"),
                        "{s:?}"
                    );
                }
                let upper = n.to_ascii_uppercase();
                assert!(!upper.contains("%2F") && !upper.contains("%5C"), "{s:?}");
            }
        }
    }

    #[test]
    fn normalisation_is_idempotent() {
        let mut inputs: Vec<String> = table().iter().map(|(i, _)| i.to_string()).collect();
        // Cross every pair of table entries to build a larger, messier set.
        let base = inputs.clone();
        for a in &base {
            for b in &base {
                inputs.push(format!("{a}{b}"));
                inputs.push(format!("{a}/{}", b.trim_start_matches('/')));
            }
        }
        for input in &inputs {
            if let Ok(once) = normalize(input) {
                let twice = normalize(&once)
                    .unwrap_or_else(|e| panic!("normal form of {input:?} refused: {e}"));
                assert_eq!(twice, once, "not idempotent for {input:?}");
                assert!(matches!(twice, Cow::Borrowed(_)), "{input:?}");
                // The fast check agrees with the slow path on every input.
                assert_eq!(
                    is_normal(input),
                    normalize_slow(input).as_deref() == Ok(input.as_str()),
                    "fast path disagrees on {input:?}"
                );
            }
        }
    }
}
