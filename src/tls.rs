//! TODO(helper): tls
