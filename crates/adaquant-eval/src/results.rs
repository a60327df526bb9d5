//! The results file of a sweep: one JSON line per finished point, appended atomically, resumable after a kill.
//!
//! Durability: each line is serialized in full, then written with one `write_all` on a file opened in append
//! mode, flushed and `fsync`ed before the sweep moves on. A kill can therefore only leave a partial last line,
//! never a partial line in the middle. When the file is opened again that partial line (no final newline) is cut
//! off, so the point it belonged to runs again and is never recorded twice. Lines are identified by `key`.

use std::collections::{BTreeMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::metrics::TextMetrics;
use crate::tasks::TaskResult;

/// Everything recorded about one finished sweep point.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PointResult {
    /// Unique identity of the point and the evaluation settings; reruns skip keys already present.
    pub key: String,
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
}

/// An append-only JSONL results file.
#[derive(Debug)]
pub struct ResultsFile {
    path: PathBuf,
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

impl ResultsFile {
    /// Opens (or creates) a results file, cutting off a partial last line left by a kill.
    pub fn open(path: &Path) -> Result<ResultsFile> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
            }
        }
        let (records, complete) = read_records(path)?;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.len() != complete {
                eprintln!(
                    "note: {}: dropping a partial last line ({} bytes) left by an interrupted run; that point runs again",
                    path.display(),
                    meta.len() - complete
                );
                let f = OpenOptions::new().write(true).open(path).map_err(|e| EvalError::io(path, e))?;
                f.set_len(complete).map_err(|e| EvalError::io(path, e))?;
                f.sync_all().map_err(|e| EvalError::io(path, e))?;
            }
        }
        let done = records.iter().map(|r| r.key.clone()).collect();
        Ok(ResultsFile { path: path.to_path_buf(), done, records })
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

    /// Appends one record as a single line: one write, flush, fsync. A key already present is an error.
    pub fn append(&mut self, r: &PointResult) -> Result<()> {
        if self.done.contains(&r.key) {
            return Err(results_err(&self.path, format!("point '{}' is already recorded", r.key)));
        }
        let mut line = serde_json::to_string(r).map_err(|e| results_err(&self.path, e.to_string()))?;
        line.push('\n');
        let mut f =
            OpenOptions::new().create(true).append(true).open(&self.path).map_err(|e| EvalError::io(&self.path, e))?;
        f.write_all(line.as_bytes()).map_err(|e| EvalError::io(&self.path, e))?;
        f.flush().map_err(|e| EvalError::io(&self.path, e))?;
        f.sync_data().map_err(|e| EvalError::io(&self.path, e))?;
        self.done.insert(r.key.clone());
        self.records.push(r.clone());
        Ok(())
    }
}

/// Every `results*.jsonl` file in `dirs` (sorted by name), merged by key: the first record of a key wins.
pub fn merge_dirs(dirs: &[PathBuf]) -> Result<Vec<PointResult>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
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
            for r in read_records(&f)?.0 {
                if seen.insert(r.key.clone()) {
                    out.push(r);
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
        PointResult { key: key.into(), name: key.into(), ppl, ..Default::default() }
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
        b.append(&rec("full", 9.5)).unwrap();
        std::fs::write(d2.join("notes.txt"), "not results").unwrap();
        let m = merge_dirs(&[d1.clone(), d2.clone()]).unwrap();
        let keys: Vec<&str> = m.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["x", "full", "y"]);
        assert_eq!(m[1].ppl, 9.0);
        assert!(merge_dirs(&[d1.join("missing")]).is_err());
    }
}
