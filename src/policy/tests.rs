//! Tests for policy loading, validation and matching.
use super::*;
