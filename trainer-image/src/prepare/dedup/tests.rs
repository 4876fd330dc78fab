//! Tests of deduplication: URL and content keys, MinHash against datatrove's values,
//! and clustering.

use super::*;

#[test]
fn default_parameters_are_14_bands_of_8_rows() {
    let p = MinHashParams::new(5, 112, 0.72);
    assert_eq!((p.bands, p.rows), (14, 8));
    assert!((p.lsh_threshold() - 0.719).abs() < 0.001);
}

#[test]
fn jaccard_of_sorted_sets() {
    assert_eq!(jaccard(&[1, 2, 3, 4], &[3, 4, 5, 6]), 2.0 / 6.0);
    assert_eq!(jaccard(&[], &[]), 0.0);
}

#[test]
fn urls_normalise() {
    assert_eq!(
        normalize_url("HTTP://www.Example.com:80/a/?utm_source=x&b=2&a=1#top"),
        "https://example.com/a/?a=1&b=2"
    );
    assert_eq!(
        normalize_url("https://example.com/a/"),
        "https://example.com/a"
    );
    assert_eq!(normalize_url("not a url"), "not a url");
}

#[test]
fn content_keys_ignore_whitespace_only() {
    assert_eq!(content_key("a  b\n c"), content_key("a b c "));
    assert_ne!(content_key("a b c"), content_key("A b c"));
}

#[test]
fn signatures_estimate_jaccard() {
    let m = MinHasher::new(MinHashParams::new(1, 256, 0.7));
    let h = |i: u64| xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes());
    let a: Vec<u64> = (0..1000).map(h).collect();
    let b: Vec<u64> = (250..1250).map(h).collect(); // Jaccard 750/1250 = 0.6
    let est = estimated_similarity(&m.signature(&a), &m.signature(&b));
    assert!((est - 0.6).abs() < 0.08, "estimate {est}");
}

#[test]
fn clusters_keep_the_first_document() {
    let p = MinHashParams::new(5, 112, 0.72);
    let m = MinHasher::new(p);
    let base = "the quick brown fox jumps over the lazy dog while the cat watches from the old wooden fence near the barn";
    let near = format!("{base} today");
    let other = "completely different words make up this sentence about rivers mountains and clouds drifting over valleys far away";
    let sets: Vec<Vec<u64>> = [base, other, &near, base]
        .iter()
        .map(|t| shingles(t, p.ngram))
        .collect();
    let sigs: Vec<Vec<u64>> = sets.iter().map(|s| m.signature(s)).collect();
    let clusters = near_duplicates(&sigs, p, |i, j| jaccard(&sets[i], &sets[j]) >= p.threshold);
    assert_eq!(clusters, Clusters(vec![0, 1, 0, 0]));
    assert_eq!(clusters.in_clusters(), vec![true, false, true, true]);
    assert!(clusters.kept(0) && clusters.kept(1) && !clusters.kept(2));
}

// The reference values below were printed by datatrove 0.10.1 (NumPy 2, xxhash 3.5):
//   MinhashDedupSignature(config=MinhashConfig()).parameters, .get_shingles(text),
//   .get_signature(shingles) and datatrove.utils.text.simplify_text(text).

#[test]
fn coefficients_are_datatroves() {
    let m = MinHasher::new(MinHashParams::new(5, 112, 0.72));
    let a: Vec<u64> = m.coefficients.iter().map(|c| c.0).collect();
    let b: Vec<u64> = m.coefficients.iter().map(|c| c.1).collect();
    assert_eq!(
        a[..3],
        [775169054918279404, 1758426461858698313, 2109959069025162]
    );
    assert_eq!(a[111], 223865076026037746);
    assert_eq!(
        b[..3],
        [
            1062448801025099917,
            1324811268927594100,
            1217488311597731462
        ]
    );
    assert_eq!(b[111], 1097409548522419201);
}

#[test]
fn the_ascii_path_agrees_with_the_unicode_one() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let alphabet: Vec<char> = "aZ09 .,;'\"-\t\n\r\x0b\x0c\x01\x1f\x7f#{}()?!Mq"
        .chars()
        .collect();
    for _ in 0..2_000 {
        let len = rng.random_range(0..40);
        let s: String = (0..len)
            .map(|_| alphabet[rng.random_range(0..alphabet.len())])
            .collect();
        assert_eq!(simplify_ascii(s.as_bytes()), simplify_unicode(&s), "{s:?}");
    }
    for x in [
        0u64,
        1,
        MERSENNE - 1,
        MERSENNE,
        MERSENNE + 1,
        u64::MAX,
        u64::MAX - 7,
    ] {
        assert_eq!(mod_mersenne(x), x % MERSENNE, "{x}");
    }
}

#[test]
fn text_is_simplified_as_datatrove_does() {
    assert_eq!(
        simplify("Héllo, WORLD! It's 3.14 — naïve café 1,000,000 monday\tMay  ¿Qué? 10km"),
        "hello world it s 0 naive cafe 0 0 monday may ¿que 0km"
    );
}

#[test]
fn shingles_and_signatures_are_datatroves() {
    let text = "The quick brown fox jumps over the lazy dog, again and again.";
    let sh = shingles(text, 5);
    assert_eq!(sh.len(), 8);
    for h in [
        7797000677988824208,
        4793414983259776074,
        7369512836458661087,
    ] {
        assert!(sh.contains(&h), "{h} missing from {sh:?}");
    }
    let sig = MinHasher::new(MinHashParams::new(5, 112, 0.72)).signature(&sh);
    assert_eq!(
        sig[..4],
        [
            85330943174081874,
            366011346326592937,
            302227827184868053,
            34440879854629237
        ]
    );
    assert_eq!(sig[111], 3963570588256049);
    assert!(shingles("only four words here", 5).is_empty());
}
