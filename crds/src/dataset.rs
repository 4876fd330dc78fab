//! `Dataset`: a cleaned, deduplicated, split and tokenized corpus in object storage.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::{
    conditions::{Condition, DatasetPhase},
    resources::Resources,
    store::{ObjectLocation, StoreAccess, URI_SCHEME_MESSAGE, URI_SCHEME_RULE},
};

/// What the Dataset is for.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum DatasetFormat {
    /// Plain documents joined by end-of-text tokens, for PretrainJobs.
    #[default]
    Pretraining,
    /// Instruction/response records rendered with a prompt template and a loss mask, for FinetuneJobs.
    Instruction,
}

/// File format of a source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum SourceFormat {
    /// One JSON object per line.
    #[serde(rename = "jsonl")]
    Jsonl,
    /// Zstandard-compressed JSON lines (the OpenWebText2 "plug and play" layout).
    #[serde(rename = "jsonl.zst")]
    JsonlZst,
    /// One JSON array of objects.
    #[serde(rename = "json")]
    Json,
    /// Apache Parquet (the Hugging Face layout of Wikipedia, Alpaca and others).
    #[serde(rename = "parquet")]
    Parquet,
    /// Plain UTF-8 text; documents are separated by one or more blank lines, and a WikiText
    /// article heading (a line ` = Title = `) starts a new one.
    #[serde(rename = "text")]
    Text,
    /// A JSON array of Alpaca records `{instruction, input, output}`.
    #[serde(rename = "alpaca-json")]
    AlpacaJson,
    /// A StackExchange `Posts.xml` dump; each question is joined with its answers.
    #[serde(rename = "stackexchange-xml")]
    StackexchangeXml,
}

/// How a list-valued quality field is reduced to one number.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Aggregate {
    /// The largest value (OpenWebText2's Reddit scores).
    #[default]
    Max,
    /// The smallest value.
    Min,
    /// The arithmetic mean.
    Mean,
    /// The sum.
    Sum,
}

/// A per-source quality threshold on a numeric field of each record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct QualityThreshold {
    /// Dotted path of the field, e.g. `meta.reddit_scores` in OpenWebText2 or `Score` in a StackExchange dump.
    #[schemars(length(min = 1, max = 256))]
    pub field: String,
    /// Records whose value is below this are dropped (and counted).
    pub minimum: f64,
    /// Reduction applied when the field holds a list. Default: `max`.
    #[serde(default)]
    pub aggregate: Aggregate,
}

/// What a source's unreadable data does to the run.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum OnError {
    /// Count each malformed record (invalid UTF-8, not JSON, the wrong shape) and skip it;
    /// keep the records of a file read before it breaks off (a truncated `jsonl.zst`, a cut
    /// XML dump, a damaged Parquet row group) and list the file in the report's
    /// `brokenFiles`.
    #[default]
    Skip,
    /// Fail the run (invalid data, exit 3) at the first malformed record or broken file,
    /// with a message naming the source, the file and the position.
    Fail,
}

fn default_text_field() -> String {
    "text".into()
}
fn default_weight() -> f64 {
    1.0
}

/// One input of the Dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// Name of the source, unique in the Dataset; used in stats and status.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("sources[].name must be a DNS label (lower-case letters, digits and '-')"))]
    pub name: String,
    /// Where to read: an `s3://` prefix or glob, an `https://` URL, or a `file://` path.
    #[x_kube(validation = Rule::new(URI_SCHEME_RULE).message(URI_SCHEME_MESSAGE))]
    #[schemars(length(min = 1, max = 2048))]
    pub uri: String,
    /// File format.
    pub format: SourceFormat,
    /// Object-store access for `uri`. Unset: the operator's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<StoreAccess>,
    /// Dotted path of the document text in each record. Default: `text`.
    #[serde(default = "default_text_field")]
    #[schemars(length(min = 1, max = 256))]
    pub text_field: String,
    /// Dotted path of the document URL, used by URL deduplication. Default: unset (no URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub url_field: Option<String>,
    /// Drop records whose quality field is below a minimum. Default: no threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<QualityThreshold>,
    /// Sampling weight of this source in the training mixture (> 0). Default: 1.
    #[serde(default = "default_weight")]
    #[x_kube(validation = Rule::new("double(self) > 0.0").message("sources[].weight must be greater than 0"))]
    pub weight: f64,
    /// What a malformed record or a file that breaks off does: `skip` counts it and goes
    /// on, `fail` fails the run. Default: `skip`.
    #[serde(default)]
    pub on_error: OnError,
}

/// A switchable quality rule (Gopher- and C4-style, as in datatrove).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum QualityRule {
    /// Gopher: word count within `[minWords, maxWords]`.
    GopherWordCount,
    /// Gopher: mean word length within `[minMeanWordLength, maxMeanWordLength]`.
    GopherMeanWordLength,
    /// Gopher: hash and ellipsis symbols per word at most `maxSymbolWordRatio`.
    GopherSymbolRatio,
    /// Gopher: at most 90% of lines start with a bullet, at most 30% end with an ellipsis.
    GopherBulletsEllipsis,
    /// Gopher: at least 80% of words contain a letter.
    GopherAlphabetic,
    /// Gopher: at least `minStopWords` English stop words.
    GopherStopWords,
    /// C4: drop lines that do not end in terminal punctuation.
    C4TerminalPunctuation,
    /// C4: drop lines with fewer than 3 words.
    C4ShortLines,
    /// C4: drop documents containing "lorem ipsum".
    C4LoremIpsum,
    /// C4: drop documents containing a curly brace (code, templates).
    C4CurlyBraces,
    /// C4: drop lines mentioning JavaScript.
    C4Javascript,
    /// C4: drop lines with cookie or privacy-policy boilerplate.
    C4Policy,
}

fn default_true() -> bool {
    true
}
fn default_min_words() -> i64 {
    50
}
fn default_max_words() -> i64 {
    100_000
}
fn default_min_mean_word_length() -> f64 {
    3.0
}
fn default_max_mean_word_length() -> f64 {
    10.0
}
fn default_max_symbol_word_ratio() -> f64 {
    0.1
}
fn default_min_stop_words() -> i64 {
    2
}

/// Text cleaning and quality filtering. Thresholds default to datatrove's Gopher and C4 filters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Cleaning {
    /// Convert HTML and markup to plain text. Default: true.
    #[serde(default = "default_true")]
    pub strip_html: bool,
    /// Normalise Unicode to NFC and remove control characters. Default: true.
    #[serde(default = "default_true")]
    pub normalize_unicode: bool,
    /// Remove boilerplate lines (navigation, cookie banners, "share this"). Default: true.
    #[serde(default = "default_true")]
    pub remove_boilerplate: bool,
    /// Documents shorter than this many characters after cleaning are dropped. Default: 0.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub min_length: i64,
    /// Documents longer than this many characters are dropped. Default: unset (no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_length: Option<i64>,
    /// Gopher word-count lower bound. Default: 50.
    #[serde(default = "default_min_words")]
    #[schemars(range(min = 0))]
    pub min_words: i64,
    /// Gopher word-count upper bound. Default: 100000.
    #[serde(default = "default_max_words")]
    #[schemars(range(min = 1))]
    pub max_words: i64,
    /// Gopher lower bound on mean word length. Default: 3.
    #[serde(default = "default_min_mean_word_length")]
    pub min_mean_word_length: f64,
    /// Gopher upper bound on mean word length. Default: 10.
    #[serde(default = "default_max_mean_word_length")]
    pub max_mean_word_length: f64,
    /// Gopher upper bound on symbols (`#`, `...`) per word. Default: 0.1.
    #[serde(default = "default_max_symbol_word_ratio")]
    pub max_symbol_word_ratio: f64,
    /// Gopher minimum number of stop words ("the", "be", "to", "of", "and", "that", "have", "with"). Default: 2.
    #[serde(default = "default_min_stop_words")]
    #[schemars(range(min = 0))]
    pub min_stop_words: i64,
    /// Quality rules to switch off. Default: none (all rules on for `pretraining`; for
    /// `instruction` Datasets only the length bounds and the HTML/Unicode cleaning apply).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub disable: Vec<QualityRule>,
}

impl Default for Cleaning {
    fn default() -> Self {
        Self {
            strip_html: true,
            normalize_unicode: true,
            remove_boilerplate: true,
            min_length: 0,
            max_length: None,
            min_words: default_min_words(),
            max_words: default_max_words(),
            min_mean_word_length: default_min_mean_word_length(),
            max_mean_word_length: default_max_mean_word_length(),
            max_symbol_word_ratio: default_max_symbol_word_ratio(),
            min_stop_words: default_min_stop_words(),
            disable: Vec::new(),
        }
    }
}

fn default_minhash_threshold() -> f64 {
    0.72
}
fn default_ngram() -> i64 {
    5
}
fn default_permutations() -> i64 {
    112
}

/// MinHash LSH near-duplicate detection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MinHash {
    /// Run this stage. Default: true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Estimated Jaccard similarity above which two documents are duplicates, in (0, 1).
    /// Bands and rows are derived from it and `permutations`. Default: 0.72 (14 bands × 8 rows).
    #[serde(default = "default_minhash_threshold")]
    #[x_kube(validation = Rule::new("double(self) > 0.0 && double(self) < 1.0").message("dedup.minhash.threshold must be in (0, 1)"))]
    pub threshold: f64,
    /// Words per shingle. Default: 5.
    #[serde(default = "default_ngram")]
    #[schemars(range(min = 1, max = 64))]
    pub ngram: i64,
    /// Hash permutations per signature. Default: 112.
    #[serde(default = "default_permutations")]
    #[schemars(range(min = 8, max = 1024))]
    pub permutations: i64,
    /// Check each candidate pair (two documents that share a band) by the exact Jaccard
    /// similarity of their shingle sets before joining them, so that no pair below
    /// `threshold` is merged directly (slower; fewer documents removed near the
    /// threshold). Default: false: every candidate pair is joined, as datatrove does, which
    /// gives datatrove's clusters.
    #[serde(default)]
    pub verify: bool,
}

impl Default for MinHash {
    fn default() -> Self {
        Self {
            enabled: true,
            threshold: default_minhash_threshold(),
            ngram: default_ngram(),
            permutations: default_permutations(),
            verify: false,
        }
    }
}

fn default_substring_min_length() -> i64 {
    50
}

/// Exact-substring deduplication (Lee et al. 2021): a suffix array over the corpus finds
/// spans repeated verbatim, which are removed from all but their first occurrence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubstringDedup {
    /// Run this stage. Default: false (it is the most expensive stage).
    #[serde(default)]
    pub enabled: bool,
    /// Shortest repeated span removed, in tokens. Default: 50.
    #[serde(default = "default_substring_min_length")]
    #[schemars(range(min = 8, max = 10000))]
    pub min_length: i64,
}

impl Default for SubstringDedup {
    fn default() -> Self {
        Self {
            enabled: false,
            min_length: default_substring_min_length(),
        }
    }
}

fn default_decontamination_ngram() -> i64 {
    13
}

/// Removal of test-split documents that share a long n-gram with the train split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Decontamination {
    /// Run this stage. Default: true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Length of the shared word n-gram that marks contamination. Default: 13.
    #[serde(default = "default_decontamination_ngram")]
    #[schemars(range(min = 4, max = 64))]
    pub ngram: i64,
}

impl Default for Decontamination {
    fn default() -> Self {
        Self {
            enabled: true,
            ngram: default_decontamination_ngram(),
        }
    }
}

/// Deduplication across all sources and across the train/test split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Dedup {
    /// Drop documents whose normalised URL was seen before. Default: true.
    #[serde(default = "default_true")]
    pub url: bool,
    /// Drop documents whose normalised text hashes the same as an earlier one. Default: true.
    #[serde(default = "default_true")]
    pub exact: bool,
    /// Near-duplicate detection with MinHash LSH.
    #[serde(default)]
    pub minhash: MinHash,
    /// Removal of long repeated substrings.
    #[serde(default)]
    pub substring: SubstringDedup,
    /// Test-split decontamination.
    #[serde(default)]
    pub decontamination: Decontamination,
}

impl Default for Dedup {
    fn default() -> Self {
        Self {
            url: true,
            exact: true,
            minhash: MinHash::default(),
            substring: SubstringDedup::default(),
            decontamination: Decontamination::default(),
        }
    }
}

fn default_test_size() -> f64 {
    0.0005
}
fn default_split_seed() -> i64 {
    2357
}

/// Document-level train/test split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Split {
    /// Share of documents held out for testing: a fraction in (0, 0.5], or a whole count ≥ 1.
    /// Default: 0.0005 (nanoGPT's OpenWebText split).
    #[serde(default = "default_test_size")]
    #[x_kube(validation = Rule::new("(double(self) > 0.0 && double(self) <= 0.5) || (double(self) >= 1.0 && double(int(self)) == double(self))").message("split.testSize must be a fraction in (0, 0.5] or a whole count >= 1"))]
    pub test_size: f64,
    /// Seed of the split. Default: 2357 (nanoGPT's).
    #[serde(default = "default_split_seed")]
    pub seed: i64,
}

impl Default for Split {
    fn default() -> Self {
        Self {
            test_size: default_test_size(),
            seed: default_split_seed(),
        }
    }
}

/// Which tokenizer to use.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum TokenizerKind {
    /// GPT-2's byte-level BPE (tiktoken `r50k_base`, 50,257 tokens).
    #[default]
    Gpt2,
    /// A Hugging Face `tokenizer.json` (Llama-family models); needs `uri`.
    Huggingface,
}

/// The tokenizer applied to every document.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.type != 'huggingface' || has(self.uri)").message("tokenizer.uri is required when tokenizer.type is huggingface").field_path(".uri"))]
pub struct TokenizerSpec {
    /// Tokenizer family. Default: `gpt2`.
    #[serde(default, rename = "type")]
    pub type_: TokenizerKind,
    /// URI of a `tokenizer.json` for `huggingface`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(URI_SCHEME_RULE).message(URI_SCHEME_MESSAGE))]
    #[schemars(length(min = 1, max = 2048))]
    pub uri: Option<String>,
    /// Object-store access for `uri`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<StoreAccess>,
}

/// Prompt template for instruction data.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum PromptTemplate {
    /// Stanford Alpaca's template, with and without an input.
    #[default]
    Alpaca,
}

fn default_max_seq_length() -> i64 {
    1024
}

/// How instruction records are rendered (for `format: instruction`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstructionSpec {
    /// Prompt template. Default: `alpaca`.
    #[serde(default)]
    pub prompt_template: PromptTemplate,
    /// Compute the loss on the response only (the prompt is masked). Default: true.
    #[serde(default = "default_true")]
    pub mask_prompt: bool,
    /// Longer examples are truncated (and counted). Default: 1024.
    #[serde(default = "default_max_seq_length")]
    #[schemars(range(min = 16, max = 1048576))]
    pub max_seq_length: i64,
}

impl Default for InstructionSpec {
    fn default() -> Self {
        Self {
            prompt_template: PromptTemplate::default(),
            mask_prompt: true,
            max_seq_length: default_max_seq_length(),
        }
    }
}

/// Build a training corpus: read sources, clean and filter, deduplicate, split, tokenize,
/// and publish token shards with a manifest to object storage.
// clippy mistakes the repeated `printcolumn(type_ = ...)` arguments for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "taper.dev",
    version = "v1alpha1",
    kind = "Dataset",
    namespaced,
    doc = "A Dataset is a cleaned, deduplicated, split and tokenized corpus in object storage.",
    status = "DatasetStatus",
    shortname = "ds",
    category = "taper",
    derive = "PartialEq",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Documents",
        type_ = "integer",
        json_path = ".status.documentsWritten"
    ),
    printcolumn(name = "Tokens", type_ = "integer", json_path = ".status.trainTokens"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DatasetSpec {
    /// `pretraining` (documents) or `instruction` (prompt/response records). Default: `pretraining`.
    #[serde(default)]
    pub format: DatasetFormat,
    /// Inputs, read in order; at least one, names unique.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new("size(self) >= 1").message("sources must list at least one source"))]
    #[x_kube(validation = Rule::new("self.all(s, self.exists_one(t, t.name == s.name))").message("sources[].name must be unique"))]
    pub sources: Vec<Source>,
    /// Cleaning and quality filters.
    #[serde(default)]
    pub cleaning: Cleaning,
    /// Deduplication methods.
    #[serde(default)]
    pub dedup: Dedup,
    /// Train/test split.
    #[serde(default)]
    pub split: Split,
    /// Tokenizer. Default: GPT-2 BPE.
    #[serde(default)]
    pub tokenizer: TokenizerSpec,
    /// Rendering of instruction records (only for `format: instruction`).
    #[serde(default)]
    pub instruction: InstructionSpec,
    /// Where shards, `manifest.json` and `stats.json` are published. Default: the operator's
    /// bucket, `<bucket>/<namespace>/datasets/<name>/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<ObjectLocation>,
    /// CPU, memory and placement of the prepare pod. Default: 2 CPUs, 8Gi, no GPU.
    #[serde(default)]
    pub resources: Resources,
    /// Trainer image that runs `taper prepare`. Default: the operator's configured image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: Option<String>,
}

/// Documents removed by each deduplication method.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DuplicateCounts {
    /// Documents whose URL was seen before.
    #[serde(default)]
    pub url: i64,
    /// Documents with identical normalised text.
    #[serde(default)]
    pub exact: i64,
    /// Near-duplicates removed by MinHash LSH.
    #[serde(default)]
    pub minhash: i64,
    /// Documents left empty by exact-substring deduplication (made only of repeated spans).
    #[serde(default)]
    pub substring: i64,
    /// Tokens removed by exact-substring deduplication.
    #[serde(default)]
    pub substring_tokens: i64,
    /// Test documents removed for sharing an n-gram with the train split.
    #[serde(default)]
    pub decontaminated: i64,
}

/// Observed state of a Dataset.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatasetStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: DatasetPhase,
    /// Conditions (`Progressing`, `Ready`, `Failed`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Documents read from all sources.
    #[serde(default)]
    pub documents_read: i64,
    /// Documents written to the train and test shards.
    #[serde(default)]
    pub documents_written: i64,
    /// Documents dropped, per filter (malformed records, quality threshold, each quality rule).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dropped: BTreeMap<String, i64>,
    /// Documents removed per deduplication method.
    #[serde(default)]
    pub duplicates: DuplicateCounts,
    /// Tokens in the train split.
    #[serde(default)]
    pub train_tokens: i64,
    /// Tokens in the test split.
    #[serde(default)]
    pub test_tokens: i64,
    /// URI of the published `manifest.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// sha256 over the manifest's shard checksums: identifies the dataset's content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// When preparation started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When preparation finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
}
