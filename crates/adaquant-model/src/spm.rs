//! SentencePiece (llama.cpp's `llama` tokenizer model) rebuilt from GGUF metadata: pieces with scores, byte
//! fallback (`<0xXX>` pieces), and control and user-defined pieces matched verbatim before the pieces are merged.
//!
//! The algorithm is llama.cpp's SPM tokenizer: the text (spaces written as `▁`) starts as one symbol per UTF-8
//! character; the adjacent pair whose concatenation is a piece with the highest score is merged (ties: leftmost
//! first) until no pair forms a piece; a final symbol that is not a piece becomes its bytes' `<0xXX>` pieces.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use crate::{ModelError, Result};

/// Token types of GGUF's `tokenizer.ggml.token_type`.
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;
const TYPE_BYTE: i64 = 6;

/// A SentencePiece vocabulary with scores.
#[derive(Debug, Clone)]
pub struct SpmVocab {
    pieces: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i64>,
    index: HashMap<String, u32>,
    bytes: [Option<u32>; 256],
    /// Control and user-defined pieces, longest first: matched verbatim in the text before merging.
    specials: Vec<(String, u32)>,
    add_space_prefix: bool,
}

#[derive(Debug)]
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// The larger bigram pops first: higher score, then the one further left.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score.total_cmp(&o.score).then_with(|| o.left.cmp(&self.left))
    }
}

#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl SpmVocab {
    /// A vocabulary from its pieces, scores and GGUF token types (1 normal, 3 control, 4 user-defined, 6 byte).
    pub fn new(pieces: Vec<String>, scores: Vec<f32>, types: Vec<i64>, add_space_prefix: bool) -> Result<SpmVocab> {
        if scores.len() != pieces.len() || types.len() != pieces.len() {
            return Err(ModelError::Tokenizer(format!(
                "{} pieces, {} scores and {} token types; they must be equally many",
                pieces.len(),
                scores.len(),
                types.len()
            )));
        }
        if pieces.len() > u32::MAX as usize {
            return Err(ModelError::Tokenizer("vocabulary too large".into()));
        }
        let mut index = HashMap::with_capacity(pieces.len());
        let mut bytes = [None; 256];
        let mut specials = Vec::new();
        for (id, p) in pieces.iter().enumerate() {
            let id = id as u32;
            // The first piece of a text wins, as in llama.cpp.
            index.entry(p.clone()).or_insert(id);
            match types[id as usize] {
                TYPE_BYTE => {
                    if let Some(b) = parse_byte_piece(p) {
                        bytes[b as usize].get_or_insert(id);
                    }
                }
                TYPE_CONTROL | TYPE_USER_DEFINED if !p.is_empty() => specials.push((p.clone(), id)),
                _ => {}
            }
        }
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        Ok(SpmVocab { pieces, scores, types, index, bytes, specials, add_space_prefix })
    }

    /// Number of pieces.
    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    /// True when there are no pieces.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// The id of piece `text`.
    pub fn piece_id(&self, text: &str) -> Option<u32> {
        self.index.get(text).copied()
    }

    /// The piece of `id`.
    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    /// Token ids of `text` (no BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let mut prev_special = true;
        for frag in self.partition(text) {
            match frag {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(t) => {
                    let mut s = String::with_capacity(t.len() + 3);
                    if self.add_space_prefix && prev_special {
                        s.push(' ');
                    }
                    s.push_str(t);
                    let s = s.replace(' ', "\u{2581}");
                    self.encode_piece_text(&s, &mut out)?;
                    prev_special = false;
                }
            }
        }
        Ok(out)
    }

    /// Splits `text` at every occurrence of a control or user-defined piece, longest pieces first.
    fn partition<'a>(&self, text: &'a str) -> Vec<Fragment<'a>> {
        let mut frags = vec![Fragment::Text(text)];
        if text.is_empty() {
            return Vec::new();
        }
        for (piece, id) in &self.specials {
            if !frags.iter().any(|f| matches!(f, Fragment::Text(t) if t.contains(piece.as_str()))) {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                match f {
                    Fragment::Text(t) => {
                        let mut rest = t;
                        while let Some(i) = rest.find(piece.as_str()) {
                            if i > 0 {
                                next.push(Fragment::Text(&rest[..i]));
                            }
                            next.push(Fragment::Token(*id));
                            rest = &rest[i + piece.len()..];
                        }
                        if !rest.is_empty() {
                            next.push(Fragment::Text(rest));
                        }
                    }
                    tok => next.push(tok),
                }
            }
            frags = next;
        }
        frags
    }

    fn try_bigram(
        &self,
        text: &str,
        syms: &[Symbol],
        left: Option<usize>,
        right: Option<usize>,
        q: &mut BinaryHeap<Bigram>,
    ) {
        let (Some(left), Some(right)) = (left, right) else { return };
        let (a, b) = (syms[left], syms[right]);
        let joined = &text[a.start..b.start + b.len];
        if let Some(&id) = self.index.get(joined) {
            q.push(Bigram { left, right, score: self.scores[id as usize], size: joined.len() });
        }
    }

    /// llama.cpp's SPM merge loop over `text` (spaces already written as `▁`).
    fn encode_piece_text(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut syms: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, ch)) in text.char_indices().enumerate() {
            syms.push(Symbol { start, len: ch.len_utf8(), prev: i.checked_sub(1), next: Some(i + 1) });
        }
        if let Some(last) = syms.last_mut() {
            last.next = None;
        } else {
            return Ok(());
        }
        let mut q = BinaryHeap::new();
        for i in 1..syms.len() {
            self.try_bigram(text, &syms, Some(i - 1), Some(i), &mut q);
        }
        while let Some(bg) = q.pop() {
            let (l, r) = (syms[bg.left], syms[bg.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != bg.size {
                continue;
            }
            syms[bg.left].len += r.len;
            syms[bg.right].len = 0;
            syms[bg.left].next = r.next;
            if let Some(n) = r.next {
                syms[n].prev = Some(bg.left);
            }
            self.try_bigram(text, &syms, syms[bg.left].prev, Some(bg.left), &mut q);
            self.try_bigram(text, &syms, Some(bg.left), syms[bg.left].next, &mut q);
        }
        let mut i = Some(0);
        while let Some(s) = i {
            let sym = syms[s];
            let piece = &text[sym.start..sym.start + sym.len];
            match self.index.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        let id = self.bytes[b as usize].ok_or_else(|| {
                            ModelError::Tokenizer(format!(
                                "`{piece}` is not in the vocabulary and there is no byte piece <0x{b:02X}> to fall back on"
                            ))
                        })?;
                        out.push(id);
                    }
                }
            }
            i = sym.next;
        }
        Ok(())
    }

    /// The text of `ids`: `▁` becomes a space and runs of byte pieces become their bytes (invalid UTF-8 as U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut bytes = Vec::new();
        for (pos, &id) in ids.iter().enumerate() {
            let piece = self.pieces.get(id as usize).ok_or(ModelError::TokenOutOfRange {
                id,
                pos,
                vocab: self.pieces.len(),
            })?;
            match self.types[id as usize] {
                TYPE_BYTE => match parse_byte_piece(piece) {
                    Some(b) => bytes.push(b),
                    None => bytes.extend_from_slice(piece.as_bytes()),
                },
                _ => bytes.extend_from_slice(piece.replace('\u{2581}', " ").as_bytes()),
            }
        }
        let mut s = String::from_utf8_lossy(&bytes).into_owned();
        if self.add_space_prefix && s.starts_with(' ') {
            s.remove(0);
        }
        Ok(s)
    }
}

enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

/// `<0xAB>` to the byte 0xAB.
fn parse_byte_piece(p: &str) -> Option<u8> {
    let hex = p.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary written out by hand: bytes, a few pieces with scores, one control and one user-defined piece.
    fn vocab() -> SpmVocab {
        let mut pieces: Vec<String> = vec!["<pad>".into(), "<eos>".into(), "<bos>".into(), "\n".into()];
        let mut types = vec![3, 3, 3, 4];
        let mut scores = vec![0.0; 4];
        for b in 0..=255u8 {
            pieces.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        for (p, s) in [("h", -1.0), ("e", -1.0), ("l", -1.0), ("o", -1.0), ("\u{2581}", -1.0), ("w", -1.0)] {
            pieces.push(p.into());
            types.push(1);
            scores.push(s);
        }
        // "ll" beats "he" (higher score) although "he" is further left; "hell" needs both.
        for (p, s) in [("he", -3.0), ("ll", -2.0), ("hell", -4.0), ("hello", -5.0), ("\u{2581}w", -2.5), ("lo", -2.2)] {
            pieces.push(p.into());
            types.push(1);
            scores.push(s);
        }
        SpmVocab::new(pieces, scores, types, false).unwrap()
    }

    fn ids(v: &SpmVocab, pieces: &[&str]) -> Vec<u32> {
        pieces.iter().map(|p| v.piece_id(p).unwrap_or_else(|| panic!("no piece {p}"))).collect()
    }

    #[test]
    fn merges_by_score_then_leftmost() {
        let v = vocab();
        // h e l l o: "ll" (-2.0) first, then "he" (-3.0) ("lo" cannot form: the l was merged), "hell", "hello".
        assert_eq!(v.encode("hello").unwrap(), ids(&v, &["hello"]));
        // h e l o: "lo" (-2.2) then "he" (-3.0); "helo" is not a piece.
        assert_eq!(v.encode("helo").unwrap(), ids(&v, &["he", "lo"]));
        // Spaces become ▁ and merge with the next character when a piece exists.
        assert_eq!(v.encode("hello wo").unwrap(), ids(&v, &["hello", "\u{2581}w", "o"]));
    }

    #[test]
    fn unknown_characters_fall_back_to_bytes_and_round_trip() {
        let v = vocab();
        let got = v.encode("hé\n").unwrap();
        let mut want = ids(&v, &["h", "<0xC3>", "<0xA9>"]);
        want.push(3);
        assert_eq!(got, want);
        assert_eq!(v.decode(&got).unwrap(), "hé\n");
        assert_eq!(v.decode(&v.encode("hello wo<eos>").unwrap()).unwrap(), "hello wo<eos>");
    }

    #[test]
    fn special_pieces_are_matched_verbatim() {
        let v = vocab();
        assert_eq!(v.encode("he<eos>lo").unwrap(), [ids(&v, &["he"]), vec![1], ids(&v, &["lo"])].concat());
        assert!(v.encode("").unwrap().is_empty());
    }

    #[test]
    fn mismatched_lengths_are_an_error() {
        assert!(SpmVocab::new(vec!["a".into()], vec![], vec![1], false).is_err());
    }
}
