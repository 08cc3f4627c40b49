//! Fuzz target: the `iso87-ascii-binbitmap` decoder (see decode_common.rs).
#![no_main]

include!("decode_common.rs");
decode_target!("iso87-ascii-binbitmap");
