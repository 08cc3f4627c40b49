//! Fuzz target: the `iso87-ebcdic` decoder (see decode_common.rs).
#![no_main]

include!("decode_common.rs");
decode_target!("iso87-ebcdic");
