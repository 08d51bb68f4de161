//! The stored form of a credential that is more than one value (an OAuth client and its
//! refresh token, an AWS key pair, a GitHub App key): a TOML document that starts with the line
//! [`TYPED_MAGIC`], names its `kind`, keeps its non-secret settings at the top level and every
//! secret value under `[secret]`:
//!
//! ```toml
//! #latchkey-credential v1
//! kind = "oauth2"
//! token_url = "https://auth.example.com/token"
//! client_id = "latchkey"
//!
//! [secret]
//! client_secret = "..."
//! refresh_token = "..."
//! ```
//!
//! It is kept in the same encrypted backends as a static value (the file store, OpenBao), so
//! custody does not depend on the kind. A static credential is its raw value; `secret set`
//! refuses a raw value that starts with the magic line, so the two forms can never be confused.
//!
//! This module knows the envelope, not the kinds: it can say which values are secret (for the
//! exfiltration tripwire) without knowing what they mean. It never puts a value into an error.

use toml::Table;
use zeroize::Zeroizing;

use super::Secret;

/// First line of every typed credential document.
pub const TYPED_MAGIC: &str = "#latchkey-credential v1\n";

/// The name of the table that holds a typed credential's secret values.
pub const SECRET_TABLE: &str = "secret";

/// A stored credential, as its bytes say.
pub enum Stored<'a> {
    /// A single value, injected as the route says.
    Static(&'a [u8]),
    /// A typed document (the text after the magic line).
    Typed(TypedDoc),
}

/// A parsed typed document. The parsed table holds secret strings, so it is wiped by
/// overwriting each string before the table is dropped.
pub struct TypedDoc {
    /// The `kind` key.
    pub kind: String,
    /// The whole document, `kind` and `[secret]` included.
    pub table: Table,
}

impl std::fmt::Debug for TypedDoc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TypedDoc({}, [redacted])", self.kind)
    }
}

impl Drop for TypedDoc {
    fn drop(&mut self) {
        wipe(&mut self.table);
    }
}

fn wipe(table: &mut Table) {
    use zeroize::Zeroize;
    for (_, value) in table.iter_mut() {
        match value {
            toml::Value::String(s) => s.zeroize(),
            toml::Value::Table(t) => wipe(t),
            toml::Value::Array(items) => {
                for item in items.iter_mut() {
                    if let toml::Value::String(s) = item {
                        s.zeroize();
                    }
                }
            }
            _ => {}
        }
    }
}

impl TypedDoc {
    /// Refuse a top-level key that is neither `[secret]` nor in `settings` (whose first entry
    /// is `kind`): a misspelt setting must not silently fall back to a default. The error
    /// names the key and the known settings, never a value.
    pub fn only_settings(&self, settings: &[&str]) -> Result<(), String> {
        for key in self.table.keys() {
            if key != SECRET_TABLE && !settings.contains(&key.as_str()) {
                return Err(format!(
                    "unknown setting {key:?} (known: {})",
                    settings[1..].join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// Why a stored typed document cannot be read. Never holds a value: TOML's own error
/// message quotes the input, so only its position is kept.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TypedError {
    /// Not UTF-8, or not TOML.
    #[error("the credential document is not valid TOML (line {line})")]
    NotToml {
        /// 1-based line of the error (after the magic line), 0 when unknown.
        line: usize,
    },
    /// No `kind = "..."` key.
    #[error("the credential document has no `kind`")]
    NoKind,
}

/// Read what a stored value is.
pub fn parse(secret: &Secret) -> Result<Stored<'_>, TypedError> {
    let bytes = secret.expose();
    let Some(rest) = bytes.strip_prefix(TYPED_MAGIC.as_bytes()) else {
        return Ok(Stored::Static(bytes));
    };
    let text = std::str::from_utf8(rest).map_err(|_| TypedError::NotToml { line: 0 })?;
    parse_text(text).map(Stored::Typed)
}

/// Parse a typed document's text (without the magic line), as `secret set --kind` reads it.
pub fn parse_text(text: &str) -> Result<TypedDoc, TypedError> {
    let table: Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e.span().map_or(0, |s| {
            text[..s.start.min(text.len())].lines().count().max(1)
        });
        TypedError::NotToml { line }
    })?;
    let mut doc = TypedDoc {
        kind: String::new(),
        table,
    };
    match doc.table.get("kind") {
        Some(toml::Value::String(k)) => doc.kind = k.clone(),
        _ => return Err(TypedError::NoKind),
    }
    Ok(doc)
}

/// The stored bytes of a typed document whose text is `text` (as `secret set --kind` writes
/// it): the magic line, then the text.
pub fn encode(text: &str) -> Secret {
    let mut bytes = Vec::with_capacity(TYPED_MAGIC.len() + text.len());
    bytes.extend_from_slice(TYPED_MAGIC.as_bytes());
    bytes.extend_from_slice(text.as_bytes());
    Secret::new(bytes)
}

/// Every value that must never leave latchkey: the whole value of a static credential, each
/// string under `[secret]` of a typed one (nested arrays and tables included). A document
/// that cannot be parsed yields its raw bytes, so the tripwire still searches for something.
pub fn secret_values(secret: &Secret) -> Vec<Zeroizing<Vec<u8>>> {
    match parse(secret) {
        Ok(Stored::Static(v)) => vec![Zeroizing::new(v.to_vec())],
        Ok(Stored::Typed(doc)) => {
            let mut out = Vec::new();
            if let Some(toml::Value::Table(t)) = doc.table.get(SECRET_TABLE) {
                collect(t, &mut out);
            }
            out
        }
        Err(_) => vec![Zeroizing::new(secret.expose().to_vec())],
    }
}

fn collect(table: &Table, out: &mut Vec<Zeroizing<Vec<u8>>>) {
    for value in table.values() {
        match value {
            toml::Value::String(s) if !s.is_empty() => {
                out.push(Zeroizing::new(s.as_bytes().to_vec()));
            }
            toml::Value::Table(t) => collect(t, out),
            toml::Value::Array(items) => {
                for item in items {
                    if let toml::Value::String(s) = item {
                        out.push(Zeroizing::new(s.as_bytes().to_vec()));
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "kind = \"oauth2\"\ntoken_url = \"https://auth.example.test/token\"\n\n[secret]\nclient_secret = \"cs-123456789\"\nrefresh_token = \"rt-abcdefgh\"\n";

    #[test]
    fn a_raw_value_is_static_and_a_magic_document_is_typed() {
        let raw = Secret::new(b"plain-value".to_vec());
        assert!(matches!(parse(&raw), Ok(Stored::Static(b"plain-value"))));
        let typed = encode(DOC);
        match parse(&typed) {
            Ok(Stored::Typed(doc)) => {
                assert_eq!(doc.kind, "oauth2");
                assert_eq!(
                    doc.table["token_url"].as_str(),
                    Some("https://auth.example.test/token")
                );
            }
            _ => panic!("typed document not recognised"),
        }
    }

    #[test]
    fn secret_values_are_the_secret_table_only() {
        let values = secret_values(&encode(DOC));
        let mut got: Vec<&[u8]> = values.iter().map(|v| &v[..]).collect();
        got.sort();
        assert_eq!(got, vec![&b"cs-123456789"[..], &b"rt-abcdefgh"[..]]);
        let raw = secret_values(&Secret::new(b"v".to_vec()));
        assert_eq!(&raw[0][..], b"v");
    }

    #[test]
    fn a_broken_document_says_where_and_never_what() {
        let err =
            parse_text("kind = \"oauth2\"\n[secret]\nclient_secret = \"sekrit-value").unwrap_err();
        assert!(matches!(err, TypedError::NotToml { line: 3 }), "{err:?}");
        assert!(!err.to_string().contains("sekrit"));
        assert_eq!(
            parse_text("token_url = \"x\"").unwrap_err(),
            TypedError::NoKind
        );
        // Unparseable stored bytes still give the tripwire something to look for.
        let broken = encode("not = [toml");
        assert_eq!(secret_values(&broken).len(), 1);
    }

    #[test]
    fn debug_never_prints_values() {
        let doc = parse_text(DOC).unwrap();
        let shown = format!("{doc:?}");
        assert!(!shown.contains("cs-123"), "{shown}");
        assert!(shown.contains("oauth2"));
    }
}
