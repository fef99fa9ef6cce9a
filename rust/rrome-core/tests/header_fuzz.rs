//! Property tests of the safetensors header parser: it never panics, and whatever it accepts
//! satisfies the invariants the writer relies on (tensors tile the data section exactly).

use proptest::prelude::*;
use rrome_core::safetensors_header::parse;

fn check_invariants(json: &[u8], data_len: u64) {
    if let Ok(h) = parse(json, data_len) {
        let mut end = 0u64;
        for t in &h.tensors {
            assert_eq!(t.begin, end);
            let numel: u64 = t.shape.iter().map(|&d| d as u64).product();
            assert_eq!(t.end - t.begin, numel * t.dtype.size() as u64);
            end = t.end;
        }
        assert_eq!(end, data_len);
    }
}

fn entry() -> impl Strategy<Value = String> {
    let dtype = prop_oneof![Just("F32"), Just("BF16"), Just("F16"), Just("U8"), Just("I64"), Just("F99"), Just("")];
    ("[a-z.]{0,6}", dtype, prop::collection::vec(0u64..5, 0..3), 0u64..40, 0u64..40).prop_map(
        |(name, dt, shape, b, e)| format!(r#""{name}":{{"dtype":"{dt}","shape":{shape:?},"data_offsets":[{b},{e}]}}"#),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256), data_len in 0u64..64) {
        check_invariants(&bytes, data_len);
    }

    #[test]
    fn structured_headers_hold_invariants(entries in prop::collection::vec(entry(), 0..5), data_len in 0u64..80) {
        let json = format!("{{{}}}", entries.join(","));
        check_invariants(json.as_bytes(), data_len);
    }

    #[test]
    fn mutated_valid_header_never_panics(pos in 0usize..200, byte in any::<u8>(), cut in 0usize..200) {
        let valid = br#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"BF16","shape":[4],"data_offsets":[24,32]}}"#;
        let mut json = valid.to_vec();
        let p = pos % json.len();
        json[p] = byte;
        json.truncate(cut.max(1).min(json.len()));
        check_invariants(&json, 32);
        check_invariants(valid, 32);
        prop_assert!(parse(valid, 32).is_ok());
    }
}
