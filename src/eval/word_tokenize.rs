//! NLTK's `word_tokenize` (NLTK 3.10): Punkt sentence splitting with the trained English
//! parameters, then `NLTKWordTokenizer` (the improved Treebank rules) on every sentence. Fluency's
//! n-gram entropy counts these tokens, so the port follows NLTK rule by rule;
//! `tests/word_tokenize.rs` holds it to NLTK's own output on a few hundred texts
//! (`scripts/nltk/make_vectors.py` made them).
//!
//! Offsets are byte offsets into UTF-8 text; NLTK's are code-point offsets, which is the same
//! thing expressed differently, because every character Punkt inspects at a boundary is ASCII.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use fancy_regex::Regex as FancyRegex;
use regex::Regex;
use serde::Deserialize;

use crate::error::{Error, Result};

/// Splits `text` into NLTK word tokens.
///
/// # Errors
/// Only if the built-in Punkt parameters or patterns fail to load, which tests rule out.
pub fn word_tokenize(text: &str) -> Result<Vec<String>> {
    let (punkt, rules) = nltk()?;
    Ok(punkt
        .sentences(text)
        .into_iter()
        .flat_map(|sentence| rules.tokenize(sentence))
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Punkt sentence tokenizer (tokenisation only; the parameters are trained already)

#[derive(Deserialize)]
struct PunktFile {
    abbrev_types: Vec<String>,
    collocations: Vec<(String, String)>,
    sent_starters: Vec<String>,
    ortho_context: HashMap<String, u32>,
}

struct Punkt {
    abbrev_types: HashSet<String>,
    collocations: HashSet<(String, String)>,
    sent_starters: HashSet<String>,
    ortho_context: HashMap<String, u32>,
    word_re: FancyRegex,
    numeric_re: Regex,
    initial_re: Regex,
    ellipsis_re: Regex,
    realign_re: FancyRegex,
}

const ORTHO_BEG_UC: u32 = 1 << 1;
const ORTHO_MID_UC: u32 = 1 << 2;
const ORTHO_UNK_UC: u32 = 1 << 3;
const ORTHO_BEG_LC: u32 = 1 << 4;
const ORTHO_MID_LC: u32 = 1 << 5;
const ORTHO_UNK_LC: u32 = 1 << 6;
const ORTHO_UC: u32 = ORTHO_BEG_UC | ORTHO_MID_UC | ORTHO_UNK_UC;
const ORTHO_LC: u32 = ORTHO_BEG_LC | ORTHO_MID_LC | ORTHO_UNK_LC;

/// Characters that cannot appear within words (Punkt's `_re_non_word_chars`, English).
const NON_WORD: &str = r#"(?:[)";}\]\*:@'\({\[\u{2018}\u{2019}\u{201c}\u{201d}\u{ab}\u{bb}?!])"#;
const MULTI_CHAR: &str = r"(?:\-{2,}|\.{2,}|(?:\.\s){2,}\.)";
const WORD_START: &str = r#"[^\("`{\[:;&\#\*@\)}\]\-,]"#;

/// The built-in parameters and patterns, loaded once; a failure is kept and reported every time.
fn nltk() -> Result<&'static (Punkt, Treebank)> {
    static NLTK: OnceLock<std::result::Result<(Punkt, Treebank), String>> = OnceLock::new();
    NLTK.get_or_init(|| Ok((load_punkt()?, load_treebank()?)))
        .as_ref()
        .map_err(|e| Error::Invalid(e.clone()))
}

fn load_punkt() -> std::result::Result<Punkt, String> {
    let file: PunktFile = serde_json::from_str(include_str!("punkt_english.json"))
        .map_err(|e| format!("built-in punkt_english.json: {e}"))?;
    let word = format!(
        r"({MULTI_CHAR}|(?={WORD_START})\S+?(?=\s|$|{NON_WORD}|{MULTI_CHAR}|,(?=$|\s|{NON_WORD}|{MULTI_CHAR}))|\S)"
    );
    Ok(Punkt {
        abbrev_types: file.abbrev_types.into_iter().collect(),
        collocations: file.collocations.into_iter().collect(),
        sent_starters: file.sent_starters.into_iter().collect(),
        ortho_context: file.ortho_context,
        word_re: fancy(&word)?,
        numeric_re: plain(r"^-?[\.,]?\d[\d,\.-]*\.?$")?,
        initial_re: plain(r"^[^\W\d]\.$")?,
        ellipsis_re: plain(r"^\.\.+$")?,
        realign_re: fancy(
            "^[\"')\\]}\u{2018}\u{2019}\u{201c}\u{201d}\u{ab}\u{bb}]+?(?:\\s+|(?=--)|$)",
        )?,
    })
}

fn fancy(pattern: &str) -> std::result::Result<FancyRegex, String> {
    FancyRegex::new(pattern).map_err(|e| format!("built-in pattern {pattern:?}: {e}"))
}

fn plain(pattern: &str) -> std::result::Result<Regex, String> {
    Regex::new(pattern).map_err(|e| format!("built-in pattern {pattern:?}: {e}"))
}

/// A token with Punkt's annotations.
struct Token<'a> {
    tok: &'a str,
    kind: String,
    period_final: bool,
    sentbreak: bool,
    abbr: bool,
    ellipsis: bool,
}

enum Ortho {
    Starter,
    NotStarter,
    Unknown,
}

impl Token<'_> {
    fn type_no_period(&self) -> &str {
        if self.kind.chars().count() > 1 && self.kind.ends_with('.') {
            &self.kind[..self.kind.len() - 1]
        } else {
            &self.kind
        }
    }

    fn type_no_sentperiod(&self) -> &str {
        if self.sentbreak {
            self.type_no_period()
        } else {
            &self.kind
        }
    }

    fn first_upper(&self) -> bool {
        self.tok.chars().next().is_some_and(char::is_uppercase)
    }

    fn first_lower(&self) -> bool {
        self.tok.chars().next().is_some_and(char::is_lowercase)
    }
}

impl Punkt {
    fn token<'a>(&self, tok: &'a str) -> Token<'a> {
        Token {
            tok,
            kind: self
                .numeric_re
                .replace(&tok.to_lowercase(), "##number##")
                .into_owned(),
            period_final: tok.ends_with('.'),
            sentbreak: false,
            abbr: false,
            ellipsis: false,
        }
    }

    /// Punkt's word segmentation, line by line.
    fn words<'a>(&self, text: &'a str) -> Vec<Token<'a>> {
        let mut out = Vec::new();
        for line in text.split('\n') {
            if line.trim().is_empty() {
                continue;
            }
            for m in self.word_re.find_iter(line).flatten() {
                out.push(self.token(m.as_str()));
            }
        }
        out
    }

    fn annotate(&self, tokens: &mut [Token<'_>]) {
        for t in tokens.iter_mut() {
            self.first_pass(t);
        }
        for i in 0..tokens.len() {
            if i + 1 < tokens.len() {
                let (head, tail) = tokens.split_at_mut(i + 1);
                self.second_pass(&mut head[i], &tail[0]);
            }
        }
    }

    fn first_pass(&self, t: &mut Token<'_>) {
        let tok = t.tok;
        if matches!(tok, "." | "?" | "!") {
            t.sentbreak = true;
        } else if self.ellipsis_re.is_match(tok) {
            t.ellipsis = true;
        } else if t.period_final && !tok.ends_with("..") {
            let stem = tok[..tok.len() - 1].to_lowercase();
            let last_part = stem.rsplit('-').next().unwrap_or("");
            if self.abbrev_types.contains(&stem) || self.abbrev_types.contains(last_part) {
                t.abbr = true;
            } else {
                t.sentbreak = true;
            }
        }
    }

    fn ortho_heuristic(&self, t: &Token<'_>) -> Ortho {
        if matches!(t.tok, ";" | ":" | "," | "." | "!" | "?") {
            return Ortho::NotStarter;
        }
        let ctx = self.ortho(t.type_no_sentperiod());
        if t.first_upper() && ctx & ORTHO_LC != 0 && ctx & ORTHO_MID_UC == 0 {
            return Ortho::Starter;
        }
        if t.first_lower() && (ctx & ORTHO_UC != 0 || ctx & ORTHO_BEG_LC == 0) {
            return Ortho::NotStarter;
        }
        Ortho::Unknown
    }

    fn ortho(&self, kind: &str) -> u32 {
        self.ortho_context.get(kind).copied().unwrap_or(0)
    }

    fn second_pass(&self, t1: &mut Token<'_>, t2: &Token<'_>) {
        if !t1.period_final {
            return;
        }
        let typ = t1.type_no_period().to_string();
        let next_typ = t2.type_no_sentperiod();
        let is_initial = self.initial_re.is_match(t1.tok);
        if self
            .collocations
            .contains(&(typ.clone(), next_typ.to_string()))
        {
            t1.sentbreak = false;
            t1.abbr = true;
            return;
        }
        if (t1.abbr || t1.ellipsis) && !is_initial {
            match self.ortho_heuristic(t2) {
                Ortho::Starter => {
                    t1.sentbreak = true;
                    return;
                }
                _ if t2.first_upper() && self.sent_starters.contains(next_typ) => {
                    t1.sentbreak = true;
                    return;
                }
                _ => {}
            }
        }
        if is_initial || typ == "##number##" {
            match self.ortho_heuristic(t2) {
                Ortho::NotStarter => {
                    t1.sentbreak = false;
                    t1.abbr = true;
                }
                Ortho::Unknown
                    if is_initial && t2.first_upper() && self.ortho(next_typ) & ORTHO_LC == 0 =>
                {
                    t1.sentbreak = false;
                    t1.abbr = true;
                }
                _ => {}
            }
        }
    }

    /// Whether `context` holds a sentence break followed by another token.
    fn contains_sentbreak(&self, context: &str) -> bool {
        let mut tokens = self.words(context);
        self.annotate(&mut tokens);
        let mut found = false;
        for t in &tokens {
            if found {
                return true;
            }
            found |= t.sentbreak;
        }
        false
    }

    /// Candidate sentence ends (`.`, `?`, `!` followed by punctuation or by whitespace and a
    /// token): `(end of the mark, start of the next token if any, the context to decide on)`.
    fn end_contexts(&self, text: &str) -> Vec<(usize, Option<usize>, String)> {
        let mut out = Vec::new();
        let mut previous: Option<(usize, usize, Option<usize>, String)> = None; // (start, end, next, after)
        let mut previous_slice = (0usize, 0usize);
        // The word before the mark, the mark, and what follows it: what Punkt decides on.
        let context = |word: (usize, usize), mark_start: usize, mark_end: usize, after: &str| {
            format!(
                "{}{}{after}",
                &text[word.0..word.1],
                &text[mark_start..mark_end]
            )
        };
        for (start, c) in text.char_indices() {
            if !matches!(c, '.' | '?' | '!') {
                continue;
            }
            let end = start + 1;
            let rest = &text[end..];
            let Some((after, next)) = after_token(rest) else {
                continue;
            };
            let before = &text[previous_slice.1..start];
            let last_space = last_whitespace_index(before);
            let word_start = if last_space > 0 {
                last_space + previous_slice.1 + 1
            } else {
                previous_slice.0
            };
            if let Some((p_start, p_end, p_next, p_after)) = previous.take() {
                if previous_slice.1 <= word_start {
                    out.push((
                        p_end,
                        p_next,
                        context(previous_slice, p_start, p_end, &p_after),
                    ));
                }
            }
            previous = Some((start, end, next.map(|n| end + n), after.to_string()));
            previous_slice = (word_start, start);
        }
        if let Some((p_start, p_end, p_next, p_after)) = previous {
            out.push((
                p_end,
                p_next,
                context(previous_slice, p_start, p_end, &p_after),
            ));
        }
        out
    }

    fn slices(&self, text: &str) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut last_break = 0;
        for (end, next, context) in self.end_contexts(text) {
            if self.contains_sentbreak(&context) {
                out.push((last_break, end));
                last_break = next.unwrap_or(end);
            }
        }
        out.push((last_break, text.trim_end().len()));
        out
    }

    /// NLTK's `sentences_from_text` with boundary realignment (closing quotes and brackets after
    /// a sentence end stay with that sentence).
    fn sentences<'a>(&self, text: &'a str) -> Vec<&'a str> {
        let slices = self.slices(text);
        let mut out = Vec::new();
        let mut realign = 0;
        for (i, &(start, stop)) in slices.iter().enumerate() {
            let start = start + realign;
            let Some(&(next_start, next_stop)) = slices.get(i + 1) else {
                if start < stop {
                    out.push(&text[start..stop]);
                }
                continue;
            };
            let following = &text[next_start..next_stop.max(next_start)];
            match self.realign_re.find(following).ok().flatten() {
                Some(m) => {
                    let kept = m.as_str().trim_end().len();
                    out.push(&text[start..next_start + kept]);
                    realign = m.end();
                }
                None => {
                    realign = 0;
                    if start < stop {
                        out.push(&text[start..stop]);
                    }
                }
            }
        }
        out
    }
}

/// What follows a sentence-end mark in Punkt's period context: a non-word character, or
/// whitespace and the next token; `(after_tok, offset of the next token in rest)`.
fn after_token(rest: &str) -> Option<(&str, Option<usize>)> {
    let first = rest.chars().next()?;
    if matches!(
        first,
        ')' | '"'
            | ';'
            | '}'
            | ']'
            | '*'
            | ':'
            | '@'
            | '\''
            | '('
            | '{'
            | '['
            | '\u{2018}'
            | '\u{2019}'
            | '\u{201c}'
            | '\u{201d}'
            | '\u{ab}'
            | '\u{bb}'
            | '?'
            | '!'
    ) {
        return Some((&rest[..first.len_utf8()], None));
    }
    let ws = rest.len() - rest.trim_start().len();
    if ws == 0 {
        return None;
    }
    let token = rest[ws..]
        .split(char::is_whitespace)
        .next()
        .filter(|t| !t.is_empty())?;
    Some((&rest[..ws + token.len()], Some(ws)))
}

/// Python's `_get_last_whitespace_index`: the index of the last ASCII whitespace, or 0.
fn last_whitespace_index(text: &str) -> usize {
    text.bytes()
        .rposition(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c))
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// NLTKWordTokenizer

struct Rule {
    re: FancyRegex,
    with: &'static str,
}

fn rule(pattern: &str, with: &'static str) -> std::result::Result<Rule, String> {
    Ok(Rule {
        re: fancy(pattern)?,
        with,
    })
}

struct Treebank {
    starting_quotes: Vec<Rule>,
    punctuation: Vec<Rule>,
    parens: Rule,
    double_dashes: Rule,
    ending_quotes: Vec<Rule>,
    contractions: Vec<Rule>,
}

fn load_treebank() -> std::result::Result<Treebank, String> {
    Ok(Treebank {
        starting_quotes: [
            rule("([\u{ab}\u{201c}\u{2018}\u{201e}]|[`]+)", " ${1} "),
            rule(r#"^""#, "``"),
            rule("(``)", " ${1} "),
            rule(r#"([ \(\[{<])("|'{2})"#, "${1} `` "),
            rule(r"(?i)(?<!\w)(')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)", "${1} "),
        ]
        .into_iter()
        .collect::<std::result::Result<_, _>>()?,
        punctuation: [
            rule(
                "([^\\.])(\\.)((?>[\\]\\)}>\"'\u{bb}\u{201d}\u{2019} ]*))\\s*$",
                "${1} ${2} ${3} ",
            ),
            rule(r"([:,])([^\d])", " ${1} ${2}"),
            rule(r"([:,])$", " ${1} "),
            rule(r"\.{2,}", " ${0} "),
            rule(r"[;@#$%&]", " ${0} "),
            rule("[\u{2012}-\u{2015}]", " ${0} "),
            rule(r#"([^\.])(\.)([\]\)}>"']*)\s*$"#, "${1} ${2}${3} "),
            rule(r"[?!]", " ${0} "),
            rule(r"([^'])' ", "${1} ' "),
            rule(r"[*]", " ${0} "),
        ]
        .into_iter()
        .collect::<std::result::Result<_, _>>()?,
        parens: rule(r"[\]\[\(\)\{\}<>]", " ${0} ")?,
        double_dashes: rule("--", " -- ")?,
        ending_quotes: [
            rule("([\u{bb}\u{201d}\u{2019}])", " ${1} "),
            rule("''", " '' "),
            rule("\"", " '' "),
            rule(r"\s+", " "),
            rule(r"([^' ])('[sS]|'[mM]|'[dD]|') ", "${1} ${2} "),
            rule(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", "${1} ${2} "),
        ]
        .into_iter()
        .collect::<std::result::Result<_, _>>()?,
        contractions: [
            r"(?i)\b(can)(not)\b",
            r"(?i)\b(d)('ye)\b",
            r"(?i)\b(gim)(me)\b",
            r"(?i)\b(gon)(na)\b",
            r"(?i)\b(got)(ta)\b",
            r"(?i)\b(lem)(me)\b",
            r"(?i)\b(more)('n)\b",
            r"(?i)\b(wan)(na)(?=\s)",
            r"(?i) ('t)(is)\b",
            r"(?i) ('t)(was)\b",
        ]
        .into_iter()
        .map(|p| rule(p, " ${1} ${2} "))
        .collect::<std::result::Result<_, _>>()?,
    })
}

fn apply(rules: &[Rule], mut text: String) -> String {
    for r in rules {
        text = r.re.replace_all(&text, r.with).into_owned();
    }
    text
}

impl Treebank {
    /// `NLTKWordTokenizer().tokenize(sentence)`.
    fn tokenize(&self, sentence: &str) -> Vec<String> {
        let t = self;
        let text = apply(&t.starting_quotes, sentence.to_string());
        let text = apply(&t.punctuation, text);
        let text = apply(std::slice::from_ref(&t.parens), text);
        let text = apply(std::slice::from_ref(&t.double_dashes), text);
        let text = apply(&t.ending_quotes, format!(" {text} "));
        let text = apply(&t.contractions, text);
        text.split_whitespace().map(str::to_string).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nltk_docstring_example() {
        let s = "Good muffins cost $3.88\nin New York.  Please buy me\ntwo of them.\n\nThanks.";
        let want = [
            "Good", "muffins", "cost", "$", "3.88", "in", "New", "York", ".", "Please", "buy",
            "me", "two", "of", "them", ".", "Thanks", ".",
        ];
        assert_eq!(word_tokenize(s).unwrap(), want);
    }
}
