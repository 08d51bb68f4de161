//! TODO(helper): authority
