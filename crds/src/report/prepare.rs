//! What `taper prepare` reports: a [`PrepareReport`] (printed as one JSON line on stdout
//! and published as `stats.json`), with a closed set of reasons a document is dropped,
//! and the Dataset status the operator derives from it.

use std::{collections::BTreeMap, fmt, str::FromStr};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize};

use crate::{
    conditions::{
        Condition, ConditionReason, ConditionStatus, ConditionType, DatasetPhase, set_condition,
    },
    dataset::{DatasetStatus, DuplicateCounts, QualityRule},
};

/// Broken files listed in a report; [`PrepareReport::broken_files_total`] counts them all.
pub const BROKEN_FILES_LISTED: usize = 100;
/// Examples of dropped documents kept per reason.
pub const EXAMPLES_PER_REASON: usize = 3;
/// Characters kept of each example.
pub const EXAMPLE_CHARS: usize = 200;

/// Why a document was dropped. Serialised as its camelCase name; a quality rule's reason
/// is the rule's own name (`gopherWordCount`, `c4CurlyBraces`, …).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// The record could not be parsed (not JSON, wrong shape, missing text field).
    Malformed,
    /// The record's text is empty.
    Empty,
    /// An instruction record's instruction is empty.
    EmptyInstruction,
    /// An instruction record's output is empty.
    EmptyOutput,
    /// The source's `quality` threshold was not met.
    QualityThreshold,
    /// Nothing was left after cleaning.
    EmptyAfterCleaning,
    /// Its normalised URL was seen before.
    UrlDuplicate,
    /// Its normalised text was seen before.
    ExactDuplicate,
    /// A quality rule rejected it.
    Rule(QualityRule),
    /// Shorter than `minLength` or longer than `maxLength` characters after cleaning.
    Length,
    /// A MinHash near-duplicate of a document that was kept.
    NearDuplicate,
    /// A test document sharing a long n-gram with the train split.
    Contaminated,
    /// Made only of spans seen earlier (exact-substring dedup left nothing).
    SubstringDuplicate,
    /// An instruction example whose prompt alone fills `maxSeqLength`.
    PromptTooLong,
}

impl QualityRule {
    /// Every rule, in declaration order.
    pub const ALL: [QualityRule; 12] = [
        Self::GopherWordCount,
        Self::GopherMeanWordLength,
        Self::GopherSymbolRatio,
        Self::GopherBulletsEllipsis,
        Self::GopherAlphabetic,
        Self::GopherStopWords,
        Self::C4TerminalPunctuation,
        Self::C4ShortLines,
        Self::C4LoremIpsum,
        Self::C4CurlyBraces,
        Self::C4Javascript,
        Self::C4Policy,
    ];

    /// The rule's name as the spec spells it (`gopherWordCount`, …).
    pub fn name(self) -> &'static str {
        match self {
            Self::GopherWordCount => "gopherWordCount",
            Self::GopherMeanWordLength => "gopherMeanWordLength",
            Self::GopherSymbolRatio => "gopherSymbolRatio",
            Self::GopherBulletsEllipsis => "gopherBulletsEllipsis",
            Self::GopherAlphabetic => "gopherAlphabetic",
            Self::GopherStopWords => "gopherStopWords",
            Self::C4TerminalPunctuation => "c4TerminalPunctuation",
            Self::C4ShortLines => "c4ShortLines",
            Self::C4LoremIpsum => "c4LoremIpsum",
            Self::C4CurlyBraces => "c4CurlyBraces",
            Self::C4Javascript => "c4Javascript",
            Self::C4Policy => "c4Policy",
        }
    }
}

impl DropReason {
    /// Every reason that is not a quality rule.
    const PLAIN: [DropReason; 13] = [
        Self::Malformed,
        Self::Empty,
        Self::EmptyInstruction,
        Self::EmptyOutput,
        Self::QualityThreshold,
        Self::EmptyAfterCleaning,
        Self::UrlDuplicate,
        Self::ExactDuplicate,
        Self::Length,
        Self::NearDuplicate,
        Self::Contaminated,
        Self::SubstringDuplicate,
        Self::PromptTooLong,
    ];

    /// Every reason, quality rules included.
    pub fn all() -> impl Iterator<Item = DropReason> {
        Self::PLAIN
            .into_iter()
            .chain(QualityRule::ALL.into_iter().map(Self::Rule))
    }

    /// The reason's name in reports and statuses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Empty => "empty",
            Self::EmptyInstruction => "emptyInstruction",
            Self::EmptyOutput => "emptyOutput",
            Self::QualityThreshold => "qualityThreshold",
            Self::EmptyAfterCleaning => "emptyAfterCleaning",
            Self::UrlDuplicate => "urlDuplicate",
            Self::ExactDuplicate => "exactDuplicate",
            Self::Rule(rule) => rule.name(),
            Self::Length => "length",
            Self::NearDuplicate => "nearDuplicate",
            Self::Contaminated => "contaminated",
            Self::SubstringDuplicate => "substringDuplicate",
            Self::PromptTooLong => "promptTooLong",
        }
    }

    /// Whether the reason is a deduplication (counted in the status's `duplicates`).
    pub fn is_duplicate(self) -> bool {
        matches!(
            self,
            Self::UrlDuplicate
                | Self::ExactDuplicate
                | Self::NearDuplicate
                | Self::Contaminated
                | Self::SubstringDuplicate
        )
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A drop reason's name that is not one of [`DropReason::all`].
#[derive(Debug, thiserror::Error)]
#[error("unknown drop reason {0:?}")]
pub struct UnknownReason(pub String);

impl FromStr for DropReason {
    type Err = UnknownReason;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::all()
            .find(|r| r.name() == s)
            .ok_or_else(|| UnknownReason(s.to_string()))
    }
}

impl Serialize for DropReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for DropReason {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A change made to a record that was kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Normalization {
    /// An instruction record's placeholder input (`<noinput>`, `N/A`, …) made empty.
    PlaceholderInput,
}

/// A stage of `taper prepare`, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Stage {
    /// Reading the sources' records.
    Read,
    /// Markup, Unicode and boilerplate cleaning.
    Clean,
    /// Normalised-URL deduplication.
    UrlDedup,
    /// Exact-content deduplication.
    ExactDedup,
    /// The Gopher and C4 quality rules and the length limits.
    Quality,
    /// MinHash near-duplicate removal.
    MinhashDedup,
    /// The seeded train/test split.
    Split,
    /// Removal of test documents that share an n-gram with train.
    Decontaminate,
    /// Tokenization.
    Tokenize,
    /// Exact-substring deduplication over the token stream.
    SubstringDedup,
}

/// Documents into and out of one stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StageStats {
    /// The stage.
    pub name: Stage,
    /// Documents that entered the stage.
    pub documents_in: u64,
    /// Documents that left it.
    pub documents_out: u64,
    /// Wall-clock seconds the stage took.
    pub seconds: f64,
}

/// Per-source accounting: every document read is either kept or dropped for one reason.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceStats {
    /// Documents (records) read.
    pub read: u64,
    /// Documents in the output (train + test).
    pub kept: u64,
    /// Documents dropped, per reason.
    pub dropped: BTreeMap<DropReason, u64>,
}

/// An example of a dropped document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Example {
    /// Source it came from.
    pub source: String,
    /// Its first characters.
    pub text: String,
}

/// What exact-substring deduplication removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubstringStats {
    /// Shortest span removed, in tokens.
    pub min_length: u64,
    /// Tokens examined.
    pub tokens_in: u64,
    /// Tokens removed.
    pub tokens_removed: u64,
    /// Maximal runs of removed tokens.
    pub spans_removed: u64,
    /// Documents that lost tokens (those left empty included).
    pub documents_changed: u64,
    /// Suffix arrays built (one per chunk) and merged.
    pub chunks: u64,
}

/// A source file whose reading broke off before its end (a truncated `jsonl.zst`, a cut
/// XML dump, a damaged Parquet row group, bytes after a JSON array): the records read
/// before the break were kept. A file that breaks off fails the run instead when its
/// source says `onError: fail`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BrokenFile {
    /// The source it belongs to.
    pub source: String,
    /// The file (its path, or the object it was downloaded from).
    pub file: String,
    /// Records read from the file before the break (malformed ones included).
    pub records: u64,
    /// Where reading broke off, in bytes of the decoded stream: of the file itself, or of
    /// its decompressed content for `jsonl.zst`. Absent where the reader gives no byte
    /// position (Parquet, whose break is placed by `records`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub byte_offset: Option<u64>,
    /// What broke, as the reader says it.
    pub error: String,
}

/// What a prepare run did, per stage and per source: `stats.json`, and the JSON line
/// `taper prepare` prints on stdout for the operator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PrepareReport {
    /// Documents read from all sources (malformed records included).
    pub documents_read: u64,
    /// Documents read per source.
    pub documents_per_source: BTreeMap<String, u64>,
    /// Documents dropped, per reason.
    pub dropped: BTreeMap<DropReason, u64>,
    /// Per-source accounting.
    pub sources: BTreeMap<String, SourceStats>,
    /// Stages in order, with documents in and out.
    pub stages: Vec<StageStats>,
    /// A few dropped documents per reason (truncated to [`EXAMPLE_CHARS`]).
    pub examples: BTreeMap<DropReason, Vec<Example>>,
    /// Records changed but kept, per change.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub normalized: BTreeMap<Normalization, u64>,
    /// Instruction examples cut at `maxSeqLength` tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncated: Option<u64>,
    /// What exact-substring deduplication removed, when it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substring: Option<SubstringStats>,
    /// MinHash parameters used, when the stage ran: `[ngram, bands, rows]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minhash: Option<[usize; 3]>,
    /// Rows of StackExchange dumps that could not be parsed (rows, not documents).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub malformed_rows: u64,
    /// Files whose reading broke off before their end, the first
    /// [`BROKEN_FILES_LISTED`] of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub broken_files: Vec<BrokenFile>,
    /// Files (or Parquet row groups) whose reading broke off, all of them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub broken_files_total: u64,
    /// Documents in the train split.
    pub train_documents: u64,
    /// Documents in the test split.
    pub test_documents: u64,
    /// Tokens in the train split.
    pub train_tokens: u64,
    /// Tokens in the test split.
    pub test_tokens: u64,
    /// URI of the published `manifest.json` (absent in a dry run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// The published manifest's digest (absent in a dry run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

impl PrepareReport {
    /// Count a document of `source` dropped for `reason`; keep `text` as an example while
    /// the reason has fewer than [`EXAMPLES_PER_REASON`].
    pub fn drop_document(&mut self, source: &str, reason: DropReason, text: &str) {
        *self.dropped.entry(reason).or_default() += 1;
        *self
            .sources
            .entry(source.to_string())
            .or_default()
            .dropped
            .entry(reason)
            .or_default() += 1;
        let examples = self.examples.entry(reason).or_default();
        if examples.len() < EXAMPLES_PER_REASON && !text.is_empty() {
            examples.push(Example {
                source: source.to_string(),
                text: text.chars().take(EXAMPLE_CHARS).collect(),
            });
        }
    }

    /// Count a document of `source` that was kept (in train when `train`) as dropped for
    /// `reason` after all.
    pub fn unkeep(&mut self, source: &str, train: bool, reason: DropReason) {
        self.drop_document(source, reason, "");
        if let Some(s) = self.sources.get_mut(source) {
            s.kept = s.kept.saturating_sub(1);
        }
        let split = if train {
            &mut self.train_documents
        } else {
            &mut self.test_documents
        };
        *split = split.saturating_sub(1);
    }

    /// Whether a document dropped for `reason` would still be kept as an example.
    pub fn wants_example(&self, reason: DropReason) -> bool {
        self.examples
            .get(&reason)
            .is_none_or(|e| e.len() < EXAMPLES_PER_REASON)
    }

    /// Count `read` records read from `source`.
    pub fn record_read(&mut self, source: &str, read: u64) {
        self.documents_read += read;
        *self
            .documents_per_source
            .entry(source.to_string())
            .or_default() += read;
        self.sources.entry(source.to_string()).or_default().read += read;
    }

    /// Records read so far from `source`.
    pub fn read_from(&self, source: &str) -> u64 {
        self.sources.get(source).map_or(0, |s| s.read)
    }

    /// Record a file whose reading broke off (listed while fewer than
    /// [`BROKEN_FILES_LISTED`] are).
    pub fn broken_file(&mut self, broken: BrokenFile) {
        self.broken_files_total += 1;
        if self.broken_files.len() < BROKEN_FILES_LISTED {
            self.broken_files.push(broken);
        }
    }

    /// Count one change made to a kept record.
    pub fn normalize(&mut self, change: Normalization) {
        *self.normalized.entry(change).or_default() += 1;
    }

    /// Whether every document read is accounted for: kept or dropped for a reason.
    pub fn balanced(&self) -> bool {
        self.sources
            .values()
            .all(|s| s.read == s.kept + s.dropped.values().sum::<u64>())
    }

    /// Documents dropped for `reason`.
    pub fn dropped_for(&self, reason: DropReason) -> u64 {
        self.dropped.get(&reason).copied().unwrap_or(0)
    }

    /// Documents written to the train and test shards.
    pub fn documents_written(&self) -> u64 {
        self.train_documents + self.test_documents
    }

    /// A plain-text table of the stages and the reasons documents were dropped, for people.
    pub fn summary_table(&self) -> String {
        let mut out = String::from("stage            documents in  documents out  seconds\n");
        for st in &self.stages {
            let name = serde_json::to_value(st.name)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            out.push_str(&format!(
                "{:<16} {:>12}  {:>13}  {:>7.2}\n",
                name, st.documents_in, st.documents_out, st.seconds
            ));
        }
        out.push_str("\ndropped (reason)       documents\n");
        for (reason, n) in &self.dropped {
            out.push_str(&format!("{:<22} {n:>9}\n", reason.name()));
        }
        out.push_str(&format!(
            "\nkept: {} train + {} test documents; {} + {} tokens\n",
            self.train_documents, self.test_documents, self.train_tokens, self.test_tokens
        ));
        out
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl DatasetStatus {
    /// Record a finished prepare run: the counts of `report`, its manifest and digest, phase
    /// `Ready` with a `Ready=True, Published` condition, and the completion time `now`.
    pub fn record_published(&mut self, report: &PrepareReport, now: Time) {
        self.documents_read = count(report.documents_read);
        self.documents_written = count(report.documents_written());
        self.dropped = report
            .dropped
            .iter()
            .filter(|(reason, _)| !reason.is_duplicate())
            .map(|(reason, n)| (reason.name().to_string(), count(*n)))
            .collect();
        self.duplicates = DuplicateCounts {
            url: count(report.dropped_for(DropReason::UrlDuplicate)),
            exact: count(report.dropped_for(DropReason::ExactDuplicate)),
            minhash: count(report.dropped_for(DropReason::NearDuplicate)),
            substring: count(report.dropped_for(DropReason::SubstringDuplicate)),
            substring_tokens: count(report.substring.as_ref().map_or(0, |s| s.tokens_removed)),
            decontaminated: count(report.dropped_for(DropReason::Contaminated)),
        };
        self.train_tokens = count(report.train_tokens);
        self.test_tokens = count(report.test_tokens);
        self.manifest = report.manifest.clone();
        self.digest = report.digest.clone();
        self.phase = DatasetPhase::Ready;
        let mut message = format!(
            "{} of {} documents kept: {} train and {} test tokens",
            report.documents_written(),
            report.documents_read,
            report.train_tokens,
            report.test_tokens
        );
        if report.broken_files_total > 0 {
            message.push_str(&format!(
                "; {} source files broke off before their end, their records before the break kept (brokenFiles in stats.json)",
                report.broken_files_total
            ));
        }
        for (type_, status) in [
            (ConditionType::Ready, ConditionStatus::True),
            (ConditionType::Progressing, ConditionStatus::False),
        ] {
            set_condition(
                &mut self.conditions,
                Condition::new(type_, status, ConditionReason::Published, message.clone()),
                now.clone(),
            );
        }
        self.completion_time = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    #[test]
    fn every_reason_round_trips_through_its_name_and_names_are_unique() {
        let mut names = std::collections::HashSet::new();
        for reason in DropReason::all() {
            assert!(names.insert(reason.name()), "{} twice", reason.name());
            assert_eq!(reason.name().parse::<DropReason>().ok(), Some(reason));
            let json = serde_json::to_string(&reason).expect("serialise");
            assert_eq!(json, format!("\"{}\"", reason.name()));
        }
        assert_eq!(names.len(), 13 + QualityRule::ALL.len());
        assert!("nonsense".parse::<DropReason>().is_err());
    }

    #[test]
    fn rule_names_are_the_spec_spelling() {
        // The spec's `disable` list and the reasons must spell a rule the same way.
        for rule in QualityRule::ALL {
            assert_eq!(
                serde_json::to_value(rule).expect("serialise"),
                serde_json::Value::String(rule.name().into())
            );
        }
    }

    #[test]
    fn a_report_with_reason_keys_round_trips() {
        let mut r = PrepareReport::default();
        r.record_read("web", 5);
        r.drop_document("web", DropReason::Rule(QualityRule::C4CurlyBraces), "{x}");
        r.drop_document("web", DropReason::NearDuplicate, "dup");
        r.sources.get_mut("web").expect("web").kept = 3;
        r.train_documents = 3;
        assert!(r.balanced());
        let json = serde_json::to_string(&r).expect("serialise");
        assert!(json.contains("\"c4CurlyBraces\":1"), "{json}");
        let back: PrepareReport = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, r);
        assert!(
            serde_json::from_str::<PrepareReport>(&json.replace("c4CurlyBraces", "c4Curly"))
                .is_err(),
            "an unknown reason is refused"
        );
    }

    #[test]
    fn broken_files_are_listed_up_to_a_bound_and_counted_in_the_status_message() {
        let broken = |i: u64| BrokenFile {
            source: "web".into(),
            file: format!("/data/part-{i}.jsonl.zst"),
            records: i,
            byte_offset: i.is_multiple_of(2).then_some(i * 10),
            error: "incomplete frame".into(),
        };
        let mut r = PrepareReport::default();
        let json = serde_json::to_string(&r).expect("serialise");
        assert!(!json.contains("brokenFiles"), "absent while empty: {json}");
        for i in 0..BROKEN_FILES_LISTED as u64 + 5 {
            r.broken_file(broken(i));
        }
        assert_eq!(r.broken_files.len(), BROKEN_FILES_LISTED);
        assert_eq!(r.broken_files_total, BROKEN_FILES_LISTED as u64 + 5);
        let json = serde_json::to_value(&r).expect("serialise");
        assert_eq!(
            json["brokenFiles"][0],
            serde_json::json!({"source": "web", "file": "/data/part-0.jsonl.zst",
                "records": 0, "byteOffset": 0, "error": "incomplete frame"})
        );
        assert_eq!(
            json["brokenFiles"][1].get("byteOffset"),
            None,
            "no offset: absent"
        );
        let back: PrepareReport = serde_json::from_value(json.clone()).expect("parse");
        assert_eq!(back, r);
        let mut unknown = json;
        unknown["brokenFiles"][0]["offset"] = serde_json::json!(3);
        assert!(serde_json::from_value::<PrepareReport>(unknown).is_err());

        let mut status = DatasetStatus::default();
        status.record_published(&r, Time(Timestamp::from_second(100).expect("time")));
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == ConditionType::Ready)
            .expect("Ready");
        assert!(
            ready.message.ends_with(
                "; 105 source files broke off before their end, their records before the break kept (brokenFiles in stats.json)"
            ),
            "{}",
            ready.message
        );
    }

    #[test]
    fn the_status_splits_filters_from_duplicates() {
        let mut r = PrepareReport::default();
        r.record_read("a", 20);
        for (reason, n) in [
            (DropReason::Malformed, 1),
            (DropReason::Rule(QualityRule::GopherWordCount), 2),
            (DropReason::UrlDuplicate, 3),
            (DropReason::ExactDuplicate, 4),
            (DropReason::NearDuplicate, 5),
            (DropReason::Contaminated, 1),
            (DropReason::SubstringDuplicate, 1),
        ] {
            for _ in 0..n {
                r.drop_document("a", reason, "");
            }
        }
        r.train_documents = 2;
        r.test_documents = 1;
        r.train_tokens = 1000;
        r.test_tokens = 90;
        r.substring = Some(SubstringStats {
            tokens_removed: 77,
            ..SubstringStats::default()
        });
        r.manifest = Some("s3://b/ds/manifest.json".into());
        r.digest = Some("abc".into());
        let now = Time(Timestamp::from_second(100).expect("time"));
        let mut status = DatasetStatus::default();
        status.record_published(&r, now.clone());
        assert_eq!(status.documents_read, 20);
        assert_eq!(status.documents_written, 3);
        assert_eq!(
            status.dropped,
            BTreeMap::from([("gopherWordCount".into(), 2), ("malformed".into(), 1)])
        );
        assert_eq!(
            status.duplicates,
            DuplicateCounts {
                url: 3,
                exact: 4,
                minhash: 5,
                substring: 1,
                substring_tokens: 77,
                decontaminated: 1
            }
        );
        assert_eq!((status.train_tokens, status.test_tokens), (1000, 90));
        assert_eq!(status.manifest.as_deref(), Some("s3://b/ds/manifest.json"));
        assert_eq!(status.digest.as_deref(), Some("abc"));
        assert_eq!(status.phase, DatasetPhase::Ready);
        assert_eq!(status.completion_time, Some(now));
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == ConditionType::Ready)
            .expect("Ready");
        assert_eq!(
            (ready.status, ready.reason),
            (ConditionStatus::True, ConditionReason::Published)
        );
    }
}
