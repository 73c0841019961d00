//! Shared test helpers.
#![allow(dead_code)]

use std::path::PathBuf;

pub use dsel_testkit::data_root;

/// The test fixtures directory.
pub fn fixtures() -> PathBuf {
    dsel_testkit::fixtures("ingest")
}
