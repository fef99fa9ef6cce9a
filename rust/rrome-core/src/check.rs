//! Checking a batch of deltas against a checkpoint before anything is written.
//!
//! Every delta is looked at, and every problem is returned, each located: `FILE:LINE` for a
//! record read from a bundle ([`check_records`]), `delta I (TENSOR)` for a delta built in
//! memory ([`check_deltas`]). Both go through one check of one delta, so a bundle and a
//! batch handed over in memory are held to the same rules: finite factors, a tensor the
//! checkpoint holds, an editable dtype, a matrix of shape d_out × d_in in the delta's layout.
//! [`refusal`] turns the problems into the one error that refuses the batch (the class of the
//! first problem; the message lists them, one per line), and [`check_bundle`] reads a bundle
//! and does all of that in one call.
//!
//! Only headers are read: a batch whose sum overflows the dtype is found while it is written.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpoint;
use crate::deltas::{bundle_paths, read_bundle, Delta, Layout, Record};
use crate::error::{Error, Result};
pub use crate::text::py_repr;

/// Problems a refusal lists one by one; more are counted in a last line.
pub const SHOWN: usize = 20;

/// What is wrong with a delta; selects the error (and so the Python exception) of a batch
/// refused because of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// An empty factor, or a number that is not finite ([`Error::Delta`]).
    NotFinite,
    /// The checkpoint has no tensor of that name ([`Error::TensorNotFound`]).
    TensorNotFound,
    /// The tensor's dtype cannot be edited ([`Error::UnsupportedDtype`]).
    UnsupportedDtype,
    /// The tensor is not a matrix, or not d_out × d_in in the delta's layout ([`Error::Delta`]).
    Shape,
}

/// One problem of one delta, with where the delta came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Position of the delta in the batch (0-based).
    pub index: usize,
    /// The `rrome_edits.jsonl` the delta was read from; `None` for a delta built in memory.
    pub file: Option<PathBuf>,
    /// Line of `file` that holds the delta (1-based; 0 for a delta built in memory).
    pub line: usize,
    /// The tensor the delta names.
    pub tensor: String,
    /// What kind of problem.
    pub kind: ProblemKind,
    /// What is wrong, in words, without the location.
    pub msg: String,
}

impl Problem {
    /// Where the delta came from: `FILE:LINE`, or `delta I (TENSOR)` in memory.
    pub fn location(&self) -> String {
        match &self.file {
            Some(file) if self.line > 0 => format!("{}:{}", file.display(), self.line),
            _ => format!("delta {} ({})", self.index, self.tensor),
        }
    }
}

impl fmt::Display for Problem {
    /// `LOCATION: MESSAGE`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location(), self.msg)
    }
}

/// Checks deltas built in memory against the checkpoint; each problem is located as
/// `delta I (TENSOR)`. Returns every problem, in batch order (none when all fit).
pub fn check_deltas(ckpt: &Checkpoint, deltas: &[Delta]) -> Vec<Problem> {
    check(ckpt, None, deltas.iter().map(|d| (0, d)))
}

/// Checks records read from `edits` (a bundle's `rrome_edits.jsonl`) against the
/// checkpoint; each problem is located as `FILE:LINE` by the record's
/// [`line`](Record::line). Returns every problem, in record order (none when all fit).
pub fn check_records(ckpt: &Checkpoint, edits: &Path, records: &[Record]) -> Vec<Problem> {
    check(ckpt, Some(edits), records.iter().map(|r| (r.line, &r.delta)))
}

/// Reads the bundle at `bundle` (a folder or either of its files) and checks every record
/// against the checkpoint in `model_dir` (headers only), before anything is written.
///
/// # Errors
/// [`Error::DeltasFile`], [`Error::Header`] or [`Error::Io`] for a bundle that cannot be read
/// (the first problem, at its line: a line that cannot be parsed stops the reading);
/// [`Error::Checkpoint`], [`Error::Header`] or [`Error::Io`] for a bad checkpoint; otherwise
/// the [`refusal`] of every record that does not fit.
pub fn check_bundle(model_dir: &Path, bundle: &Path) -> Result<Vec<Record>> {
    let records = read_bundle(bundle, false)?;
    let ckpt = Checkpoint::open(model_dir)?;
    let (edits, _) = bundle_paths(bundle)?;
    match refusal(&ckpt, &check_records(&ckpt, &edits, &records)) {
        Some(e) => Err(e),
        None => Ok(records),
    }
}

/// The error that refuses a batch with these problems (`None` when there are none): the
/// error of the first problem's [`ProblemKind`], whose message lists the first [`SHOWN`]
/// problems one per line (`LOCATION: MESSAGE`), then `... and N more`.
pub fn refusal(ckpt: &Checkpoint, problems: &[Problem]) -> Option<Error> {
    let first = problems.first()?;
    let mut lines: Vec<String> = problems.iter().take(SHOWN).map(Problem::to_string).collect();
    if problems.len() > SHOWN {
        lines.push(format!("... and {} more", problems.len() - SHOWN));
    }
    let msg = lines.join("\n");
    let name = first.tensor.clone();
    Some(match first.kind {
        ProblemKind::TensorNotFound => Error::TensorNotFound { path: ckpt.dir.clone(), name, msg },
        ProblemKind::UnsupportedDtype => {
            let dtype = ckpt.find(&first.tensor).map(|(_, t)| t.dtype.to_string()).unwrap_or_default();
            Error::UnsupportedDtype { name, dtype, msg }
        }
        ProblemKind::NotFinite | ProblemKind::Shape => Error::Delta { msg },
    })
}

/// The one check behind [`check_deltas`] and [`check_records`]: `(line, delta)` pairs, the
/// line 0 where there is no file.
fn check<'a>(ckpt: &Checkpoint, file: Option<&Path>, deltas: impl Iterator<Item = (usize, &'a Delta)>) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (index, (line, d)) in deltas.enumerate() {
        if let Some((kind, msg)) = misfit(ckpt, d) {
            let file = file.map(Path::to_path_buf);
            problems.push(Problem { index, file, line, tensor: d.tensor.clone(), kind, msg });
        }
    }
    problems
}

/// What is wrong with one delta, if anything: the first problem in the order finite numbers,
/// tensor, dtype, matrix, shape. The messages name the record field at fault.
fn misfit(ckpt: &Checkpoint, d: &Delta) -> Option<(ProblemKind, String)> {
    if let Some(msg) = d.not_finite() {
        return Some((ProblemKind::NotFinite, msg));
    }
    let name = py_repr(&d.tensor);
    let Ok((_, t)) = ckpt.find(&d.tensor) else {
        let msg = format!("field \"tensor\": {name} is not in {}", ckpt.dir.display());
        return Some((ProblemKind::TensorNotFound, msg));
    };
    if !t.dtype.is_editable() {
        let msg = format!("field \"tensor\": {name} is {}; only F32, F16, BF16", t.dtype);
        return Some((ProblemKind::UnsupportedDtype, msg));
    }
    let &[rows, cols] = t.shape.as_slice() else {
        let msg = format!("field \"tensor\": {name} has shape {:?}, not a matrix", t.shape);
        return Some((ProblemKind::Shape, msg));
    };
    let (t_out, t_in) = match d.layout {
        Layout::OutIn => (rows, cols),
        Layout::InOut => (cols, rows),
    };
    let bad: Vec<String> = [("d_out", d.d_out(), t_out), ("d_in", d.d_in(), t_in)]
        .into_iter()
        .filter(|&(_, have, want)| have != want)
        .map(|(field, have, want)| format!("field \"{field}\": {have} (the tensor has {want})"))
        .collect();
    if bad.is_empty() {
        return None;
    }
    let msg = format!("{}: {name} has shape {:?}, layout {}", bad.join("; "), t.shape, d.layout.as_str());
    Some((ProblemKind::Shape, msg))
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;
    use crate::deltas::write_bundle;
    use crate::dtype::Dtype;
    use crate::safetensors_header::{write, TensorData};

    /// `w` F32 [2, 4] (out_in: d_out 2, d_in 4), `ids` I64 [2, 4], `bias` F32 [4].
    fn model(dir: &Path) -> Checkpoint {
        let (w, ids, bias) = (vec![0u8; 32], vec![0u8; 64], vec![0u8; 16]);
        let mut f = File::create(dir.join("model.safetensors")).unwrap();
        let tensors = [
            TensorData { name: "w", dtype: Dtype::F32, shape: vec![2, 4], data: &w },
            TensorData { name: "ids", dtype: Dtype::I64, shape: vec![2, 4], data: &ids },
            TensorData { name: "bias", dtype: Dtype::F32, shape: vec![4], data: &bias },
        ];
        write(&mut f, &tensors, &[]).unwrap();
        Checkpoint::open(dir).unwrap()
    }

    fn delta(tensor: &str, d_in: usize, d_out: usize, layout: Layout) -> Delta {
        Delta {
            tensor: tensor.into(),
            u: vec![1.0; d_in],
            r: vec![1.0; d_out],
            layout,
            scale: 1.0,
            meta: None,
            key: None,
            other_key: None,
        }
    }

    fn record(i: usize, line: usize, delta: Delta) -> Record {
        Record { id: i.to_string(), batch: None, applied_at: None, line, delta }
    }

    /// One of each problem, among deltas that fit.
    fn batch() -> Vec<Delta> {
        vec![
            delta("w", 4, 2, Layout::OutIn), // fits
            delta("w", 3, 2, Layout::OutIn), // d_in off by one
            delta("w", 4, 2, Layout::InOut), // wrong layout: both sides
            delta("no.such", 4, 2, Layout::OutIn),
            delta("ids", 4, 2, Layout::OutIn),
            delta("bias", 4, 1, Layout::OutIn), // a vector
            Delta { scale: f64::INFINITY, ..delta("w", 4, 2, Layout::OutIn) },
            delta("w", 4, 2, Layout::InOut), // the same misfit again
        ]
    }

    #[test]
    fn every_problem_of_a_bundle_is_reported_at_its_line() {
        let tmp = tempfile::tempdir().unwrap();
        let ckpt = model(tmp.path());
        let edits = tmp.path().join("b").join("rrome_edits.jsonl");
        // Lines as a file with blank lines between records would number them.
        let records: Vec<Record> = batch().into_iter().enumerate().map(|(i, d)| record(i, 2 * i + 1, d)).collect();
        let problems = check_records(&ckpt, &edits, &records);
        let at = |line: usize| format!("{}:{line}: ", edits.display());
        let dir = tmp.path().display();
        let want = [
            (1, 3, ProblemKind::Shape, "field \"d_in\": 3 (the tensor has 4): 'w' has shape [2, 4], layout out_in"),
            (
                2,
                5,
                ProblemKind::Shape,
                "field \"d_out\": 2 (the tensor has 4); field \"d_in\": 4 (the tensor has 2): 'w' has shape [2, 4], \
                 layout in_out",
            ),
            (3, 7, ProblemKind::TensorNotFound, &*format!("field \"tensor\": 'no.such' is not in {dir}")),
            (4, 9, ProblemKind::UnsupportedDtype, "field \"tensor\": 'ids' is I64; only F32, F16, BF16"),
            (5, 11, ProblemKind::Shape, "field \"tensor\": 'bias' has shape [4], not a matrix"),
            (6, 13, ProblemKind::NotFinite, "scale is inf (must be finite in float32)"),
            (
                7,
                15,
                ProblemKind::Shape,
                "field \"d_out\": 2 (the tensor has 4); field \"d_in\": 4 (the tensor has 2): 'w' has shape [2, 4], \
                 layout in_out",
            ),
        ];
        assert_eq!(problems.len(), want.len(), "{problems:#?}");
        for (p, (index, line, kind, msg)) in problems.iter().zip(want) {
            assert_eq!((p.index, p.line, p.kind, p.msg.as_str()), (index, line, kind, msg));
            assert_eq!(p.file.as_deref(), Some(edits.as_path()));
            assert_eq!(p.to_string(), format!("{}{msg}", at(line)));
        }
        // The refusal: the class of the first problem, every problem on its own line.
        let err = refusal(&ckpt, &problems).unwrap();
        assert!(matches!(err, Error::Delta { .. }), "{err:?}");
        let text = err.to_string();
        assert_eq!(text.lines().count(), want.len());
        assert!(text.starts_with(&at(3)) && text.contains(&format!("\n{}field \"tensor\": 'no.such'", at(7))));
        // Only the problem of the first record decides the class.
        let err = refusal(&ckpt, &problems[2..]).unwrap();
        assert!(matches!(err, Error::TensorNotFound { ref name, .. } if name == "no.such"), "{err:?}");
        let err = refusal(&ckpt, &problems[3..]).unwrap();
        assert!(matches!(err, Error::UnsupportedDtype { ref dtype, .. } if dtype == "I64"), "{err:?}");
        assert!(refusal(&ckpt, &[]).is_none());
    }

    #[test]
    fn deltas_in_memory_are_located_by_position() {
        let tmp = tempfile::tempdir().unwrap();
        let ckpt = model(tmp.path());
        let problems = check_deltas(&ckpt, &batch());
        let shown: Vec<String> = problems.iter().map(|p| p.location()).collect();
        assert_eq!(
            shown,
            [
                "delta 1 (w)",
                "delta 2 (w)",
                "delta 3 (no.such)",
                "delta 4 (ids)",
                "delta 5 (bias)",
                "delta 6 (w)",
                "delta 7 (w)"
            ]
        );
        assert!(problems.iter().all(|p| p.file.is_none() && p.line == 0));
        assert_eq!(problems[5].to_string(), "delta 6 (w): scale is inf (must be finite in float32)");
        assert!(check_deltas(&ckpt, &[delta("w", 4, 2, Layout::OutIn), delta("w", 2, 4, Layout::InOut)]).is_empty());
    }

    #[test]
    fn a_refusal_lists_twenty_problems_then_counts_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let ckpt = model(tmp.path());
        let deltas: Vec<Delta> = (0..25).map(|_| delta("gone", 4, 2, Layout::OutIn)).collect();
        let text = refusal(&ckpt, &check_deltas(&ckpt, &deltas)).unwrap().to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), SHOWN + 1);
        assert_eq!(
            lines[SHOWN - 1],
            format!("delta 19 (gone): field \"tensor\": 'gone' is not in {}", tmp.path().display())
        );
        assert_eq!(lines[SHOWN], "... and 5 more");
    }

    #[test]
    fn check_bundle_reads_and_checks_in_one_call() {
        let tmp = tempfile::tempdir().unwrap();
        model(tmp.path());
        let bundle = tmp.path().join("bundle");
        std::fs::create_dir(&bundle).unwrap();
        let good = [record(0, 0, delta("w", 4, 2, Layout::OutIn)), record(1, 0, delta("w", 2, 4, Layout::InOut))];
        write_bundle(&bundle, &good).unwrap();
        let read = check_bundle(tmp.path(), &bundle).unwrap();
        assert_eq!(read.iter().map(|r| r.line).collect::<Vec<_>>(), [1, 2]);
        // Blank lines between the records: the lines named are those of the file.
        let bad = [
            good[0].clone(),
            record(1, 0, delta("w", 3, 2, Layout::OutIn)),
            record(2, 0, delta("x", 4, 2, Layout::OutIn)),
        ];
        write_bundle(&bundle, &bad).unwrap();
        let edits = bundle.join("rrome_edits.jsonl");
        let text = std::fs::read_to_string(&edits).unwrap().replace('\n', "\n\n");
        std::fs::write(&edits, text).unwrap();
        for arg in [bundle.clone(), edits.clone(), bundle.join("rrome_deltas.safetensors")] {
            let err = check_bundle(tmp.path(), &arg).unwrap_err();
            assert!(matches!(err, Error::Delta { .. }), "{err:?}");
            let lines: Vec<String> = err.to_string().lines().map(str::to_string).collect();
            assert_eq!(
                lines,
                [
                    format!(
                        "{}:3: field \"d_in\": 3 (the tensor has 4): 'w' has shape [2, 4], layout out_in",
                        edits.display()
                    ),
                    format!("{}:5: field \"tensor\": 'x' is not in {}", edits.display(), tmp.path().display()),
                ]
            );
        }
    }
}
