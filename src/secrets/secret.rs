//! The [`Secret`] value type: bytes that are zeroized on drop and never printed.
//!
//! It deliberately implements neither `Clone` nor `Serialize`: the only way to read the bytes
//! is the explicit [`Secret::expose`], which makes every use greppable.

use std::fmt;

use zeroize::Zeroizing;

/// A secret value: zeroized on drop; `Debug` and `Display` print `[redacted]`.
///
/// There is no `Clone`; share it behind an `Arc` and read it through [`Secret::expose`].
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// Wraps `bytes`; the buffer (including its spare capacity) is zeroized when dropped.
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(Zeroizing::new(bytes))
    }

    /// The raw bytes. Every call site is a place where the value leaves this type: keep it
    /// out of logs, errors and audit events.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Length of the value in bytes (not secret: it is also visible in the encrypted file size).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SECURITY: never print the bytes, not even a prefix or a hash.
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SECURITY: `{}` in a format string must not leak the value either.
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_print_redacted() {
        let s = Secret::new(b"hunter2-very-secret".to_vec());
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(format!("{s:#?}"), "[redacted]");
    }

    #[test]
    fn expose_returns_the_bytes() {
        let s = Secret::new(b"abc".to_vec());
        assert_eq!(s.expose(), b"abc");
        assert_eq!(s.len(), 3);
        assert!(!s.is_empty());
        assert!(Secret::new(Vec::new()).is_empty());
    }
}
