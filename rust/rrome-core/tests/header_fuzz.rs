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

// --- the hostile cases of issue 6, generated rather than listed ------------------------------

use rrome_core::checkpoint::Checkpoint;
use rrome_core::safetensors_header::{Header, MAX_HEADER_LEN};
use rrome_core::Error;
use serde_json::Value;

/// Numbers that break naive arithmetic: small ones, and ones near the u32/u64 limits.
fn hostile_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..48,
        1 => Just(u64::MAX),
        1 => Just(u64::MAX / 2 + 1),
        1 => Just(1u64 << 32),
        1 => Just(u32::MAX as u64),
        1 => Just(1u64 << 62),
        1 => any::<u64>(),
    ]
}

/// Any JSON value, nested a few levels (for fields of the wrong type).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        "[A-Z0-9]{0,4}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A tensor entry whose fields are each well-formed, hostile numbers, or of the wrong type.
fn hostile_entry() -> impl Strategy<Value = String> {
    let name = prop_oneof![Just("a".to_string()), Just("b".to_string()), "[a-z.\u{e9}\u{0}]{0,4}"];
    let dtype = prop_oneof![
        4 => prop_oneof![Just("F32"), Just("F16"), Just("BF16"), Just("F64"), Just("U8"), Just("I8"), Just("BOOL")]
            .prop_map(|s| format!("{s:?}")),
        1 => prop_oneof![Just("F128"), Just("f32"), Just(""), Just("F32 ")].prop_map(|s| format!("{s:?}")),
        1 => json_value().prop_map(|v| v.to_string()),
    ];
    let shape = prop_oneof![
        4 => prop::collection::vec(hostile_u64(), 0..4).prop_map(|v| format!("{v:?}")),
        1 => json_value().prop_map(|v| v.to_string()),
    ];
    let offsets = prop_oneof![
        4 => (hostile_u64(), hostile_u64()).prop_map(|(b, e)| format!("[{b},{e}]")),
        1 => json_value().prop_map(|v| v.to_string()),
    ];
    (name, dtype, shape, offsets)
        .prop_map(|(n, dt, sh, of)| format!(r#"{}:{{"dtype":{dt},"shape":{sh},"data_offsets":{of}}}"#, Value::from(n)))
}

fn write_file(dir: &std::path::Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]

    /// Hostile numbers, wrong types and duplicate names: no panic, and anything accepted tiles
    /// the data section (so no offset can point outside the file).
    #[test]
    fn hostile_entries_hold_invariants(
        entries in prop::collection::vec(hostile_entry(), 0..5),
        meta in prop::option::of(json_value()),
        data_len in hostile_u64(),
    ) {
        let mut parts = entries;
        if let Some(m) = meta {
            parts.push(format!(r#""__metadata__":{m}"#));
        }
        let json = format!("{{{}}}", parts.join(","));
        check_invariants(json.as_bytes(), data_len);
    }
}

proptest! {
    // Each case writes files: fewer of them.
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Whole files: any length prefix (beyond the file, absurd, truncated) over any body is
    /// either a valid header or a header error, never a panic or an I/O error.
    #[test]
    fn whole_files_are_checked(
        n in prop_oneof![hostile_u64(), 0u64..300],
        body in prop::collection::vec(any::<u8>(), 0..300),
        short in 0usize..8,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = n.to_le_bytes().to_vec();
        if short > 0 && body.is_empty() {
            bytes.truncate(short);
        }
        bytes.extend_from_slice(&body);
        let p = write_file(dir.path(), "x.safetensors", &bytes);
        match Header::read(&p) {
            Ok(h) => {
                prop_assert!(n <= MAX_HEADER_LEN && h.data_start == 8 + n);
                let end = h.tensors.last().map_or(0, |t| t.end);
                prop_assert_eq!(h.data_start + end, bytes.len() as u64);
            }
            Err(Error::Header { .. }) => {}
            Err(e) => prop_assert!(false, "unexpected error kind: {e:?}"),
        }
    }

    /// Index files: whatever the shard names, an opened checkpoint only ever refers to plain
    /// files directly inside its folder; a name leading out of it is a checkpoint error.
    #[test]
    fn index_names_stay_inside_the_folder(
        names in prop::collection::vec(prop_oneof![
            Just("a.safetensors".to_string()),
            Just("../a.safetensors".to_string()),
            Just("sub/a.safetensors".to_string()),
            Just("..".to_string()),
            Just(".".to_string()),
            Just(String::new()),
            Just("a.safetensors\u{0}".to_string()),
            Just("..\\a.safetensors".to_string()),
            "[a./\\\\]{0,8}",
        ], 1..3),
        absolute in any::<bool>(),
    ) {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("model");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        // A valid one-tensor shard everywhere a name might lead.
        let shard = {
            let json = br#"{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
            let mut b = (json.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(json);
            b.push(7);
            b
        };
        for p in [dir.join("a.safetensors"), root.path().join("a.safetensors"), dir.join("sub/a.safetensors")] {
            std::fs::write(p, &shard).unwrap();
        }
        let mut names = names;
        if absolute {
            names.push(root.path().join("a.safetensors").display().to_string());
        }
        let map: serde_json::Map<String, Value> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (if i == 0 { "t".into() } else { format!("t{i}") }, Value::from(n.as_str())))
            .collect();
        let index = serde_json::json!({ "weight_map": map }).to_string();
        write_file(&dir, "model.safetensors.index.json", index.as_bytes());
        match Checkpoint::open(&dir) {
            Ok(ck) => {
                for s in &ck.shards {
                    prop_assert_eq!(s.path.parent(), Some(dir.as_path()));
                    prop_assert!(!s.file.contains('/') && !s.file.contains('\\') && s.file != "..");
                }
            }
            Err(Error::Checkpoint { .. } | Error::Io { .. } | Error::Header { .. }) => {}
            Err(e) => prop_assert!(false, "unexpected error kind: {e:?}"),
        }
        let escapes =
            names.iter().any(|n| n.contains('/') || n.contains('\\') || n == ".." || n == "." || n.is_empty());
        if escapes {
            prop_assert!(Checkpoint::open(&dir).is_err());
        }
    }
}
