//! TODO(helper): secrets
