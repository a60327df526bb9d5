//! Datasets: WikiText-2 raw text, HellaSwag (llama.cpp's text format), ARC-Easy and LAMBADA (JSONL), and the
//! synthetic passkey-retrieval prompt.
//!
//! Parsers take the text itself (so tests run on inline samples) and a name used in error messages; the `load_*`
//! functions read a file and call them. Malformed input is an [`EvalError::Malformed`] with a 1-based line number.

use std::path::Path;

use serde::Deserialize;

use crate::error::{EvalError, Result};

/// Reads a whole text file (WikiText-2 raw is tokenized as one string, with llama.cpp's BOS rule).
pub fn load_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))
}

/// One multiple-choice item: a context and candidate continuations, one of them correct.
#[derive(Clone, Debug, PartialEq)]
pub struct ChoiceItem {
    /// Text the model reads first.
    pub context: String,
    /// Candidate continuations, each scored after the context (already carrying any leading space).
    pub endings: Vec<String>,
    /// Index of the correct ending.
    pub gold: usize,
}

/// One LAMBADA item: a passage without its last word, and that word.
#[derive(Clone, Debug, PartialEq)]
pub struct LastWordItem {
    pub context: String,
    /// The last word, without a leading space.
    pub target: String,
}

fn malformed(name: &str, line: usize, msg: impl Into<String>) -> EvalError {
    EvalError::Malformed { path: name.to_string(), line, msg: msg.into() }
}

/// Parses HellaSwag in llama.cpp's format: six lines per item (context, gold label 0-3, four endings).
///
/// Endings get a leading space, as llama.cpp's `hellaswag_score` does, so they continue the context's last word.
pub fn parse_hellaswag(text: &str, name: &str) -> Result<Vec<ChoiceItem>> {
    let lines: Vec<&str> = text.lines().collect();
    // A trailing empty line (or several) at the end of the file is fine.
    let mut n = lines.len();
    while n > 0 && lines[n - 1].trim().is_empty() {
        n -= 1;
    }
    if !n.is_multiple_of(6) {
        return Err(malformed(
            name,
            n - n % 6 + 1,
            format!("{n} non-empty-tail lines is not a multiple of 6 (context, label, 4 endings); the last item is incomplete"),
        ));
    }
    let mut items = Vec::with_capacity(n / 6);
    for (i, chunk) in lines[..n].chunks(6).enumerate() {
        let first = i * 6 + 1;
        let gold: usize = chunk[1]
            .trim()
            .parse()
            .map_err(|_| malformed(name, first + 1, format!("gold label '{}' is not an integer 0-3", chunk[1])))?;
        if gold > 3 {
            return Err(malformed(name, first + 1, format!("gold label {gold} is outside 0-3")));
        }
        if chunk[0].trim().is_empty() {
            return Err(malformed(name, first, "empty context line"));
        }
        items.push(ChoiceItem {
            context: chunk[0].to_string(),
            endings: chunk[2..6].iter().map(|e| format!(" {}", e.trim_start())).collect(),
            gold,
        });
    }
    Ok(items)
}

/// Reads and parses a HellaSwag file.
pub fn load_hellaswag(path: &Path) -> Result<Vec<ChoiceItem>> {
    parse_hellaswag(&load_text(path)?, &path.display().to_string())
}

#[derive(Deserialize)]
struct ArcLine {
    query: String,
    choices: Vec<String>,
    gold: usize,
}

/// Parses ARC-Easy JSONL `{"query": "Question: ...", "choices": [...], "gold": i}`.
///
/// The context is `query + "\nAnswer:"` and each ending `" " + choice`, the usual zero-shot prompt.
pub fn parse_arc(text: &str, name: &str) -> Result<Vec<ChoiceItem>> {
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: ArcLine = serde_json::from_str(line).map_err(|e| malformed(name, i + 1, format!("bad JSON: {e}")))?;
        if l.choices.len() < 2 {
            return Err(malformed(name, i + 1, format!("{} choices; need at least 2", l.choices.len())));
        }
        if l.gold >= l.choices.len() {
            return Err(malformed(
                name,
                i + 1,
                format!("gold {} out of range for {} choices", l.gold, l.choices.len()),
            ));
        }
        items.push(ChoiceItem {
            context: format!("{}\nAnswer:", l.query),
            endings: l.choices.iter().map(|c| format!(" {c}")).collect(),
            gold: l.gold,
        });
    }
    Ok(items)
}

/// Reads and parses an ARC JSONL file.
pub fn load_arc(path: &Path) -> Result<Vec<ChoiceItem>> {
    parse_arc(&load_text(path)?, &path.display().to_string())
}

#[derive(Deserialize)]
struct LambadaLine {
    context: String,
    continuation: String,
}

/// Parses LAMBADA JSONL `{"context": ..., "continuation": ...}`.
pub fn parse_lambada(text: &str, name: &str) -> Result<Vec<LastWordItem>> {
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: LambadaLine =
            serde_json::from_str(line).map_err(|e| malformed(name, i + 1, format!("bad JSON: {e}")))?;
        let target = l.continuation.trim().to_string();
        if target.is_empty() {
            return Err(malformed(name, i + 1, "empty continuation"));
        }
        items.push(LastWordItem { context: l.context.trim_end().to_string(), target });
    }
    Ok(items)
}

/// Reads and parses a LAMBADA JSONL file.
pub fn load_lambada(path: &Path) -> Result<Vec<LastWordItem>> {
    parse_lambada(&load_text(path)?, &path.display().to_string())
}

/// A small deterministic generator (SplitMix64) for keys and depths, so prompts depend only on a seed.
#[derive(Clone, Debug)]
pub struct SplitMix(pub u64);

impl SplitMix {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform integer in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo).max(1)
    }
}

/// The repeated filler of the standard passkey-retrieval prompt (Mohtashami & Jaggi 2023).
pub const PASSKEY_FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
const PASSKEY_INTRO: &str = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information there. ";
const PASSKEY_QUESTION: &str = "What is the pass key? The pass key is";

/// A passkey prompt: filler with one needle sentence at a chosen depth, ending in the question.
#[derive(Clone, Debug, PartialEq)]
pub struct PasskeyPrompt {
    pub text: String,
    pub key: u32,
    /// Filler repetitions before and after the needle.
    pub before: usize,
    pub after: usize,
}

/// The needle sentence.
pub fn passkey_needle(key: u32) -> String {
    format!("The pass key is {key}. Remember it. {key} is the pass key. ")
}

/// Builds a passkey prompt of about `target_tokens` tokens with the needle at relative `depth` (0 = start, 1 = end).
///
/// `count_tokens` measures a string in model tokens; the filler is repeated as often as fits, so the prompt is at
/// most `target_tokens` long (and within one filler repetition of it).
pub fn passkey_prompt(
    target_tokens: usize,
    depth: f64,
    key: u32,
    count_tokens: &mut dyn FnMut(&str) -> Result<usize>,
) -> Result<PasskeyPrompt> {
    if !(0.0..=1.0).contains(&depth) {
        return Err(EvalError::BadRequest(format!("passkey depth {depth} must be in [0, 1]")));
    }
    let build = |reps: usize| -> (String, usize, usize) {
        let before = ((reps as f64) * depth).round() as usize;
        let after = reps - before;
        let mut s = String::with_capacity(PASSKEY_INTRO.len() + reps * PASSKEY_FILLER.len() + 200);
        s.push_str(PASSKEY_INTRO);
        for _ in 0..before {
            s.push_str(PASSKEY_FILLER);
        }
        s.push_str(&passkey_needle(key));
        for _ in 0..after {
            s.push_str(PASSKEY_FILLER);
        }
        s.push_str(PASSKEY_QUESTION);
        (s, before, after)
    };
    let fixed = count_tokens(&build(0).0)?;
    let per = count_tokens(&PASSKEY_FILLER.repeat(16))?.div_ceil(16).max(1);
    if fixed > target_tokens {
        return Err(EvalError::BadRequest(format!(
            "a passkey prompt needs at least {fixed} tokens; asked for {target_tokens}"
        )));
    }
    // Estimate, then step down until it fits (token counts are not exactly additive across joins).
    let mut reps = (target_tokens - fixed) / per;
    loop {
        let (text, before, after) = build(reps);
        if count_tokens(&text)? <= target_tokens || reps == 0 {
            return Ok(PasskeyPrompt { text, key, before, after });
        }
        reps -= 1;
    }
}

/// Whether generated text answers the passkey: the first number in it equals the key.
pub fn passkey_answer_correct(generated: &str, key: u32) -> bool {
    let digits: String =
        generated.chars().skip_while(|c| !c.is_ascii_digit()).take_while(|c| c.is_ascii_digit()).collect();
    digits.parse::<u32>().ok() == Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HS: &str = "Roof shingle removal: A man is sitting on a roof. he\n3\nis using wrap.\nis ripping tiles.\nis holding a cube.\nstarts pulling up roofing.\nClean and jerk: A lady walks. the lady\n0\nswings.\npulls.\npulls a rope.\nstands.\n\n";

    #[test]
    fn hellaswag_parses_six_line_items() {
        let items = parse_hellaswag(HS, "hs").unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].gold, 3);
        assert_eq!(items[0].endings[3], " starts pulling up roofing.");
        assert_eq!(items[1].context, "Clean and jerk: A lady walks. the lady");
        assert_eq!(items[1].gold, 0);
    }

    #[test]
    fn hellaswag_errors_name_the_line() {
        let bad = HS.replace("\n0\n", "\nx\n");
        match parse_hellaswag(&bad, "hs") {
            Err(EvalError::Malformed { line, .. }) => assert_eq!(line, 8),
            other => panic!("expected Malformed, got {other:?}"),
        }
        let bad = HS.replace("\n3\n", "\n7\n");
        assert!(matches!(parse_hellaswag(&bad, "hs"), Err(EvalError::Malformed { line: 2, .. })));
        let truncated: String = HS.lines().take(10).collect::<Vec<_>>().join("\n");
        assert!(matches!(parse_hellaswag(&truncated, "hs"), Err(EvalError::Malformed { line: 7, .. })));
    }

    #[test]
    fn arc_and_lambada_parse_and_reject() {
        let arc = "{\"query\": \"Question: Why?\", \"choices\": [\"a\", \"b\", \"c\", \"d\"], \"gold\": 2}\n\n{\"query\": \"Question: How?\", \"choices\": [\"x\", \"y\"], \"gold\": 0}\n";
        let items = parse_arc(arc, "arc").unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].context, "Question: Why?\nAnswer:");
        assert_eq!(items[0].endings[2], " c");
        assert_eq!(items[0].gold, 2);
        let bad = arc.replace("\"gold\": 0", "\"gold\": 5");
        assert!(matches!(parse_arc(&bad, "arc"), Err(EvalError::Malformed { line: 3, .. })));
        assert!(matches!(parse_arc("{not json", "arc"), Err(EvalError::Malformed { line: 1, .. })));

        let lam = "{\"context\": \"He opened the \", \"continuation\": \"door\"}\n{\"context\": \"x\", \"continuation\": \" \"}\n";
        match parse_lambada(lam, "lam") {
            Err(EvalError::Malformed { line, .. }) => assert_eq!(line, 2),
            other => panic!("expected Malformed, got {other:?}"),
        }
        let items = parse_lambada(lam.lines().next().unwrap(), "lam").unwrap();
        assert_eq!(items[0], LastWordItem { context: "He opened the".into(), target: "door".into() });
    }

    #[test]
    fn passkey_prompt_fits_the_target_and_places_the_needle() {
        // Whitespace-separated words stand in for tokens.
        let mut count = |s: &str| -> Result<usize> { Ok(s.split_whitespace().count()) };
        for &(target, depth) in &[(1000usize, 0.5f64), (2048, 0.0), (4096, 1.0), (300, 0.25)] {
            let p = passkey_prompt(target, depth, 12345, &mut count).unwrap();
            let n = count(&p.text).unwrap();
            let per = PASSKEY_FILLER.split_whitespace().count();
            assert!(n <= target && n + per > target, "target {target}: {n} words");
            assert!(p.text.ends_with("The pass key is"));
            let needle_at = p.text.find("The pass key is 12345").unwrap();
            let frac = needle_at as f64 / p.text.len() as f64;
            assert!((frac - depth).abs() < 0.05, "depth {depth}: needle at {frac}");
            assert_eq!(p.before, ((p.before + p.after) as f64 * depth).round() as usize);
        }
        assert!(passkey_prompt(5, 0.5, 1, &mut count).is_err());
        assert!(passkey_prompt(500, 1.5, 1, &mut count).is_err());
    }

    #[test]
    fn passkey_answers_are_checked_by_the_first_number() {
        assert!(passkey_answer_correct(" 12345. Remember", 12345));
        assert!(!passkey_answer_correct(" 1234. ", 12345));
        assert!(!passkey_answer_correct(" unknown", 12345));
        assert!(!passkey_answer_correct(" 123456", 12345));
    }

    #[test]
    fn splitmix_is_deterministic_and_in_range() {
        let mut a = SplitMix(42);
        let mut b = SplitMix(42);
        for _ in 0..100 {
            let x = a.range(10_000, 100_000);
            assert_eq!(x, b.range(10_000, 100_000));
            assert!((10_000..100_000).contains(&x));
        }
    }
}
