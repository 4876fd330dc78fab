//! Words for MinHash shingles, split as datatrove's English word tokenizer splits them:
//! spaCy's `spacy.blank("en")` tokenizer (special cases, then prefixes, suffixes and
//! infixes by its own patterns, in its own order), applied to text that
//! [`super::dedup::simplify`] already lower-cased and stripped of punctuation. The
//! patterns and special cases are generated from spaCy into `spacy_en.rs`.
//!
//! Two differences from spaCy: re-joining special cases that affix splitting cut apart
//! (its `_special_matcher`) is left out (of those special cases, only "‘s" can occur in
//! simplified text, where spaCy would keep "‘" and "s" together), and a whitespace-free
//! chunk over 2,000 bytes is one word, unsplit, to bound the time the patterns take.

use std::{cell::RefCell, collections::HashMap, sync::LazyLock};

use fancy_regex::Regex;

use super::spacy_en;

struct Rules {
    prefix: Regex,
    suffix: Regex,
    infix: Regex,
    url: Regex,
    specials: HashMap<&'static str, &'static [&'static str]>,
}

/// The generated patterns are constants, compiled by a unit test: they cannot fail here.
static RULES: LazyLock<Rules> = LazyLock::new(|| {
    let compile = |p: &str| Regex::new(p).expect("spaCy's patterns compile (unit-tested)");
    Rules {
        prefix: compile(spacy_en::PREFIX),
        suffix: compile(spacy_en::SUFFIX),
        infix: compile(spacy_en::INFIX),
        url: compile(spacy_en::URL),
        specials: spacy_en::SPECIALS.iter().copied().collect(),
    }
});

/// Longer whitespace-free chunks are one word (spaCy would split off their affixes).
const LONG_CHUNK: usize = 2_000;

/// Chunks per thread whose split is remembered (tens of MB at most).
const CACHE_ENTRIES: usize = 100_000;

/// A chunk's words, as byte ranges of the chunk.
type Spans = Box<[(u32, u32)]>;

thread_local! {
    /// The split of each chunk that needed the patterns: spaCy keeps the same cache, as
    /// the patterns are slow and words repeat.
    static CACHE: RefCell<HashMap<Box<str>, Spans>> = RefCell::new(HashMap::new());
}

/// Split simplified `text` into words, appending them to `out`.
pub fn split<'t>(text: &'t str, out: &mut Vec<&'t str>) {
    for chunk in text.split(char::is_whitespace).filter(|c| !c.is_empty()) {
        // Most words: lower-case ASCII letters, which no affix pattern splits. A chunk
        // longer than LONG_CHUNK bytes (a base64 blob, minified code) stays whole too:
        // the patterns would scan it again for every affix they strip.
        if chunk.len() > LONG_CHUNK
            || (chunk.bytes().all(|b| b.is_ascii_lowercase())
                && !RULES.specials.contains_key(chunk))
        {
            out.push(chunk);
            continue;
        }
        CACHE.with_borrow_mut(|cache| {
            if let Some(spans) = cache.get(chunk) {
                out.extend(spans.iter().map(|&(a, b)| &chunk[a as usize..b as usize]));
                return;
            }
            let before = out.len();
            tokenize(chunk, out);
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
            let base = chunk.as_ptr() as usize;
            let spans = out[before..]
                .iter()
                .map(|w| {
                    let a = w.as_ptr() as usize - base;
                    (a as u32, (a + w.len()) as u32)
                })
                .collect();
            cache.insert(chunk.into(), spans);
        });
    }
}

fn find_len(re: &Regex, s: &str) -> usize {
    match re.find(s) {
        Ok(Some(m)) => m.end() - m.start(),
        // A backtracking limit hit on a pathological word: no affix.
        _ => 0,
    }
}

/// spaCy's `Tokenizer._tokenize` for one whitespace-free chunk: `_split_affixes`, then
/// `_attach_tokens`, with special cases on and no `token_match`.
fn tokenize<'t>(chunk: &'t str, out: &mut Vec<&'t str>) {
    let rules = &*RULES;
    if let Some(tokens) = rules.specials.get(chunk) {
        push_special(chunk, tokens, out);
        return;
    }
    let mut prefixes: Vec<&str> = Vec::new();
    let mut suffixes: Vec<&str> = Vec::new();
    let mut string = chunk;
    let mut last_size = 0;
    while !string.is_empty() && string.len() != last_size {
        if rules.specials.contains_key(string) {
            break;
        }
        last_size = string.len();
        let pre_len = find_len(&rules.prefix, string);
        if pre_len != 0 {
            let minus_pre = &string[pre_len..];
            if !minus_pre.is_empty() && rules.specials.contains_key(minus_pre) {
                prefixes.push(&string[..pre_len]);
                string = minus_pre;
                break;
            }
        }
        let suf_len = find_len(&rules.suffix, &string[pre_len..]);
        if suf_len != 0 {
            let minus_suf = &string[..string.len() - suf_len];
            if !minus_suf.is_empty() && rules.specials.contains_key(minus_suf) {
                suffixes.push(&string[string.len() - suf_len..]);
                string = minus_suf;
                break;
            }
        }
        if pre_len != 0 && suf_len != 0 && pre_len + suf_len <= string.len() {
            prefixes.push(&string[..pre_len]);
            suffixes.push(&string[string.len() - suf_len..]);
            string = &string[pre_len..string.len() - suf_len];
        } else if pre_len != 0 {
            prefixes.push(&string[..pre_len]);
            string = &string[pre_len..];
        } else if suf_len != 0 {
            suffixes.push(&string[string.len() - suf_len..]);
            string = &string[..string.len() - suf_len];
        }
    }
    out.extend(prefixes);
    if !string.is_empty() {
        if let Some(tokens) = rules.specials.get(string) {
            push_special(string, tokens, out);
        } else if matches!(rules.url.find(string), Ok(Some(m)) if m.start() == 0) {
            out.push(string);
        } else {
            let mut start = 0;
            for m in rules.infix.find_iter(string).filter_map(Result::ok) {
                // spaCy skips an infix at the very start (`start_before_infixes`).
                if m.start() == 0 {
                    continue;
                }
                if m.start() != start {
                    out.push(&string[start..m.start()]);
                }
                if m.start() != m.end() {
                    out.push(m.as_str());
                }
                start = m.end();
            }
            if start < string.len() {
                out.push(&string[start..]);
            }
        }
    }
    out.extend(suffixes.into_iter().rev());
}

/// A special case's tokens, as slices of `s` (spaCy requires their concatenation to be
/// `s`; were it not, `s` stays whole).
fn push_special<'t>(s: &'t str, tokens: &[&str], out: &mut Vec<&'t str>) {
    if tokens.concat() != s {
        out.push(s);
        return;
    }
    let mut at = 0;
    for t in tokens {
        out.push(&s[at..at + t.len()]);
        at += t.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<&str> {
        let mut out = Vec::new();
        split(text, &mut out);
        out
    }

    #[test]
    fn the_generated_patterns_compile() {
        for p in [
            spacy_en::PREFIX,
            spacy_en::SUFFIX,
            spacy_en::INFIX,
            spacy_en::URL,
        ] {
            assert!(Regex::new(p).is_ok(), "{}", &p[..80.min(p.len())]);
        }
    }

    // Expected splits printed by datatrove 0.10.1's SpaCyTokenizer("en") (spaCy 3.8.x)
    // on simplify_text's output.
    #[test]
    fn words_split_as_spacy_splits_them() {
        let cases: &[(&str, &[&str])] = &[
            ("i dont think so", &["i", "do", "nt", "think", "so"]),
            ("cannot gonna im", &["can", "not", "gon", "na", "i", "m"]),
            (
                "¿que 0km 0° ‘what",
                &["¿", "que", "0", "km", "0", "°", "‘", "what"],
            ),
            ("0€ ©0 b0w0kt0g", &["0", "€", "©", "0", "b0w0kt0", "g"]),
            (
                "coordinate0°0′n \u{feff}0°n 0°0′0″e0°0′0″n 🌎🌍🌏 ☭kommunismia☭ a€¦ 转子槽分度α为0°",
                &[
                    "coordinate0",
                    "°",
                    "0′n",
                    "\u{feff}0",
                    "°",
                    "n",
                    "0",
                    "°",
                    "0′0″e0",
                    "°",
                    "0′0″n",
                    "🌎",
                    "🌍",
                    "🌏",
                    "☭",
                    "kommunismia",
                    "☭",
                    "a€",
                    "¦",
                    "转子槽分度α为0",
                    "°",
                ],
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(words(text), *expected, "{text}");
            // Again, from the cache.
            assert_eq!(words(text), *expected, "{text}, cached");
        }
    }

    #[test]
    fn lower_case_ascii_words_are_never_split_by_affixes() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for _ in 0..5_000 {
            let len = rng.random_range(1..12);
            let w: String = (0..len)
                .map(|_| (b'a' + rng.random_range(0..26u8)) as char)
                .collect();
            if RULES.specials.contains_key(w.as_str()) {
                continue;
            }
            let mut slow = Vec::new();
            tokenize(&w, &mut slow);
            assert_eq!(slow, [w.as_str()], "{w}");
        }
    }
}
