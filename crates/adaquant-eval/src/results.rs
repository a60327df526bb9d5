//! The results file of a sweep: one JSON line per finished point, appended atomically, resumable after a kill.
//!
//! Durability: each line is serialized in full, then written with one `write_all` on a file opened in append
//! mode, flushed and `fsync`ed before the sweep moves on; the folder is `fsync`ed when the file is created. A kill
//! can therefore only leave a partial last line, never a partial line in the middle. When the file is opened again
//! that partial line (no final newline) is cut off, so the point it belonged to runs again and is never recorded
//! twice. Lines are identified by `key`.
//!
//! Exclusion: an open [`ResultsFile`] holds an exclusive advisory lock on its file for as long as it lives, and
//! names its holder (pid, host, command) in `<file>.lock`; a second process on the same file gets
//! [`EvalError::ResultsLocked`] naming that holder, and never cuts a line the holder is still writing.
//!
//! Identity: a key covers everything that changes a number (see [`crate::sweep::SweepPlan::identity`]), and every
//! line carries [`RESULTS_VERSION`]. Lines of another version are refused, never resumed or mixed.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::metrics::TextMetrics;
use crate::tasks::TaskResult;

/// Version of the results: of the key's makeup and of the evaluation's numbers. Bump it whenever a change of the
/// code changes a recorded number (metrics, protocol, tokenization, quantization) or what a key means, so that old
/// results are refused instead of being resumed as if they were new.
///
/// Lines without `results_version` (read as 0) were written before versions existed and keyed points by the
/// model's file name only; version 2 is the first written.
pub const RESULTS_VERSION: u32 = 2;

/// Everything recorded about one finished sweep point.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PointResult {
    /// [`RESULTS_VERSION`] of the code that wrote the line (0 when absent: written before versions existed).
    #[serde(default)]
    pub results_version: u32,
    /// Unique identity of the point and the evaluation settings; reruns skip keys already present.
    pub key: String,
    /// Every evaluation setting behind the numbers (version, model and text sha256, windows, reference top-k,
    /// tasks), as hashed into the key.
    #[serde(default)]
    pub settings: String,
    /// Short display name (`K4V2`, `full`, `budget4 weight_fro`).
    pub name: String,
    /// `full`, `fixed` or `budget`.
    pub policy: String,
    /// Nominal key and value bits, averaged over layers (16 = unquantized).
    pub k_bits: f64,
    pub v_bits: f64,
    pub group_size: usize,
    pub k_axis: String,
    pub v_axis: String,
    pub residual: usize,
    pub sinks: usize,
    /// Quantizer family (`minmax`, `hqq`, `rot-minmax`, `rot-hqq`, `lloyd`, `rot-lloyd`); empty for the
    /// full-precision point and for records written before quantizers were selectable (min-max).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub quantizer: String,
    /// Bits per element of the packed history alone (codes and metadata; the exact window and sinks left out),
    /// averaged over layers, keys and values; 0 in records written before it was recorded.
    #[serde(default)]
    pub packed_bits: f64,
    /// Average bit budget of a `budget` point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<f64>,
    /// Sensitivity source of a `budget` point (`weight_fro`, a file name, `kl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensitivity: Option<String>,
    /// Per-layer key and value bits of a `budget` point.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layer_k_bits: Vec<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layer_v_bits: Vec<f64>,
    pub ppl: f64,
    pub ppl_stderr: f64,
    pub kl_mean: f64,
    pub kl_p99: f64,
    pub kl_max: f64,
    pub top1: f64,
    pub kv_bytes: usize,
    pub bits_per_element: f64,
    pub scored_tokens: usize,
    pub processed_tokens: usize,
    /// Task accuracies that were run, by task name.
    #[serde(default)]
    pub tasks: BTreeMap<String, TaskResult>,
    pub ctx: usize,
    pub windows: usize,
    /// Top-k of the stored reference distribution (0 = exact full rows).
    pub ref_topk: usize,
    pub model: String,
    pub model_sha256: String,
    pub data_sha256: String,
    /// File name of the text the metrics were measured on (`wiki.test.raw`); empty in records written before it
    /// was recorded, which the report names from `data_sha256`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub text: String,
    pub git_rev: String,
    /// Wall time of this point (text metrics and tasks).
    pub wall_s: f64,
    /// Processed tokens per second of the text evaluation.
    pub tokens_per_s: f64,
    /// Seconds since the Unix epoch when the point finished.
    pub finished_at: u64,
    /// `i/N` when the point ran in a shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
}

impl PointResult {
    /// Copies the text metrics into the record.
    pub fn set_text(&mut self, m: &TextMetrics) {
        self.ppl = m.ppl;
        self.ppl_stderr = m.ppl_stderr;
        self.kl_mean = m.kl_mean;
        self.kl_p99 = m.kl_p99;
        self.kl_max = m.kl_max;
        self.top1 = m.top1;
        self.kv_bytes = m.kv_bytes;
        self.bits_per_element = m.bits_per_element;
        self.scored_tokens = m.scored_tokens;
        self.processed_tokens = m.processed_tokens;
        self.tokens_per_s = m.tokens_per_s;
    }

    /// The record without what differs between two runs of the same measurement (timings, finish time, shard,
    /// git revision, the model's file name): two records of one key must agree on this.
    pub fn measurement(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(m) = v.as_object_mut() {
            for volatile in ["wall_s", "tokens_per_s", "finished_at", "shard", "git_rev", "model"] {
                m.remove(volatile);
            }
            if let Some(tasks) = m.get_mut("tasks").and_then(|t| t.as_object_mut()) {
                for t in tasks.values_mut() {
                    if let Some(t) = t.as_object_mut() {
                        t.remove("wall_s");
                    }
                }
            }
        }
        v
    }
}

/// Fields in which two records' measurements differ (`tasks` as a whole).
fn differing_fields(a: &PointResult, b: &PointResult) -> Vec<String> {
    let (a, b) = (a.measurement(), b.measurement());
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else { return Vec::new() };
    let mut names: Vec<String> = a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).cloned().collect();
    names.sort();
    names.dedup();
    names
}

/// An append-only JSONL results file, held under an exclusive lock while it is open.
#[derive(Debug)]
pub struct ResultsFile {
    path: PathBuf,
    /// The results file, open for appending and locked; the lock goes with the handle.
    file: File,
    holder_path: PathBuf,
    holder: String,
    done: HashSet<String>,
    records: Vec<PointResult>,
}

fn results_err(path: &Path, msg: impl Into<String>) -> EvalError {
    EvalError::Results { path: path.display().to_string(), msg: msg.into() }
}

/// Reads the complete lines of a results file, skipping a partial last line and unparsable lines
/// (reported on stderr). Returns the records and the byte length of the complete part.
pub fn read_records(path: &Path) -> Result<(Vec<PointResult>, u64)> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(EvalError::io(path, e)),
    };
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let text = String::from_utf8_lossy(&bytes[..complete]);
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<PointResult>(line) {
            Ok(r) => out.push(r),
            Err(e) => eprintln!("warning: {}:{}: skipping unreadable result line: {e}", path.display(), i + 1),
        }
    }
    Ok((out, complete as u64))
}

/// Refuses records written with another [`RESULTS_VERSION`], saying how to start fresh or keep the old file.
pub fn check_version(path: &Path, records: &[PointResult]) -> Result<()> {
    match records.iter().find(|r| r.results_version != RESULTS_VERSION) {
        None => Ok(()),
        Some(r) => Err(EvalError::OldResults {
            path: path.to_path_buf(),
            found: r.results_version,
            want: RESULTS_VERSION,
            lines: records.iter().filter(|x| x.results_version != RESULTS_VERSION).count(),
            keep_as: path.with_file_name(format!(
                "old-{}",
                path.file_name().map_or_else(|| "results.jsonl".into(), |n| n.to_string_lossy().into_owned())
            )),
        }),
    }
}

/// The `<file>.lock` note naming the holder of a results file.
fn holder_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".lock");
    PathBuf::from(s)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown host".into())
}

/// Who holds a results file: pid, host, start time and command line of this process.
fn holder_line() -> String {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let cmd: Vec<String> = std::env::args().collect();
    format!("pid {} on {}, since {} (Unix seconds), command: {}", std::process::id(), host_name(), since, cmd.join(" "))
}

/// Fsyncs a folder so that a file just created in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let d = File::open(dir).map_err(|e| EvalError::io(dir, e))?;
        d.sync_all().map_err(|e| EvalError::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

impl ResultsFile {
    /// Opens (or creates) a results file and takes its exclusive lock; then cuts off a partial last line left by
    /// a kill. A file held by another process is [`EvalError::ResultsLocked`]; a file with lines of another
    /// [`RESULTS_VERSION`] is [`EvalError::OldResults`].
    pub fn open(path: &Path) -> Result<ResultsFile> {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
        let (file, created) = match OpenOptions::new().read(true).append(true).create_new(true).open(path) {
            Ok(f) => (f, true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                (OpenOptions::new().read(true).append(true).open(path).map_err(|e| EvalError::io(path, e))?, false)
            }
            Err(e) => return Err(EvalError::io(path, e)),
        };
        let holder_path = holder_path(path);
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&holder_path)
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| format!("unknown (no note in {})", holder_path.display()));
                return Err(EvalError::ResultsLocked { path: path.to_path_buf(), holder });
            }
            Err(TryLockError::Error(e)) => return Err(EvalError::io(path, e)),
        }
        if created {
            sync_dir(dir)?;
        }
        let holder = holder_line();
        // The note is informative only: the lock is the handle's; a stale note of a killed process is overwritten.
        if let Err(e) = std::fs::write(&holder_path, format!("{holder}\n")) {
            eprintln!(
                "warning: cannot write {}: {e}; a second process will not see who holds the file",
                holder_path.display()
            );
        }
        let mut out = ResultsFile {
            path: path.to_path_buf(),
            file,
            holder_path,
            holder,
            done: HashSet::new(),
            records: Vec::new(),
        };
        let (records, complete) = read_records(path)?;
        check_version(path, &records)?;
        let len = out.file.metadata().map_err(|e| EvalError::io(path, e))?.len();
        if len != complete {
            eprintln!(
                "note: {}: dropping a partial last line ({} bytes) left by an interrupted run; that point runs again",
                path.display(),
                len - complete
            );
            out.file.set_len(complete).map_err(|e| EvalError::io(path, e))?;
            out.file.sync_all().map_err(|e| EvalError::io(path, e))?;
        }
        out.done = records.iter().map(|r| r.key.clone()).collect();
        out.records = records;
        Ok(out)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a point with this key is already recorded.
    pub fn contains(&self, key: &str) -> bool {
        self.done.contains(key)
    }

    /// Records read or appended so far.
    pub fn records(&self) -> &[PointResult] {
        &self.records
    }

    /// Appends one record as a single line: one write, flush, fsync. A key already present, or a record of
    /// another [`RESULTS_VERSION`], is an error.
    pub fn append(&mut self, r: &PointResult) -> Result<()> {
        if self.done.contains(&r.key) {
            return Err(results_err(&self.path, format!("point '{}' is already recorded", r.key)));
        }
        if r.results_version != RESULTS_VERSION {
            return Err(results_err(
                &self.path,
                format!(
                    "record '{}' has results version {}, this file holds version {RESULTS_VERSION}",
                    r.key, r.results_version
                ),
            ));
        }
        let mut line = serde_json::to_string(r).map_err(|e| results_err(&self.path, e.to_string()))?;
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(|e| EvalError::io(&self.path, e))?;
        self.file.flush().map_err(|e| EvalError::io(&self.path, e))?;
        self.file.sync_data().map_err(|e| EvalError::io(&self.path, e))?;
        self.done.insert(r.key.clone());
        self.records.push(r.clone());
        Ok(())
    }
}

impl Drop for ResultsFile {
    /// Removes the holder note (while the lock is still held, so it never removes a later holder's note).
    fn drop(&mut self) {
        if std::fs::read_to_string(&self.holder_path).is_ok_and(|s| s.trim() == self.holder) {
            let _ = std::fs::remove_file(&self.holder_path);
        }
    }
}

/// Every `results*.jsonl` file in `dirs` (sorted by name), merged by key. Two records of one key must be the same
/// measurement ([`PointResult::measurement`]): one is kept; records that disagree are [`EvalError::MergeConflict`]
/// naming both files, and lines of another [`RESULTS_VERSION`] are [`EvalError::OldResults`].
pub fn merge_dirs(dirs: &[PathBuf]) -> Result<Vec<PointResult>> {
    let mut seen: BTreeMap<String, (usize, PathBuf)> = BTreeMap::new();
    let mut out: Vec<PointResult> = Vec::new();
    for dir in dirs {
        let rd = std::fs::read_dir(dir).map_err(|e| EvalError::io(dir, e))?;
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                n.starts_with("results") && n.ends_with(".jsonl")
            })
            .collect();
        files.sort();
        for f in files {
            let records = read_records(&f)?.0;
            check_version(&f, &records)?;
            for r in records {
                match seen.get(&r.key) {
                    None => {
                        seen.insert(r.key.clone(), (out.len(), f.clone()));
                        out.push(r);
                    }
                    Some((i, first)) => {
                        let fields = differing_fields(&out[*i], &r);
                        if !fields.is_empty() {
                            return Err(EvalError::MergeConflict {
                                key: r.key.clone(),
                                first: first.clone(),
                                second: f.clone(),
                                fields: fields.join(", "),
                            });
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("adaquant-eval-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn rec(key: &str, ppl: f64) -> PointResult {
        PointResult { results_version: RESULTS_VERSION, key: key.into(), name: key.into(), ppl, ..Default::default() }
    }

    #[test]
    fn appends_survive_reopen_and_partial_lines_are_dropped() {
        let d = tmpdir("resume");
        let p = d.join("results.jsonl");
        let mut f = ResultsFile::open(&p).unwrap();
        f.append(&rec("a", 1.0)).unwrap();
        f.append(&rec("b", 2.0)).unwrap();
        assert!(f.append(&rec("a", 3.0)).is_err());
        // Simulate a kill in the middle of writing a third line.
        let mut raw = OpenOptions::new().append(true).open(&p).unwrap();
        raw.write_all(br#"{"key":"c","name":"c","pol"#).unwrap();
        drop(raw);
        // The writer was killed: its lock went with it.
        drop(f);
        let mut f = ResultsFile::open(&p).unwrap();
        assert!(f.contains("a") && f.contains("b") && !f.contains("c"));
        assert_eq!(f.records().len(), 2);
        f.append(&rec("c", 4.0)).unwrap();
        let (all, _) = read_records(&p).unwrap();
        let keys: Vec<&str> = all.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["a", "b", "c"]);
        assert_eq!(all[2].ppl, 4.0);
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn merge_dedupes_across_shards() {
        let d1 = tmpdir("merge1");
        let d2 = tmpdir("merge2");
        let mut a = ResultsFile::open(&d1.join("results.shard-0-of-2.jsonl")).unwrap();
        a.append(&rec("x", 1.0)).unwrap();
        a.append(&rec("full", 9.0)).unwrap();
        let mut b = ResultsFile::open(&d2.join("results.shard-1-of-2.jsonl")).unwrap();
        b.append(&rec("y", 2.0)).unwrap();
        // The same measurement again, in another run: other timings, shard and revision.
        let again = PointResult {
            wall_s: 3.5,
            tokens_per_s: 100.0,
            finished_at: 42,
            shard: Some("1/2".into()),
            git_rev: "other".into(),
            ..rec("full", 9.0)
        };
        b.append(&again).unwrap();
        std::fs::write(d2.join("notes.txt"), "not results").unwrap();
        let m = merge_dirs(&[d1.clone(), d2.clone()]).unwrap();
        let keys: Vec<&str> = m.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["x", "full", "y"]);
        assert_eq!(m[1].ppl, 9.0);
        assert!(merge_dirs(&[d1.join("missing")]).is_err());
    }

    #[test]
    fn merge_refuses_one_key_with_two_measurements() {
        let d1 = tmpdir("conflict1");
        let d2 = tmpdir("conflict2");
        ResultsFile::open(&d1.join("results.jsonl")).unwrap().append(&rec("K4V2|abc", 26.0)).unwrap();
        let mut other = rec("K4V2|abc", 84.5);
        other.kl_mean = 1.1;
        ResultsFile::open(&d2.join("results.jsonl")).unwrap().append(&other).unwrap();
        let err = merge_dirs(&[d1.clone(), d2.clone()]).unwrap_err();
        assert!(matches!(&err, EvalError::MergeConflict { fields, .. } if fields == "kl_mean, ppl"), "{err}");
        let msg = err.to_string();
        for part in ["K4V2|abc", "kl_mean, ppl"] {
            assert!(msg.contains(part), "{msg}");
        }
        for dir in [&d1, &d2] {
            assert!(msg.contains(&dir.join("results.jsonl").display().to_string()), "{msg}");
        }
        // Either order is refused: the first file is not silently preferred.
        assert!(matches!(merge_dirs(&[d2, d1]), Err(EvalError::MergeConflict { .. })));
    }

    /// A line written before results versions existed (the model keyed by its file name only).
    const OLD_LINE: &str = r#"{"key":"full|m.gguf|ctx512|w8|top256|","name":"full","policy":"full","k_bits":16.0,"v_bits":16.0,"group_size":0,"k_axis":"","v_axis":"","residual":0,"sinks":0,"ppl":24.5,"ppl_stderr":1.6,"kl_mean":0.0,"kl_p99":0.0,"kl_max":0.0,"top1":1.0,"kv_bytes":1,"bits_per_element":32.0,"scored_tokens":2040,"processed_tokens":4096,"tasks":{},"ctx":512,"windows":8,"ref_topk":256,"model":"m.gguf","model_sha256":"ab","data_sha256":"cd","git_rev":"x","wall_s":1.0,"tokens_per_s":1.0,"finished_at":1}"#;

    #[test]
    fn old_results_files_are_refused_with_a_way_out() {
        let d = tmpdir("old");
        let p = d.join("results.jsonl");
        std::fs::write(&p, format!("{OLD_LINE}\n")).unwrap();
        let err = ResultsFile::open(&p).unwrap_err();
        assert!(matches!(&err, EvalError::OldResults { found: 0, lines: 1, .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("another --out"), "{msg}");
        assert!(msg.contains(&format!("mv {} {}", p.display(), d.join("old-results.jsonl").display())), "{msg}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), format!("{OLD_LINE}\n"), "the old file is left alone");
        assert!(matches!(merge_dirs(std::slice::from_ref(&d)), Err(EvalError::OldResults { .. })));
        // Renamed as suggested, it no longer stands in the way.
        std::fs::rename(&p, d.join("old-results.jsonl")).unwrap();
        ResultsFile::open(&p).unwrap().append(&rec("a", 1.0)).unwrap();
        assert_eq!(merge_dirs(&[d]).unwrap().len(), 1);
        // A record of another version is not appended either.
        let mut f = ResultsFile::open(&p).unwrap();
        assert!(f.append(&PointResult { results_version: 1, ..rec("b", 1.0) }).is_err());
    }

    #[test]
    fn a_second_writer_is_refused_and_cuts_nothing() {
        let d = tmpdir("lock");
        let p = d.join("results.jsonl");
        let mut first = ResultsFile::open(&p).unwrap();
        first.append(&rec("a", 1.0)).unwrap();
        // The holder is in the middle of its next line.
        let mut raw = OpenOptions::new().append(true).open(&p).unwrap();
        raw.write_all(br#"{"key":"b","na"#).unwrap();
        drop(raw);
        let before = std::fs::read(&p).unwrap();
        let err = ResultsFile::open(&p).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(&err, EvalError::ResultsLocked { .. }), "{msg}");
        assert!(msg.contains(&format!("pid {}", std::process::id())) && msg.contains(&host_name()), "{msg}");
        assert!(msg.contains("command: "), "{msg}");
        assert_eq!(std::fs::read(&p).unwrap(), before, "the holder's partial line is not cut");
        // Another shard's file is its own.
        ResultsFile::open(&d.join("results.shard-0-of-2.jsonl")).unwrap();
        drop(first);
        assert!(!holder_path(&p).exists(), "the holder note goes with the lock");
        let f = ResultsFile::open(&p).unwrap();
        assert_eq!(f.records().len(), 1);
        assert!(std::fs::read_to_string(&p).unwrap().ends_with('\n'));
    }
}
