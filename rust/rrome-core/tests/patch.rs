//! End-to-end tests of the shard writer on synthetic checkpoints (no Python involved).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use rrome_core::deltas::{read_bundle, Delta, Layout};
use rrome_core::deltas::{write_bundle, Record, EDITS_FILE};
use rrome_core::dtype::{decode_f32, encode_f32, Dtype};
use rrome_core::journal::{journal_path, sha256_hex, undo_path, Undo};
use rrome_core::patch::{apply_bundle, apply_deltas, apply_deltas_with, inspect, recover, revert, Untouched};
use rrome_core::safetensors_header::{self, Header, TensorData};
use rrome_core::Error;

fn write_shard(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, dt, _, v)| {
            let mut b = vec![0u8; v.len() * dt.size()];
            encode_f32(*dt, v, &mut b);
            b
        })
        .collect();
    let td: Vec<TensorData> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, dt, s, _), b)| TensorData { name: n, dtype: *dt, shape: s.clone(), data: b })
        .collect();
    let mut f = fs::File::create(path).unwrap();
    safetensors_header::write(&mut f, &td, &[("format".into(), "pt".into())]).unwrap();
}

fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 + seed) * 0.731).sin()).collect()
}

/// Two shards with an index: `a.weight` (BF16 4×3) in shard 1, `b.weight` (F32 3×4) in shard 2.
fn sharded_model(dir: &Path) {
    write_shard(
        &dir.join("s1.safetensors"),
        &[("a.weight", Dtype::BF16, vec![4, 3], values(12, 1.0)), ("a.bias", Dtype::F32, vec![4], values(4, 2.0))],
    );
    write_shard(&dir.join("s2.safetensors"), &[("b.weight", Dtype::F32, vec![3, 4], values(12, 3.0))]);
    let index = r#"{"metadata":{},"weight_map":{"a.weight":"s1.safetensors","a.bias":"s1.safetensors","b.weight":"s2.safetensors"}}"#;
    fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
    fs::write(dir.join("config.json"), "{}").unwrap();
}

fn read_tensor(dir: &Path, shard: &str, name: &str) -> Vec<f32> {
    let (h, data) = safetensors_header::read_all(&dir.join(shard)).unwrap();
    let t = h.get(name).unwrap();
    let mut out = vec![0f32; t.shape.iter().product()];
    decode_f32(t.dtype, &data[t.begin as usize..t.end as usize], &mut out);
    out
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

fn delta(tensor: &str, d_in: usize, d_out: usize, layout: Layout, scale: f64) -> Delta {
    Delta {
        tensor: tensor.into(),
        u: values(d_in, 7.0),
        r: values(d_out, 9.0),
        layout,
        scale,
        meta: None,
        key: None,
        other_key: None,
    }
}

#[test]
fn in_place_apply_matches_reference_and_reverts_exactly() {
    let dir = tempfile::tempdir().unwrap();
    sharded_model(dir.path());
    let before = snapshot(dir.path());
    let old_a = read_tensor(dir.path(), "s1.safetensors", "a.weight");
    // a.weight stores 4×3 as in_out: d_in = 4, d_out = 3.
    let deltas = vec![
        delta("a.weight", 4, 3, Layout::InOut, 1.0),
        delta("a.weight", 4, 3, Layout::InOut, -0.25),
        delta("b.weight", 4, 3, Layout::OutIn, 2.0),
    ];
    let rep = apply_deltas(dir.path(), &deltas, None).unwrap();
    assert_eq!((rep.batch, rep.deltas), (1, 3));
    assert_eq!(rep.tensors, vec!["a.weight", "b.weight"]);
    assert!(!journal_path(dir.path()).exists());

    let new_a = read_tensor(dir.path(), "s1.safetensors", "a.weight");
    for j in 0..4 {
        for i in 0..3 {
            let mut x = old_a[j * 3 + i];
            for d in &deltas[..2] {
                x += (d.r[i] * d.scale as f32) * d.u[j];
            }
            let mut b = [0u8; 2];
            encode_f32(Dtype::BF16, &[x], &mut b);
            let mut back = [0f32];
            decode_f32(Dtype::BF16, &b, &mut back);
            assert_eq!(new_a[j * 3 + i], back[0]);
        }
    }
    // The bias in the same shard is untouched.
    assert_eq!(read_tensor(dir.path(), "s1.safetensors", "a.bias"), values(4, 2.0));
    let log = read_bundle(dir.path(), false).unwrap();
    assert_eq!(log.len(), 3);
    assert!(log.iter().all(|r| r.batch == Some(1)));

    apply_deltas(dir.path(), &[delta("b.weight", 4, 3, Layout::OutIn, 1.0)], None).unwrap();
    assert_eq!(revert(dir.path(), true).unwrap().batches, vec![2, 1]);
    assert_eq!(snapshot(dir.path()), before);
    assert!(matches!(revert(dir.path(), false), Err(Error::Revert { .. })));
}

#[test]
fn the_edit_log_keeps_each_key_and_a_revert_takes_its_batch_keys_away() {
    let dir = tempfile::tempdir().unwrap();
    sharded_model(dir.path());
    // A keyed delta holds the key it wrote at and, from seed 2 on, its other key as well.
    let other = |seed: f32| (seed >= 2.0).then(|| values(4, seed + 10.0));
    let keyed = |seed: f32| Delta {
        key: Some(values(4, seed)),
        other_key: other(seed),
        ..delta("b.weight", 4, 3, Layout::OutIn, 1.0)
    };
    // Batch 1: a keyed delta and one without (a bundle may mix them); batch 2: both keys.
    apply_deltas(dir.path(), &[keyed(1.0), delta("a.weight", 4, 3, Layout::InOut, 1.0)], None).unwrap();
    apply_deltas(dir.path(), &[Delta { scale: 2.0, ..keyed(2.0) }], None).unwrap();
    type Keys = Vec<(Option<u64>, Option<Vec<f32>>, Option<Vec<f32>>)>;
    let keys = |dir: &Path| -> Keys {
        read_bundle(dir, false).unwrap().into_iter().map(|r| (r.batch, r.delta.key, r.delta.other_key)).collect()
    };
    let both =
        vec![(Some(1), Some(values(4, 1.0)), None), (Some(1), None, None), (Some(2), Some(values(4, 2.0)), other(2.0))];
    assert_eq!(keys(dir.path()), both);
    // A copy carries the log, keys included.
    let parent = tempfile::tempdir().unwrap();
    let out = parent.path().join("copy");
    apply_deltas(dir.path(), &[Delta { scale: 3.0, ..keyed(3.0) }], Some(&out)).unwrap();
    assert_eq!(keys(&out)[..3], both[..]);
    assert_eq!(keys(&out)[3], (Some(3), Some(values(4, 3.0)), other(3.0)));
    // Reverting batch 2 leaves batch 1's records, their keys as they were.
    assert_eq!(revert(dir.path(), false).unwrap().batches, vec![2]);
    assert_eq!(keys(dir.path()), both[..2]);
}

#[test]
fn copy_mode_leaves_source_untouched() {
    let src = tempfile::tempdir().unwrap();
    sharded_model(src.path());
    let before = snapshot(src.path());
    let parent = tempfile::tempdir().unwrap();
    let out = parent.path().join("edited");
    apply_deltas(src.path(), &[delta("b.weight", 4, 3, Layout::OutIn, 1.0)], Some(&out)).unwrap();
    assert_eq!(snapshot(src.path()), before);
    assert_ne!(read_tensor(&out, "s2.safetensors", "b.weight"), values(12, 3.0));
    assert_eq!(read_tensor(&out, "s1.safetensors", "a.weight"), read_tensor(src.path(), "s1.safetensors", "a.weight"));
    assert!(!parent.path().join(".edited.rrome-partial").exists());
    // The copy carries its own undo data.
    revert(&out, false).unwrap();
    for (name, bytes) in &before {
        assert_eq!(&fs::read(out.join(name)).unwrap(), bytes, "{name}");
    }
    // An existing destination is refused.
    let err = apply_deltas(src.path(), &[delta("b.weight", 4, 3, Layout::OutIn, 1.0)], Some(&out)).unwrap_err();
    assert!(matches!(err, Error::Io { ref source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists), "{err}");
}

#[test]
fn bad_deltas_are_refused_before_any_write() {
    let dir = tempfile::tempdir().unwrap();
    sharded_model(dir.path());
    let before = snapshot(dir.path());
    let cases: Vec<(Delta, &str)> = vec![
        (delta("a.weight", 3, 4, Layout::InOut, 1.0), "field \"d_out\": 4 (the tensor has 3); field \"d_in\": 3"),
        (delta("missing.weight", 4, 3, Layout::OutIn, 1.0), "'missing.weight' is not in"),
        (delta("a.bias", 4, 1, Layout::OutIn, 1.0), "'a.bias' has shape [4], not a matrix"),
        (Delta { scale: f64::NAN, ..delta("b.weight", 4, 3, Layout::OutIn, 1.0) }, "scale"),
        (Delta { u: vec![f32::INFINITY; 4], ..delta("b.weight", 4, 3, Layout::OutIn, 1.0) }, "u[0]"),
        (delta("b.weight", 4, 3, Layout::OutIn, 1e39), "finite in float32"),
        (Delta { key: Some(vec![1.0; 3]), ..delta("b.weight", 4, 3, Layout::OutIn, 1.0) }, "key has 3 values"),
    ];
    // Each term is finite, their sum overflows f32 (max ~3.4e38).
    let big = Delta {
        tensor: "b.weight".into(),
        u: vec![1.0; 4],
        r: vec![1.0; 3],
        layout: Layout::OutIn,
        scale: 3e38,
        meta: None,
        key: None,
        other_key: None,
    };
    // All at once: every problem is named, each at its position in the batch.
    let all: Vec<Delta> = cases.iter().map(|(d, _)| d.clone()).collect();
    let err = apply_deltas(dir.path(), &all, None).unwrap_err();
    assert!(matches!(err, Error::Delta { .. }), "{err:?}");
    let text = err.to_string();
    assert_eq!(text.lines().count(), cases.len(), "{text}");
    for (i, (line, (d, want))) in text.lines().zip(&cases).enumerate() {
        assert!(line.starts_with(&format!("delta {i} ({}): ", d.tensor)) && line.contains(want), "{line}");
    }
    assert_eq!(snapshot(dir.path()), before);
    let mut batches: Vec<(Vec<Delta>, &str)> = cases.into_iter().map(|(d, w)| (vec![d], w)).collect();
    batches.push((vec![big.clone(), big], "not finite"));
    for (ds, want) in batches {
        let err = apply_deltas(dir.path(), &ds, None).unwrap_err().to_string();
        assert!(err.contains(want), "{err} should mention {want}");
        assert_eq!(snapshot(dir.path()), before);
    }
}

#[test]
fn a_bundle_is_checked_at_its_lines_then_applied_in_one_call() {
    let dir = tempfile::tempdir().unwrap();
    sharded_model(dir.path());
    let before = snapshot(dir.path());
    let bundle = tempfile::tempdir().unwrap();
    let rec = |i: usize, delta: Delta| Record { id: i.to_string(), batch: None, applied_at: None, line: 0, delta };
    let good = delta("b.weight", 4, 3, Layout::OutIn, 1.0);
    write_bundle(
        bundle.path(),
        &[
            rec(0, good.clone()),
            rec(1, delta("a.weight", 3, 4, Layout::InOut, 1.0)),
            rec(2, delta("c", 4, 3, Layout::OutIn, 1.0)),
        ],
    )
    .unwrap();
    let edits = bundle.path().join(EDITS_FILE);
    for out in [None, Some(bundle.path().join("copy"))] {
        let err = apply_bundle(dir.path(), bundle.path(), out.as_deref(), Untouched::Copy).unwrap_err();
        assert!(matches!(err, Error::Delta { .. }), "{err:?}");
        let text = err.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with(&format!("{}:2: field \"d_out\": 4", edits.display())), "{text}");
        assert!(lines[1].starts_with(&format!("{}:3: field \"tensor\": 'c' is not in", edits.display())), "{text}");
        assert_eq!(snapshot(dir.path()), before);
        assert!(!bundle.path().join("copy").exists());
    }
    write_bundle(bundle.path(), &[rec(0, good.clone()), rec(1, good)]).unwrap();
    let rep = apply_bundle(dir.path(), bundle.path(), None, Untouched::Copy).unwrap();
    assert_eq!((rep.batch, rep.deltas, rep.tensors.clone()), (1, 2, vec!["b.weight".to_string()]));
    assert_eq!(read_bundle(dir.path(), false).unwrap().len(), 2);
    revert(dir.path(), false).unwrap();
    assert_eq!(snapshot(dir.path()), before);
}

#[test]
fn hostile_index_is_refused() {
    for bad in ["../s1.safetensors", "/etc/passwd", "sub/s1.safetensors", ".."] {
        let dir = tempfile::tempdir().unwrap();
        sharded_model(dir.path());
        let index = format!(r#"{{"weight_map":{{"a.weight":"{bad}"}}}}"#);
        fs::write(dir.path().join("model.safetensors.index.json"), index).unwrap();
        let err = apply_deltas(dir.path(), &[delta("a.weight", 4, 3, Layout::InOut, 1.0)], None).unwrap_err();
        assert!(matches!(err, Error::Checkpoint { .. }), "{bad}: {err}");
    }
}

#[test]
fn symlinked_shards_are_not_edited_nor_copied_and_hardlinked_ones_are_unshared() {
    let outside = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_shard(&outside.path().join("real.safetensors"), &[("w", Dtype::F32, vec![2, 2], values(4, 0.0))]);
    std::os::unix::fs::symlink(outside.path().join("real.safetensors"), dir.path().join("model.safetensors")).unwrap();
    let d = Delta {
        tensor: "w".into(),
        u: vec![1.0, 1.0],
        r: vec![1.0, 1.0],
        layout: Layout::OutIn,
        scale: 1.0,
        meta: None,
        key: None,
        other_key: None,
    };
    let err = apply_deltas(dir.path(), std::slice::from_ref(&d), None).unwrap_err();
    assert!(err.to_string().contains("outside the model folder"), "{err}");
    // Copy mode does not follow the link either, and creates nothing.
    let out = outside.path().join("copy");
    let err = apply_deltas(dir.path(), std::slice::from_ref(&d), Some(&out)).unwrap_err();
    assert!(err.to_string().contains("is a symbolic link"), "{err}");
    assert!(!out.exists());
    assert_eq!(read_tensor(outside.path(), "real.safetensors", "w"), values(4, 0.0));

    // A hard link is given an inode of its own before the edit: the other name keeps its bytes.
    let dir2 = tempfile::tempdir().unwrap();
    let real = outside.path().join("real.safetensors");
    let real_bytes = fs::read(&real).unwrap();
    fs::hard_link(&real, dir2.path().join("model.safetensors")).unwrap();
    apply_deltas(dir2.path(), std::slice::from_ref(&d), None).unwrap();
    assert_eq!(fs::read(&real).unwrap(), real_bytes);
    assert_eq!(fs::metadata(&real).unwrap().nlink(), 1);
    assert_eq!(fs::metadata(dir2.path().join("model.safetensors")).unwrap().nlink(), 1);
    assert_ne!(read_tensor(dir2.path(), "model.safetensors", "w"), values(4, 0.0));
    assert!(leftover_tmp(dir2.path()).is_empty());
    revert(dir2.path(), false).unwrap();
    assert_eq!(fs::read(dir2.path().join("model.safetensors")).unwrap(), real_bytes);
}

fn leftover_tmp(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".rrome-tmp-"))
        .collect()
}

fn same_file(a: &Path, b: &Path) -> bool {
    let (ma, mb) = (fs::metadata(a).unwrap(), fs::metadata(b).unwrap());
    (ma.dev(), ma.ino()) == (mb.dev(), mb.ino())
}

#[test]
fn copy_shares_untouched_shards_and_undo_files_by_hard_link() {
    let src = tempfile::tempdir().unwrap();
    sharded_model(src.path());
    // Batch 1 in place gives the source an undo file.
    apply_deltas(src.path(), &[delta("a.weight", 4, 3, Layout::InOut, 1.0)], None).unwrap();
    let before = snapshot(src.path());
    let parent = tempfile::tempdir().unwrap();
    let out = parent.path().join("edited");
    let rep =
        apply_deltas_with(src.path(), &[delta("b.weight", 4, 3, Layout::OutIn, 1.0)], Some(&out), Untouched::HardLink)
            .unwrap();
    assert_eq!(rep.batch, 2);
    assert_eq!(snapshot(src.path()), before);
    // The edited shard is a file of its own; the untouched shard and the undo file are shared.
    assert!(!same_file(&src.path().join("s2.safetensors"), &out.join("s2.safetensors")));
    assert!(same_file(&src.path().join("s1.safetensors"), &out.join("s1.safetensors")));
    let undo1 = ".rrome/undo/batch-000001.safetensors";
    assert!(same_file(&src.path().join(undo1), &out.join(undo1)));
    // Small side files are copied.
    assert!(!same_file(&src.path().join("config.json"), &out.join("config.json")));
    assert_ne!(read_tensor(&out, "s2.safetensors", "b.weight"), values(12, 3.0));
}

#[test]
fn undo_file_holds_the_real_hashes() {
    let dir = tempfile::tempdir().unwrap();
    sharded_model(dir.path());
    let shard = dir.path().join("s2.safetensors");
    let (h, data) = safetensors_header::read_all(&shard).unwrap();
    let t = h.get("b.weight").unwrap();
    let old = data[t.begin as usize..t.end as usize].to_vec();
    apply_deltas(dir.path(), &[delta("b.weight", 4, 3, Layout::OutIn, 1.0)], None).unwrap();
    let undo = Undo::read(&undo_path(dir.path(), 1)).unwrap();
    assert_eq!(undo.regions.len(), 1);
    let r = &undo.regions[0];
    let (_, now) = safetensors_header::read_all(&shard).unwrap();
    assert_eq!(r.sha_before, sha256_hex(&old));
    assert_eq!(r.sha_after, sha256_hex(&now[t.begin as usize..t.end as usize]));
    assert_ne!(r.sha_before, r.sha_after);
    assert_eq!(undo.original(0).unwrap(), old);
}

#[test]
fn in_place_edit_of_a_shared_shard_leaves_the_other_folder_alone() {
    let src = tempfile::tempdir().unwrap();
    sharded_model(src.path());
    let pristine = snapshot(src.path());
    let parent = tempfile::tempdir().unwrap();
    let out = parent.path().join("edited");
    apply_deltas_with(src.path(), &[delta("b.weight", 4, 3, Layout::OutIn, 1.0)], Some(&out), Untouched::HardLink)
        .unwrap();
    let (s1_src, s1_out) = (src.path().join("s1.safetensors"), out.join("s1.safetensors"));
    assert!(same_file(&s1_src, &s1_out));
    let out_before = fs::read(&s1_out).unwrap();

    // Editing the copy's shared shard: the source keeps its bytes.
    apply_deltas(&out, &[delta("a.weight", 4, 3, Layout::InOut, 1.0)], None).unwrap();
    assert!(!same_file(&s1_src, &s1_out));
    assert_eq!(snapshot(src.path()), pristine);
    assert_ne!(fs::read(&s1_out).unwrap(), out_before);
    assert!(leftover_tmp(&out).is_empty());
    assert_eq!(revert(&out, true).unwrap().batches, vec![2, 1]);
    assert_eq!(fs::read(&s1_out).unwrap(), out_before);

    // Editing the source's shared shard: the copy keeps its bytes.
    let out2 = parent.path().join("edited2");
    apply_deltas_with(src.path(), &[delta("b.weight", 4, 3, Layout::OutIn, 1.0)], Some(&out2), Untouched::HardLink)
        .unwrap();
    let out2_before = snapshot(&out2);
    assert!(same_file(&s1_src, &out2.join("s1.safetensors")));
    apply_deltas(src.path(), &[delta("a.weight", 4, 3, Layout::InOut, 1.0)], None).unwrap();
    assert_ne!(fs::read(&s1_src).unwrap(), pristine.iter().find(|(n, _)| n == "s1.safetensors").unwrap().1);
    assert_eq!(snapshot(&out2), out2_before);

    // A revert in the source of a shard that a later copy shares: the copy keeps the edit.
    let out3 = parent.path().join("edited3");
    apply_deltas_with(src.path(), &[delta("b.weight", 4, 3, Layout::OutIn, 1.0)], Some(&out3), Untouched::HardLink)
        .unwrap();
    assert!(same_file(&s1_src, &out3.join("s1.safetensors")));
    let out3_before = snapshot(&out3);
    revert(src.path(), true).unwrap();
    assert_eq!(snapshot(src.path()), pristine);
    assert_eq!(snapshot(&out3), out3_before);
    // The copy still reverts exactly, through its own undo files.
    assert_eq!(revert(&out3, true).unwrap().batches, vec![2, 1]);
    for (name, bytes) in &pristine {
        assert_eq!(&fs::read(out3.join(name)).unwrap(), bytes, "{name}");
    }
}

#[test]
fn interrupted_write_is_rolled_back_by_recover() {
    let dir = tempfile::tempdir().unwrap();
    sharded_model(dir.path());
    let before = snapshot(dir.path());
    apply_deltas(dir.path(), &[delta("b.weight", 4, 3, Layout::OutIn, 1.0)], None).unwrap();
    // Simulate a crash after the journal was written and the shard patched: move the committed
    // undo file back to the journal and drop the batch from the log.
    let undo = dir.path().join(".rrome/undo/batch-000001.safetensors");
    fs::rename(&undo, journal_path(dir.path())).unwrap();
    fs::remove_file(dir.path().join("rrome_edits.jsonl")).unwrap();
    let pending = inspect(dir.path()).unwrap();
    assert_eq!(pending.pending.len(), 1);
    assert_eq!(pending.to_json()["pending"].as_array().unwrap().len(), 1);
    let actions = recover(dir.path()).unwrap();
    assert!(actions.iter().any(|a| a.contains("rolled back")), "{actions:?}");
    assert_eq!(snapshot(dir.path()), before);
    assert!(recover(dir.path()).unwrap().is_empty());
}

#[test]
fn corrupt_shard_header_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    sharded_model(dir.path());
    let p = dir.path().join("s2.safetensors");
    let mut bytes = fs::read(&p).unwrap();
    bytes.truncate(bytes.len() - 4);
    fs::write(&p, &bytes).unwrap();
    let err = apply_deltas(dir.path(), &[delta("a.weight", 4, 3, Layout::InOut, 1.0)], None).unwrap_err();
    assert!(matches!(err, Error::Header { .. }), "{err}");
    assert!(Header::read(&p).is_err());
}

#[test]
fn copy_shares_nothing_by_default() {
    let src = tempfile::tempdir().unwrap();
    sharded_model(src.path());
    apply_deltas(src.path(), &[delta("a.weight", 4, 3, Layout::InOut, 1.0)], None).unwrap();
    let parent = tempfile::tempdir().unwrap();
    let out = parent.path().join("edited");
    apply_deltas(src.path(), &[delta("b.weight", 4, 3, Layout::OutIn, 1.0)], Some(&out)).unwrap();
    for name in ["s1.safetensors", "s2.safetensors", ".rrome/undo/batch-000001.safetensors"] {
        assert!(!same_file(&src.path().join(name), &out.join(name)), "{name} is shared");
        assert_eq!(fs::metadata(out.join(name)).unwrap().nlink(), 1, "{name}");
    }
}

#[test]
fn commands_on_a_folder_that_is_not_a_checkpoint_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("notes.txt"), "not a model").unwrap();
    assert!(apply_deltas(dir.path(), &[delta("a.weight", 4, 3, Layout::InOut, 1.0)], None).is_err());
    assert!(revert(dir.path(), false).is_err());
    assert_eq!(recover(dir.path()).unwrap(), Vec::<String>::new());
    let names: Vec<String> =
        fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec!["notes.txt".to_string()]);
}

#[test]
fn deltas_that_do_not_fit_create_no_state() {
    let dir = tempfile::tempdir().unwrap();
    sharded_model(dir.path());
    let before = snapshot(dir.path());
    let err = apply_deltas(dir.path(), &[delta("no.such.weight", 4, 3, Layout::InOut, 1.0)], None).unwrap_err();
    assert!(err.to_string().contains("no.such.weight"), "{err}");
    assert!(!dir.path().join(".rrome").exists());
    assert_eq!(snapshot(dir.path()), before);
}
