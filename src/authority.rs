//! `host:port` parsing and normalisation, shared by the CONNECT handler, the `Host` check and
//! the policy's host patterns, so that every layer compares the same canonical text.
//!
//! This module owns the *syntax* of a destination only. It never resolves names and never
//! decides whether an address is allowed (that is policy's and the dialer's job).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest DNS name accepted (RFC 1035, without the trailing dot).
const MAX_NAME_LEN: usize = 253;
/// Longest DNS label accepted (RFC 1035).
const MAX_LABEL_LEN: usize = 63;

/// A normalised `host:port`. host: ASCII lower-case, trailing dot removed, IPv6 literal kept in
/// brackets (`"[::1]"`), IPv4 literal in canonical dotted-quad text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Authority {
    host: Box<str>,
    port: u16,
}

/// Why a `host:port` string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    /// Nothing before the port (or nothing at all).
    #[error("the host is empty")]
    EmptyHost,
    /// `user@host` forms smuggle a second host name past naive checks.
    #[error("the authority contains userinfo ('@'), which is not allowed")]
    Userinfo,
    /// Spaces, tabs or control characters anywhere in the authority.
    #[error("the authority contains whitespace or a control character")]
    Whitespace,
    /// A host name with a character outside `[A-Za-z0-9.-]` (IDN must be given as punycode).
    #[error("the host name contains {0:?}; only ASCII letters, digits, '.' and '-' are allowed (write IDN names as punycode)")]
    InvalidHostChar(char),
    /// `a..b`, or a name starting with a dot.
    #[error("the host name has an empty label")]
    EmptyLabel,
    /// A label longer than 63 characters.
    #[error("a label of the host name is longer than 63 characters")]
    LabelTooLong,
    /// A name longer than 253 characters.
    #[error("the host name is longer than 253 characters")]
    NameTooLong,
    /// A name whose last label is numeric but which is not a canonical IPv4 address
    /// (e.g. `010.0.0.1`, `1.2.3`, `256.0.0.1`): such forms are read differently by
    /// different resolvers, so they are refused.
    #[error("the host looks like an IPv4 address but is not a canonical one")]
    InvalidIpv4,
    /// The text between brackets is not an IPv6 address.
    #[error("the text between '[' and ']' is not an IPv6 address")]
    InvalidIpv6,
    /// An IPv6 address written without brackets, so its colons are ambiguous with the port.
    #[error("an IPv6 address must be written in brackets, e.g. [::1]:443")]
    UnbracketedIpv6,
    /// Stray or nested brackets such as `[[::1]]`.
    #[error("the authority has misplaced brackets")]
    Brackets,
    /// No `:port` and no default port for this context.
    #[error("the port is missing")]
    MissingPort,
    /// Port text that is not plain decimal digits (signs, letters, empty).
    #[error("the port is not a decimal number")]
    InvalidPort,
    /// A port above 65535.
    #[error("the port is larger than 65535")]
    PortOutOfRange,
    /// Port 0 cannot be connected to.
    #[error("port 0 is not allowed")]
    PortZero,
}

impl Authority {
    /// Parse "host:port", "[v6]:port", or "host" alone when `default_port` is `Some`.
    pub fn parse(s: &str, default_port: Option<u16>) -> Result<Authority, AuthorityError> {
        let (host, port) = parse_host_port(s)?;
        let port = match (port, default_port) {
            (Some(p), _) => p,
            (None, Some(0)) => return Err(AuthorityError::PortZero),
            (None, Some(p)) => p,
            (None, None) => return Err(AuthorityError::MissingPort),
        };
        Ok(Authority { host, port })
    }

    /// Whether `text` is exactly this authority's canonical spelling, `host:port`, or `host`
    /// alone when the port is `default_port`: what `parse(text, Some(default_port))` would
    /// find equal to `self`, told without parsing or allocating (the `Host` header of nearly
    /// every request in a tunnel). `false` says nothing: other spellings need [`Self::parse`].
    pub fn is_spelled(&self, text: &str, default_port: u16) -> bool {
        let same = match text.strip_prefix(&*self.host) {
            Some("") => self.port == default_port,
            Some(rest) => rest.strip_prefix(':').is_some_and(|digits| {
                // The canonical digits only: no sign, no leading zero, no empty port.
                !digits.starts_with('0')
                    && digits.len() <= 5
                    && digits.bytes().all(|b| b.is_ascii_digit())
                    && digits.parse::<u16>() == Ok(self.port)
            }),
            None => false,
        };
        debug_assert!(
            !same || Authority::parse(text, Some(default_port)).as_ref() == Ok(self),
            "a canonical spelling parses to its authority"
        );
        same
    }

    /// `host:port`, as [`fmt::Display`] writes it, without the formatting machinery (once per
    /// request, for its audit record).
    pub fn text(&self) -> String {
        let mut text = String::with_capacity(self.host.len() + 6);
        self.push_text(&mut text);
        text
    }

    /// Append `host:port` to `out` (see [`Self::text`]).
    pub fn push_text(&self, out: &mut String) {
        let mut digits = [0u8; 5];
        let mut at = digits.len();
        let mut port = self.port;
        loop {
            at -= 1;
            digits[at] = b'0' + (port % 10) as u8;
            port /= 10;
            if port == 0 {
                break;
            }
        }
        out.push_str(&self.host);
        out.push(':');
        out.push_str(std::str::from_utf8(&digits[at..]).expect("ASCII digits"));
    }

    /// The normalised host (lower-case name, canonical IPv4, or bracketed IPv6).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The IP if host is an IP literal (v4 or bracketed v6).
    pub fn ip(&self) -> Option<IpAddr> {
        if let Some(inner) = self
            .host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
        {
            return inner.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
        }
        // Names never end in a numeric label (see `normalize_name`), so only IPv4 parses.
        self.host.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// `raw` with any userinfo (`user:password@`) removed: everything up to the last `@`.
///
/// SECURITY: agents put their latchkey token in URL userinfo (`http://agent:TOKEN@host/`,
/// `CONNECT agent:TOKEN@host:443`). Such a target is refused, but what is logged about it must
/// not carry the token: a raw authority goes into a log line only through this function.
pub fn without_userinfo(raw: &str) -> &str {
    raw.rsplit_once('@').map_or(raw, |(_, host)| host)
}

/// Split and normalise `host[:port]`; the port is `None` when absent. Shared with the policy's
/// host patterns so that a pattern and a request authority normalise identically.
pub(crate) fn parse_host_port(s: &str) -> Result<(Box<str>, Option<u16>), AuthorityError> {
    if s.is_empty() {
        return Err(AuthorityError::EmptyHost);
    }
    // SECURITY: refuse whitespace and controls before anything else, so that "a.com :80" or
    // "a.com\r\n" can never be trimmed into something a later layer reads differently.
    if s.bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(AuthorityError::Whitespace);
    }
    // SECURITY: `allowed.com@evil.com` is a classic allow-list bypass.
    if s.contains('@') {
        return Err(AuthorityError::Userinfo);
    }
    if let Some(rest) = s.strip_prefix('[') {
        let close = rest.find(']').ok_or(AuthorityError::Brackets)?;
        let inner = &rest[..close];
        let after = &rest[close + 1..];
        if inner.contains('[') || inner.contains(']') || after.contains(['[', ']']) {
            return Err(AuthorityError::Brackets);
        }
        if inner.is_empty() {
            return Err(AuthorityError::EmptyHost);
        }
        // std refuses zone ids ("%25eth0") and anything that is not an address.
        let ip: Ipv6Addr = inner.parse().map_err(|_| AuthorityError::InvalidIpv6)?;
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(p) => Some(parse_port(p)?),
                None => return Err(AuthorityError::Brackets),
            },
        };
        return Ok((format!("[{ip}]").into_boxed_str(), port));
    }
    if s.contains(['[', ']']) {
        return Err(AuthorityError::Brackets);
    }
    let (host, port) = match s.matches(':').count() {
        0 => (s, None),
        1 => {
            let (h, p) = s.split_once(':').ok_or(AuthorityError::InvalidPort)?;
            (h, Some(parse_port(p)?))
        }
        _ => return Err(AuthorityError::UnbracketedIpv6),
    };
    Ok((normalize_name(host)?, port))
}

/// Decimal digits only (no sign, no spaces), 1..=65535.
fn parse_port(p: &str) -> Result<u16, AuthorityError> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AuthorityError::InvalidPort);
    }
    // Leading zeros are harmless for a port, but bound the length so the parse cannot overflow.
    let digits = p.trim_start_matches('0');
    if digits.len() > 5 {
        return Err(AuthorityError::PortOutOfRange);
    }
    let n: u32 = if digits.is_empty() {
        0
    } else {
        digits.parse().map_err(|_| AuthorityError::InvalidPort)?
    };
    match n {
        0 => Err(AuthorityError::PortZero),
        1..=65535 => u16::try_from(n).map_err(|_| AuthorityError::PortOutOfRange),
        _ => Err(AuthorityError::PortOutOfRange),
    }
}

/// Lower-case a DNS name or canonicalise an IPv4 literal.
fn normalize_name(host: &str) -> Result<Box<str>, AuthorityError> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return Err(AuthorityError::EmptyHost);
    }
    if let Some(c) = host
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '.' || *c == '-'))
    {
        return Err(AuthorityError::InvalidHostChar(c));
    }
    if host.len() > MAX_NAME_LEN {
        return Err(AuthorityError::NameTooLong);
    }
    for label in host.split('.') {
        if label.is_empty() {
            return Err(AuthorityError::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(AuthorityError::LabelTooLong);
        }
    }
    // SECURITY: a name whose last label is all digits is read as an IPv4 address by resolvers,
    // often in inet_aton's lenient forms (octal "010", "127.1", "0x7f.1"). Only the canonical
    // dotted quad that std accepts is let through, so "10.0.0.1" and "010.0.0.1" cannot be two
    // different policy keys for what may be one address.
    let last = host.rsplit('.').next().unwrap_or(host);
    if last.bytes().all(|b| b.is_ascii_digit()) {
        let ip: Ipv4Addr = host.parse().map_err(|_| AuthorityError::InvalidIpv4)?;
        return Ok(ip.to_string().into_boxed_str());
    }
    Ok(host.to_ascii_lowercase().into_boxed_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use AuthorityError as E;

    #[test]
    fn a_canonical_spelling_is_told_without_parsing_and_nothing_else_is() {
        let cases = [
            ("api.example.com:443", 443, "api.example.com", true),
            ("api.example.com:443", 443, "api.example.com:443", true),
            ("api.example.com:8443", 443, "api.example.com:8443", true),
            ("api.example.com:8443", 443, "api.example.com", false),
            ("api.example.com:443", 80, "api.example.com", false),
            ("10.0.0.1:443", 443, "10.0.0.1", true),
            ("[::1]:443", 443, "[::1]:443", true),
            ("[::1]:443", 443, "[::1]", true),
            // Spellings that may still match, but only through the parser:
            ("api.example.com:443", 443, "API.example.com", false),
            ("api.example.com:443", 443, "api.example.com.", false),
            ("api.example.com:443", 443, "api.example.com:0443", false),
            ("[::1]:443", 443, "[0::1]:443", false),
            // Never a match:
            ("api.example.com:443", 443, "api.example.com:", false),
            ("api.example.com:443", 443, "api.example.com:+443", false),
            ("api.example.com:443", 443, "api.example.com:443:443", false),
            ("api.example.com:443", 443, "api.example.com:65979", false),
            ("api.example.com:443", 443, "api.example.com.evil", false),
            (
                "api.example.com:443",
                443,
                "api.example.com@evil:443",
                false,
            ),
            ("api.example.com:443", 443, "api.example.co", false),
            ("api.example.com:443", 443, "", false),
            ("a.example:1", 443, "a.example:1", true),
            ("a.example:65535", 443, "a.example:65535", true),
        ];
        for (bound, default_port, text, spelled) in cases {
            let bound = Authority::parse(bound, None).unwrap();
            assert_eq!(bound.text(), bound.to_string());
            assert_eq!(
                bound.is_spelled(text, default_port),
                spelled,
                "{bound} {text:?}"
            );
            if spelled {
                assert_eq!(Authority::parse(text, Some(default_port)), Ok(bound));
            }
        }
    }

    #[test]
    fn authority_table() {
        let ok: &[(&str, Option<u16>, &str, u16)] = &[
            ("api.github.com:443", None, "api.github.com", 443),
            ("API.GitHub.COM:443", None, "api.github.com", 443),
            ("api.github.com.:443", None, "api.github.com", 443),
            ("api.github.com", Some(443), "api.github.com", 443),
            ("api.github.com.", Some(80), "api.github.com", 80),
            ("localhost:8080", None, "localhost", 8080),
            ("a-b.c-d.example:1", None, "a-b.c-d.example", 1),
            (
                "xn--bcher-kva.example:443",
                None,
                "xn--bcher-kva.example",
                443,
            ),
            ("127.0.0.1:80", None, "127.0.0.1", 80),
            ("10.0.0.1", Some(443), "10.0.0.1", 443),
            ("[::1]:443", None, "[::1]", 443),
            ("[::1]", Some(443), "[::1]", 443),
            ("[0:0:0:0:0:0:0:1]:8443", None, "[::1]", 8443),
            ("[2001:DB8::A]:443", None, "[2001:db8::a]", 443),
            ("host:65535", None, "host", 65535),
            ("host:0080", None, "host", 80),
            ("h:443", Some(80), "h", 443),
            (&"a".repeat(63), Some(1), &"a".repeat(63), 1),
        ];
        for (input, default, host, port) in ok {
            let a = Authority::parse(input, *default)
                .unwrap_or_else(|e| panic!("{input:?} should parse: {e}"));
            assert_eq!(a.host(), *host, "{input:?}");
            assert_eq!(a.port(), *port, "{input:?}");
        }

        let long_label = format!("{}.com:443", "a".repeat(64));
        let long_name = format!("{}.com:443", ["abcdefghi"; 26].join("."));
        let bad: &[(&str, Option<u16>, E)] = &[
            ("", Some(443), E::EmptyHost),
            (":443", None, E::EmptyHost),
            (".:443", None, E::EmptyHost),
            ("user@host:443", None, E::Userinfo),
            ("a.com@evil.com", Some(443), E::Userinfo),
            ("ex ample.com:443", None, E::Whitespace),
            ("example.com :443", None, E::Whitespace),
            ("example.com:443\n", None, E::Whitespace),
            ("\texample.com", Some(443), E::Whitespace),
            ("exa_mple.com:443", None, E::InvalidHostChar('_')),
            ("bücher.example:443", None, E::InvalidHostChar('ü')),
            ("a/b:443", None, E::InvalidHostChar('/')),
            ("a..b:443", None, E::EmptyLabel),
            (".a.com:443", None, E::EmptyLabel),
            ("a.com..", Some(443), E::EmptyLabel),
            (&long_label, None, E::LabelTooLong),
            (&long_name, None, E::NameTooLong),
            ("example.com", None, E::MissingPort),
            ("[::1]", None, E::MissingPort),
            ("example.com:", None, E::InvalidPort),
            ("example.com:0", None, E::PortZero),
            ("example.com", Some(0), E::PortZero),
            ("example.com:65536", None, E::PortOutOfRange),
            ("example.com:99999999999", None, E::PortOutOfRange),
            ("example.com:+443", None, E::InvalidPort),
            ("example.com:-443", None, E::InvalidPort),
            ("example.com:44a", None, E::InvalidPort),
            ("example.com:0x1bb", None, E::InvalidPort),
            ("[[::1]]:443", None, E::Brackets),
            ("[::1]]:443", None, E::Brackets),
            ("[::1:443", None, E::Brackets),
            ("[::1]x:443", None, E::Brackets),
            ("a]b:443", None, E::Brackets),
            ("[]:443", None, E::EmptyHost),
            ("[example.com]:443", None, E::InvalidIpv6),
            ("[127.0.0.1]:443", None, E::InvalidIpv6),
            ("[fe80::1%25eth0]:443", None, E::InvalidIpv6),
            ("::1", Some(443), E::UnbracketedIpv6),
            ("2001:db8::1:443", None, E::UnbracketedIpv6),
            ("010.0.0.1:80", None, E::InvalidIpv4),
            ("127.1:80", None, E::InvalidIpv4),
            ("256.0.0.1:80", None, E::InvalidIpv4),
            ("1.2.3.4.5:80", None, E::InvalidIpv4),
            ("0x7f.0.0.1:80", None, E::InvalidIpv4),
            ("example.123:80", None, E::InvalidIpv4),
        ];
        for (input, default, want) in bad {
            assert_eq!(
                Authority::parse(input, *default).as_ref().err(),
                Some(want),
                "{input:?}"
            );
        }
    }

    #[test]
    fn userinfo_is_removed_up_to_the_last_at_sign() {
        assert_eq!(without_userinfo("agent:TOKEN@host:443"), "host:443");
        assert_eq!(without_userinfo("a@b:c@host"), "host");
        assert_eq!(without_userinfo("TOKEN@"), "");
        assert_eq!(without_userinfo("host:443"), "host:443");
        assert_eq!(without_userinfo(""), "");
    }

    #[test]
    fn display_is_host_colon_port() {
        let a = Authority::parse("API.example.com.", Some(443)).expect("valid");
        assert_eq!(a.to_string(), "api.example.com:443");
        let v6 = Authority::parse("[::1]:8443", None).expect("valid");
        assert_eq!(v6.to_string(), "[::1]:8443");
    }

    #[test]
    fn ip_is_reported_only_for_literals() {
        let v4 = Authority::parse("127.0.0.1:80", None).expect("valid");
        assert_eq!(v4.ip(), Some("127.0.0.1".parse().expect("ip")));
        let v6 = Authority::parse("[::1]:80", None).expect("valid");
        assert_eq!(v6.ip(), Some("::1".parse().expect("ip")));
        let name = Authority::parse("example.com:80", None).expect("valid");
        assert_eq!(name.ip(), None);
    }

    #[test]
    fn equal_authorities_compare_equal_after_normalisation() {
        let a = Authority::parse("Example.COM.", Some(443)).expect("valid");
        let b = Authority::parse("example.com:443", None).expect("valid");
        assert_eq!(a, b);
    }
}
