//! Cleaning and quality filtering of documents, in the manner of datatrove's Gopher and C4
//! filters, with datatrove's defaults as ours (the thresholds live in the Dataset's
//! `cleaning` block; each rule can be switched off by name).
//!
//! Order, as in FineWeb's pipeline: text normalisation (NFC, control characters,
//! whitespace) and boilerplate-line removal, then the Gopher document rules on the
//! normalised text, then C4's line rules (which rewrite the text) and document rules.

use std::collections::BTreeSet;

use taper_crds::dataset::{Cleaning, QualityRule};
use unicode_normalization::UnicodeNormalization;

/// Gopher's stop words (datatrove's `STOP_WORDS`).
const STOP_WORDS: [&str; 8] = ["the", "be", "to", "of", "and", "that", "have", "with"];
/// C4's policy substrings (datatrove's `POLICY_SUBSTRINGS`).
const POLICY: [&str; 6] = [
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
];
/// Lines made of these (with little else) are navigation or sharing boilerplate.
const BOILERPLATE: [&str; 16] = [
    "skip to content",
    "skip to main content",
    "share this",
    "share on facebook",
    "share on twitter",
    "follow us",
    "sign in",
    "sign up",
    "log in",
    "subscribe",
    "all rights reserved",
    "click here",
    "read more",
    "back to top",
    "leave a comment",
    "previous post",
];
/// Longest line (in words) that boilerplate removal may drop.
const BOILERPLATE_MAX_WORDS: usize = 8;
/// C4: words longer than this mark a line as junk (datatrove's `max_word_length`).
const C4_MAX_WORD_LENGTH: usize = 1000;
/// C4: lines with fewer words are dropped.
const C4_MIN_WORDS_PER_LINE: usize = 3;
/// Gopher: largest share of lines starting with a bullet.
const MAX_BULLET_LINES: f64 = 0.9;
/// Gopher: largest share of lines ending with an ellipsis.
const MAX_ELLIPSIS_LINES: f64 = 0.3;
/// Gopher: smallest share of words with an alphabetic character.
const MIN_ALPHA_WORDS: f64 = 0.8;

/// The name of a rule as the spec and `stats.json` spell it (`gopherWordCount`, …).
pub fn rule_name(rule: QualityRule) -> String {
    rule.name().to_string()
}

/// Text normalisation: NFC, `\r\n` → `\n`, control and zero-width characters removed,
/// runs of spaces collapsed, trailing spaces trimmed, at most one blank line in a row.
pub fn normalize(text: &str, unicode: bool) -> String {
    let text: String = if unicode {
        text.nfc()
            .filter(|&c| {
                c == '\n'
                    || c == '\t'
                    || !(c.is_control() || matches!(c, '\u{200B}'..='\u{200D}' | '\u{FEFF}'))
            })
            .collect()
    } else {
        text.to_string()
    };
    let mut out = String::with_capacity(text.len());
    let mut blank = 0;
    for line in text.replace("\r\n", "\n").replace('\r', "\n").split('\n') {
        let line = line
            .split([' ', '\t'])
            .filter(|w| !w.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        if line.is_empty() {
            blank += 1;
            if blank > 1 || out.is_empty() {
                continue;
            }
        } else {
            blank = 0;
        }
        out.push_str(&line);
        out.push('\n');
    }
    out.trim_end().to_string()
}

/// Drop short lines that are navigation, sharing or account boilerplate.
pub fn remove_boilerplate(text: &str) -> String {
    text.lines()
        .filter(|line| {
            let words = line.split_whitespace().count();
            if words == 0 || words > BOILERPLATE_MAX_WORDS {
                return true;
            }
            let lower = line.to_lowercase();
            !BOILERPLATE.iter().any(|b| lower.contains(b))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// HTML or other markup to text: tags removed (with `<script>`/`<style>` contents),
/// block-level tags turned into line breaks, and the common entities decoded.
pub fn strip_html(text: &str) -> String {
    if !text.contains('<') && !text.contains('&') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('<') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        let Some(end) = after.find('>') else {
            out.push_str(after);
            rest = "";
            break;
        };
        let tag = after[1..end].trim().to_ascii_lowercase();
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        if name.is_empty() && !tag.starts_with('!') {
            // Not a tag ("a < b"): keep the character.
            out.push('<');
            rest = &after[1..];
            continue;
        }
        rest = &after[end + 1..];
        if (name == "script" || name == "style") && !tag.starts_with('/') {
            let close = format!("</{name}");
            match rest.to_ascii_lowercase().find(&close) {
                Some(j) => {
                    rest = &rest[j..];
                    if let Some(k) = rest.find('>') {
                        rest = &rest[k + 1..];
                    }
                }
                None => rest = "",
            }
            continue;
        }
        if matches!(
            name.as_str(),
            "p" | "br"
                | "div"
                | "li"
                | "tr"
                | "h1"
                | "h2"
                | "h3"
                | "h4"
                | "h5"
                | "h6"
                | "ul"
                | "ol"
                | "table"
                | "section"
                | "article"
                | "blockquote"
                | "pre"
                | "hr"
        ) {
            out.push('\n');
        }
    }
    out.push_str(rest);
    decode_entities(&out)
}

fn decode_entities(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        let end = after.find(';').filter(|&e| e <= 10);
        let decoded = end.and_then(|e| {
            let entity = &after[1..e];
            let c = match entity {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" | "#39" => Some('\''),
                "nbsp" => Some(' '),
                _ => entity
                    .strip_prefix("#x")
                    .or_else(|| entity.strip_prefix("#X"))
                    .and_then(|h| u32::from_str_radix(h, 16).ok())
                    .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                    .and_then(char::from_u32),
            };
            c.map(|c| (c, e))
        });
        match decoded {
            Some((c, e)) => {
                out.push(c);
                rest = &after[e + 1..];
            }
            None => {
                out.push('&');
                rest = &after[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn is_punctuation_word(w: &str) -> bool {
    w.chars().all(|c| {
        c.is_ascii_punctuation()
            || c.is_whitespace()
            || matches!(c, '…' | '–' | '—' | '“' | '”' | '‘' | '’')
    })
}

/// Why a document was dropped, or the text it keeps.
pub type Verdict = Result<String, QualityRule>;

/// The quality rules of one Dataset.
#[derive(Clone, Debug)]
pub struct QualityFilter {
    cfg: Cleaning,
    disabled: BTreeSet<QualityRule>,
}

impl QualityFilter {
    /// Rules from the spec. For `instruction` Datasets the quality rules are off (only the
    /// length bounds and text cleaning apply), as the CRD documents.
    pub fn new(cfg: &Cleaning, instruction: bool) -> Self {
        let mut disabled: BTreeSet<QualityRule> = cfg.disable.iter().copied().collect();
        if instruction {
            disabled.extend(ALL_RULES);
        }
        Self {
            cfg: cfg.clone(),
            disabled,
        }
    }

    fn on(&self, rule: QualityRule) -> bool {
        !self.disabled.contains(&rule)
    }

    /// Clean `text` (normalisation, markup, boilerplate) without judging it.
    pub fn clean(&self, text: &str) -> String {
        let mut t = if self.cfg.strip_html {
            strip_html(text)
        } else {
            text.to_string()
        };
        t = normalize(&t, self.cfg.normalize_unicode);
        if self.cfg.remove_boilerplate {
            t = remove_boilerplate(&t);
        }
        t
    }

    /// Apply the Gopher and C4 rules to cleaned text.
    pub fn judge(&self, text: &str) -> Verdict {
        self.gopher(text)?;
        self.c4(text)
    }

    fn gopher(&self, text: &str) -> Result<(), QualityRule> {
        use QualityRule::*;
        let words: Vec<&str> = text.split_whitespace().collect();
        let content: Vec<&str> = words
            .iter()
            .copied()
            .filter(|w| !is_punctuation_word(w))
            .collect();
        let n = content.len();
        let c = &self.cfg;
        if self.on(GopherWordCount)
            && (n < c.min_words.max(0) as usize || n > c.max_words.max(0) as usize)
        {
            return Err(GopherWordCount);
        }
        if self.on(GopherMeanWordLength) && n > 0 {
            let mean = content.iter().map(|w| w.chars().count()).sum::<usize>() as f64 / n as f64;
            if mean < c.min_mean_word_length || mean > c.max_mean_word_length {
                return Err(GopherMeanWordLength);
            }
        }
        if self.on(GopherSymbolRatio) && n > 0 {
            let hashes = text.matches('#').count() as f64;
            let ellipses = (text.matches("...").count() + text.matches('…').count()) as f64;
            if hashes / n as f64 > c.max_symbol_word_ratio
                || ellipses / n as f64 > c.max_symbol_word_ratio
            {
                return Err(GopherSymbolRatio);
            }
        }
        if self.on(GopherBulletsEllipsis) {
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            if !lines.is_empty() {
                let total = lines.len() as f64;
                let bullets = lines
                    .iter()
                    .filter(|l| l.trim_start().starts_with(['•', '-', '*', '●', '▪', '‣']))
                    .count() as f64;
                let ellipsis = lines
                    .iter()
                    .filter(|l| l.trim_end().ends_with("...") || l.trim_end().ends_with('…'))
                    .count() as f64;
                if bullets / total > MAX_BULLET_LINES || ellipsis / total > MAX_ELLIPSIS_LINES {
                    return Err(GopherBulletsEllipsis);
                }
            }
        }
        if self.on(GopherAlphabetic) && !words.is_empty() {
            let alpha = words
                .iter()
                .filter(|w| w.chars().any(char::is_alphabetic))
                .count() as f64;
            if alpha / (words.len() as f64) < MIN_ALPHA_WORDS {
                return Err(GopherAlphabetic);
            }
        }
        if self.on(GopherStopWords) {
            let stops = words
                .iter()
                .filter(|w| {
                    let w = w
                        .trim_matches(|c: char| !c.is_alphanumeric())
                        .to_lowercase();
                    STOP_WORDS.contains(&w.as_str())
                })
                .count();
            if (stops as i64) < c.min_stop_words {
                return Err(GopherStopWords);
            }
        }
        Ok(())
    }

    fn c4(&self, text: &str) -> Verdict {
        use QualityRule::*;
        let lower = text.to_lowercase();
        if self.on(C4LoremIpsum) && lower.contains("lorem ipsum") {
            return Err(C4LoremIpsum);
        }
        if self.on(C4CurlyBraces) && text.contains('{') {
            return Err(C4CurlyBraces);
        }
        let mut kept = Vec::new();
        let mut dropped_by: Option<QualityRule> = None;
        for line in text.lines() {
            let trimmed = line.trim();
            if trimmed.is_empty() {
                if kept.last().is_some_and(|l: &&str| !l.is_empty()) {
                    kept.push("");
                }
                continue;
            }
            let l = trimmed.to_lowercase();
            let verdict = if trimmed
                .split_whitespace()
                .any(|w| w.len() > C4_MAX_WORD_LENGTH)
            {
                Some(C4ShortLines)
            } else if self.on(C4TerminalPunctuation)
                && (!trimmed.ends_with(['.', '?', '!', '"', '\'', '”', '’'])
                    || trimmed.ends_with("..."))
            {
                Some(C4TerminalPunctuation)
            } else if self.on(C4ShortLines)
                && trimmed.split_whitespace().count() < C4_MIN_WORDS_PER_LINE
            {
                Some(C4ShortLines)
            } else if self.on(C4Javascript) && l.contains("javascript") {
                Some(C4Javascript)
            } else if self.on(C4Policy) && POLICY.iter().any(|p| l.contains(p)) {
                Some(C4Policy)
            } else {
                None
            };
            match verdict {
                Some(rule) => {
                    dropped_by.get_or_insert(rule);
                }
                None => kept.push(trimmed),
            }
        }
        while kept.last().is_some_and(|l| l.is_empty()) {
            kept.pop();
        }
        if kept.is_empty() {
            // Every line went: the document is dropped by the first rule that removed one.
            return Err(dropped_by.unwrap_or(C4ShortLines));
        }
        Ok(kept.join("\n"))
    }

    /// Length bounds (characters), applied to the final text.
    pub fn length_ok(&self, text: &str) -> bool {
        let n = text.chars().count() as i64;
        n >= self.cfg.min_length && self.cfg.max_length.is_none_or(|m| n <= m)
    }
}

/// Every quality rule.
pub const ALL_RULES: [QualityRule; 12] = [
    QualityRule::GopherWordCount,
    QualityRule::GopherMeanWordLength,
    QualityRule::GopherSymbolRatio,
    QualityRule::GopherBulletsEllipsis,
    QualityRule::GopherAlphabetic,
    QualityRule::GopherStopWords,
    QualityRule::C4TerminalPunctuation,
    QualityRule::C4ShortLines,
    QualityRule::C4LoremIpsum,
    QualityRule::C4CurlyBraces,
    QualityRule::C4Javascript,
    QualityRule::C4Policy,
];

#[cfg(test)]
mod tests {
    use super::*;

    fn filter() -> QualityFilter {
        QualityFilter::new(&Cleaning::default(), false)
    }

    fn prose(words: usize) -> String {
        let sentence = "The cat sat with the dog and looked at the garden of the house.";
        let per = sentence.split_whitespace().count();
        let mut s = String::new();
        for _ in 0..words.div_ceil(per) {
            s.push_str(sentence);
            s.push('\n');
        }
        s
    }

    #[test]
    fn normalises_text() {
        assert_eq!(
            normalize("e\u{301}te\u{200B}  x\r\n\r\n\r\n\r\ny\u{0007} ", true),
            "éte x\n\ny"
        );
    }

    #[test]
    fn strips_markup() {
        let html = "<html><head><style>p{color:red}</style><script>var a = 1 < 2;</script></head><body><p>Fish &amp; chips &#233;t&eacute;</p><div>a &lt; b</div></body></html>";
        let text = normalize(&strip_html(html), true);
        assert_eq!(text, "Fish & chips ét&eacute;\n\na < b");
    }

    #[test]
    fn removes_boilerplate_lines_only_when_short() {
        let t = "Skip to content\nA real paragraph that mentions how to subscribe to a newsletter in a long sentence here.\nShare this";
        assert_eq!(
            remove_boilerplate(t),
            "A real paragraph that mentions how to subscribe to a newsletter in a long sentence here."
        );
    }

    #[test]
    fn good_prose_passes_and_keeps_its_text() {
        let text = prose(60);
        assert_eq!(filter().judge(&text).as_deref(), Ok(text.trim_end()));
    }

    #[test]
    fn each_gopher_rule_fires() {
        use QualityRule::*;
        let f = filter();
        assert_eq!(f.judge("The cat sat with the dog."), Err(GopherWordCount));
        let long_words = "Incomprehensibilities notwithstanding, the extraordinarily ".repeat(30);
        assert_eq!(f.judge(&long_words), Err(GopherMeanWordLength));
        let hashes = format!("{} #tag #tag #tag #tag #tag #tag #tag #tag", prose(60));
        assert_eq!(f.judge(&hashes), Err(GopherSymbolRatio));
        let bullets = "- the item of the day and the night\n".repeat(20);
        assert_eq!(f.judge(&bullets), Err(GopherBulletsEllipsis));
        let numbers = format!("{} {}", prose(50), "2019-07-16 ".repeat(40));
        assert_eq!(f.judge(&numbers), Err(GopherAlphabetic));
        let no_stops = "Cats sit quietly in gardens watching birds fly over houses. ".repeat(10);
        assert_eq!(f.judge(&no_stops), Err(GopherStopWords));
    }

    #[test]
    fn c4_rules_drop_lines_and_documents() {
        use QualityRule::*;
        let f = filter();
        let text = format!(
            "{}Menu Home About\nPlease enable JavaScript to view the comments of the page.\nWe use cookies and our privacy policy applies to the site.",
            prose(60)
        );
        let kept = f.judge(&text).expect("kept");
        assert_eq!(kept, prose(60).trim_end());
        assert_eq!(
            f.judge(&format!("{}Lorem ipsum dolor sit amet.", prose(60))),
            Err(C4LoremIpsum)
        );
        assert_eq!(
            f.judge(&format!("{}function f() {{ return 1; }}", prose(60))),
            Err(C4CurlyBraces)
        );
    }

    #[test]
    fn rules_can_be_switched_off() {
        let cfg = Cleaning {
            disable: ALL_RULES.to_vec(),
            ..Cleaning::default()
        };
        let f = QualityFilter::new(&cfg, false);
        assert_eq!(f.judge("short {"), Ok("short {".into()));
        assert_eq!(rule_name(QualityRule::GopherWordCount), "gopherWordCount");
    }
}
