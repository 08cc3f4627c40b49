// Shared body of the per-dialect decoder targets (included by each; not a target itself): never panics; whatever
// decodes re-encodes and decodes to the same message; streaming decode agrees with whole decode.
macro_rules! decode_target {
    ($dialect:literal) => {
        use std::sync::OnceLock;

        use bytes::Bytes;
        use libfuzzer_sys::fuzz_target;
        use pingate::iso8583::{Dialect, Dialects};

        static DIALECT: OnceLock<Dialect> = OnceLock::new();

        fuzz_target!(|data: &[u8]| {
            let d = DIALECT.get_or_init(|| Dialects::builtin().get($dialect).unwrap().clone());
            let buf = Bytes::copy_from_slice(data);
            let whole = d.decode(&buf);
            if let Ok(Some((m, used))) = d.decode_streaming(&buf) {
                if used == data.len() {
                    assert_eq!(whole.as_ref().ok(), Some(&m));
                }
            }
            if let Ok(m) = whole {
                let again = d.encode(&m).expect("a decoded message re-encodes");
                assert_eq!(d.decode(&again.freeze()).expect("re-encoded message decodes"), m);
            }
        });
    };
}
