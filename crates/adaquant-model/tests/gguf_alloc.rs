//! What parsing a GGUF header allocates, measured by a counting global allocator: at most
//! `MAX_MEMORY_PER_FILE_BYTE` bytes per byte of the file (plus the maps' own nodes), whatever the file says.
//! The counters are per thread, so tests running beside each other do not disturb the measurement.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use adaquant_model::gguf::{Gguf, GgufWriter, Value, MAX_MEMORY_PER_FILE_BYTE};
use adaquant_model::ModelError;

struct Counting;

thread_local! {
    /// Bytes asked for on this thread (allocations, and the growth of reallocations).
    static ASKED: Cell<usize> = const { Cell::new(0) };
    /// Bytes live on this thread now, and the most that were live at once.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(asked: usize, live: isize) {
    // `try_with`: a thread being torn down no longer has its counters.
    let _ = ASKED.try_with(|a| a.set(a.get() + asked));
    let _ = LIVE.try_with(|l| {
        l.set(l.get() + live);
        let _ = PEAK.try_with(|p| p.set(p.get().max(l.get())));
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counting touches only thread-locals
// that need no allocation.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size(), layout.size() as isize);
        // SAFETY: the caller's contract for `alloc` is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size(), layout.size() as isize);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(0, -(layout.size() as isize));
        // SAFETY: as for `alloc`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size.saturating_sub(layout.size()), new_size as isize - layout.size() as isize);
        // SAFETY: as for `alloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// The result of parsing `bytes`, the bytes asked for while parsing, and the most that were live at once
/// (counted from the live bytes before the parse).
fn measured_parse(bytes: &[u8]) -> (Result<Gguf, ModelError>, usize, usize) {
    let asked0 = ASKED.with(Cell::get);
    let live0 = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(live0));
    let parsed = Gguf::parse(bytes);
    let asked = ASKED.with(Cell::get) - asked0;
    let peak = (PEAK.with(Cell::get) - live0).max(0) as usize;
    (parsed, asked, peak)
}

/// What the maps' nodes (not charged by the parser) may add to a small file's allocations.
const NODE_SLACK: usize = 4096;

fn assert_bounded(what: &str, len: usize, asked: usize, peak: usize) {
    let limit = MAX_MEMORY_PER_FILE_BYTE * len + NODE_SLACK;
    assert!(
        asked <= limit && peak <= limit,
        "{what}: parsing a {len}-byte file asked for {asked} bytes ({:.1} per file byte) with {peak} live at once; \
         the limit is {limit}",
        asked as f64 / len as f64
    );
}

/// A file whose one metadata entry is an array of `n` bytes: each takes 1 byte in the file and a whole `Value`
/// (32 bytes) once parsed. Before the header was charged for its memory, this parsed and asked for about 30 times
/// the file's size.
fn byte_array_file(n: usize) -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.meta("bytes", Value::Array(vec![Value::U8(0x5a); n]));
    w.to_bytes()
}

#[test]
fn a_byte_array_cannot_ask_for_thirty_times_the_file() {
    let bytes = byte_array_file(1 << 16);
    let (parsed, asked, peak) = measured_parse(&bytes);
    assert_bounded("u8 array", bytes.len(), asked, peak);
    let err = parsed.expect_err("a 64 KiB byte array needs 2 MiB of values");
    assert!(err.to_string().contains("bytes of memory"), "{err}");
}

#[test]
fn a_claim_is_refused_before_allocating() {
    // 64 Ki bool elements whose first byte is not a bool: the array was allocated in full, then the parse failed.
    let n = 1 << 16;
    let key = "flags";
    let mut w = GgufWriter::new();
    w.meta(key, Value::Array(vec![Value::Bool(true); n]));
    let mut bytes = w.to_bytes();
    // Header (24), key length (8), key, value type (4), element type (4), array length (8).
    bytes[24 + 8 + key.len() + 4 + 4 + 8] = 2;
    let (parsed, asked, peak) = measured_parse(&bytes);
    assert_bounded("bool array", bytes.len(), asked, peak);
    assert!(parsed.is_err());
}

#[test]
fn nested_and_string_arrays_stay_within_the_budget() {
    // Inner arrays of 64 bytes (27 times their file bytes once parsed) are refused partway through.
    let mut w = GgufWriter::new();
    w.meta("rows", Value::Array(vec![Value::Array(vec![Value::U8(1); 64]); 256]));
    let bytes = w.to_bytes();
    let (parsed, asked, peak) = measured_parse(&bytes);
    assert_bounded("array of byte arrays", bytes.len(), asked, peak);
    assert!(parsed.is_err());
    // A vocabulary-like file (short strings, i32 types) parses, within the same bound.
    let tokens: Vec<Value> = (0..4096).map(|i| Value::String(format!("t{i}"))).collect();
    let mut w = GgufWriter::new();
    w.meta("tokenizer.ggml.tokens", Value::Array(tokens))
        .meta("tokenizer.ggml.token_type", Value::Array(vec![Value::I32(1); 4096]));
    let bytes = w.to_bytes();
    let (parsed, asked, peak) = measured_parse(&bytes);
    assert_bounded("vocabulary", bytes.len(), asked, peak);
    let g = parsed.expect("a vocabulary file parses");
    assert_eq!(g.get("tokenizer.ggml.tokens").and_then(Value::as_array).map(<[Value]>::len), Some(4096));
}
