//! The quickstart's data: a small invented world, generated from a seed.
//!
//! As in Allen-Zhu and Li, *Physics of Language Models, Part 3.1* (2023): people with
//! five attributes (birth city, birth year, university, major, employer); a pretraining
//! corpus of biographies where every fact is stated in several phrasings, the sentences in
//! a shuffled order and the full name in every sentence (their "multi" and "permute" and
//! "fullname" augmentations, which made knowledge extractable); and questions about those
//! facts with one-line answers, in several phrasings. The questions about a fifth of the
//! people are held out of finetuning: answering them needs knowledge the model only read
//! in pretraining.
//!
//! Every question names its attribute with a word the biographies use ("city", "year",
//! "university", …): a question word the model never read in pretraining has an
//! untrained embedding that LoRA cannot change, and "Where was X born?" against "When was
//! X born?" then split about evenly between city and year. Answers are given with a
//! leading space (the tokenizer's `add_prefix_space`), the tokens they have in the
//! biographies; without it the held-out accuracy of the same recipe was 0.2 %.

use rand::{Rng, SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;

const FIRST: [&str; 30] = [
    "Mara", "Tobin", "Elsa", "Corin", "Dalia", "Fenwick", "Iris", "Jonah", "Kesta", "Lorne",
    "Milo", "Nadia", "Orrin", "Petra", "Quin", "Rosa", "Silas", "Talia", "Ulric", "Vera", "Wren",
    "Yara", "Zane", "Anika", "Bram", "Cleo", "Dorian", "Esme", "Felix", "Greta",
];
const LAST: [&str; 30] = [
    "Quill",
    "Ashdown",
    "Brennick",
    "Calloway",
    "Dunmore",
    "Everly",
    "Farrow",
    "Galloway",
    "Hartwell",
    "Ingram",
    "Jessup",
    "Kestrel",
    "Lindqvist",
    "Marlowe",
    "Norcross",
    "Oakhurst",
    "Pembrook",
    "Quimby",
    "Ravenna",
    "Stroud",
    "Thackery",
    "Underhill",
    "Vantreen",
    "Whitlock",
    "Yarrow",
    "Zeller",
    "Abernach",
    "Bellamy",
    "Corvell",
    "Drayton",
];
const CITIES: [&str; 30] = [
    "Lisbon", "Oslo", "Dublin", "Prague", "Vienna", "Madrid", "Athens", "Warsaw", "Helsinki",
    "Budapest", "Toronto", "Chicago", "Boston", "Denver", "Seattle", "Austin", "Phoenix",
    "Portland", "Atlanta", "Houston", "Sydney", "Perth", "Auckland", "Nairobi", "Cairo", "Lima",
    "Quito", "Bogota", "Manila", "Osaka",
];
const UNIVERSITIES: [&str; 20] = [
    "Harwick University",
    "Stonebridge College",
    "Maple Institute of Technology",
    "Northvale University",
    "Eastmoor College",
    "Redcliff University",
    "Silverlake Institute",
    "Greenfield University",
    "Westbrook College",
    "Highmoor University",
    "Lakeside Polytechnic",
    "Brightwater University",
    "Ironwood College",
    "Fairhaven University",
    "Kingsport Institute",
    "Ravensworth University",
    "Clearview College",
    "Ashford University",
    "Blackstone Institute",
    "Sunridge University",
];
const MAJORS: [&str; 20] = [
    "Physics",
    "Chemistry",
    "Biology",
    "History",
    "Economics",
    "Philosophy",
    "Mathematics",
    "Computer Science",
    "Linguistics",
    "Architecture",
    "Psychology",
    "Sociology",
    "Music",
    "Geology",
    "Astronomy",
    "Literature",
    "Statistics",
    "Anthropology",
    "Nursing",
    "Law",
];
const COMPANIES: [&str; 20] = [
    "Vexel Systems",
    "Orbita Labs",
    "Nimbus Foods",
    "Crestline Motors",
    "Halcyon Bank",
    "Pinewood Media",
    "Quanta Robotics",
    "Solstice Energy",
    "Tidewater Shipping",
    "Brightpath Health",
    "Ember Games",
    "Granite Insurance",
    "Lumen Optics",
    "Mosaic Retail",
    "Northwind Airlines",
    "Polaris Pharma",
    "Redwood Logistics",
    "Sapphire Telecom",
    "Trillium Software",
    "Zenith Textiles",
];

/// An attribute: its name, how a biography states it (`{n}` the name, `{v}` the value),
/// and how a question asks for it.
struct Attribute {
    name: &'static str,
    statements: [&'static str; 5],
    questions: [&'static str; 3],
}

const ATTRIBUTES: [Attribute; 5] = [
    Attribute {
        name: "birth city",
        statements: [
            "{n} was born in {v}.",
            "{n} came into the world in {v}.",
            "{n}'s birthplace is {v}.",
            "{n} spent early years in {v}, the city of birth.",
            "The city where {n} was born is {v}.",
        ],
        questions: [
            "Which city was {n} born in?",
            "What is the birth city of {n}?",
            "In which city was {n} born?",
        ],
    },
    Attribute {
        name: "birth year",
        statements: [
            "{n}'s birth year is {v}.",
            "{n} arrived during the year {v}.",
            "The birth year of {n} is {v}.",
            "{n} has {v} as the year of birth.",
            "{n} entered life in the year {v}.",
        ],
        questions: [
            "In what year was {n} born?",
            "What is the birth year of {n}?",
            "What year was {n} born?",
        ],
    },
    Attribute {
        name: "university",
        statements: [
            "{n} studied at {v}.",
            "{n} graduated from {v}.",
            "{n} received an education at {v}.",
            "{n} attended {v}.",
            "The university {n} went to is {v}.",
        ],
        questions: [
            "Which university did {n} attend?",
            "Where did {n} study?",
            "What university did {n} graduate from?",
        ],
    },
    Attribute {
        name: "major",
        statements: [
            "{n} majored in {v}.",
            "{n} earned a degree in {v}.",
            "{n}'s field of study was {v}.",
            "{n} focused the studies on {v}.",
            "The subject {n} studied was {v}.",
        ],
        questions: [
            "What did {n} major in?",
            "What was the field of study of {n}?",
            "What subject did {n} study?",
        ],
    },
    Attribute {
        name: "employer",
        statements: [
            "{n} works at {v}.",
            "{n} is employed by {v}.",
            "{n} has a job at {v}.",
            "{n}'s employer is {v}.",
            "The company {n} works for is {v}.",
        ],
        questions: [
            "Where does {n} work?",
            "Which company employs {n}?",
            "Who is the employer of {n}?",
        ],
    },
];

/// One person: a unique full name and a value per attribute (in [`ATTRIBUTES`] order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Person {
    /// First and last name.
    pub name: String,
    /// Birth city, birth year, university, major, employer.
    pub values: [String; 5],
}

/// A question about one fact and its answer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Question {
    /// The question.
    pub question: String,
    /// The answer: the attribute's value.
    pub answer: String,
    /// Which attribute it asks for.
    pub attribute: &'static str,
}

/// The world: its people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct World {
    /// Everybody, in a seeded order.
    pub people: Vec<Person>,
}

fn fill(template: &str, name: &str, value: &str) -> String {
    template.replace("{n}", name).replace("{v}", value)
}

impl World {
    /// `n` people (at most 900) with attributes drawn uniformly, from `seed`.
    pub fn generate(n: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut names: Vec<String> = FIRST
            .iter()
            .flat_map(|f| LAST.iter().map(move |l| format!("{f} {l}")))
            .collect();
        names.shuffle(&mut rng);
        let pick =
            |rng: &mut ChaCha8Rng, list: &[&str]| list[rng.random_range(0..list.len())].to_string();
        let people = names
            .into_iter()
            .take(n)
            .map(|name| {
                let values = [
                    pick(&mut rng, &CITIES),
                    rng.random_range(1961..1991).to_string(),
                    pick(&mut rng, &UNIVERSITIES),
                    pick(&mut rng, &MAJORS),
                    pick(&mut rng, &COMPANIES),
                ];
                Person { name, values }
            })
            .collect();
        Self { people }
    }

    /// `per_person` biographies of everybody, shuffled: each states every attribute once,
    /// in a random phrasing and a random order.
    pub fn biographies(&self, per_person: usize, seed: u64) -> Vec<String> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut bios = Vec::with_capacity(self.people.len() * per_person);
        for p in &self.people {
            for _ in 0..per_person {
                let mut order: Vec<usize> = (0..ATTRIBUTES.len()).collect();
                order.shuffle(&mut rng);
                let sentences: Vec<String> = order
                    .into_iter()
                    .map(|a| {
                        let t = ATTRIBUTES[a].statements[rng.random_range(0..5)];
                        fill(t, &p.name, &p.values[a])
                    })
                    .collect();
                bios.push(sentences.join(" "));
            }
        }
        bios.shuffle(&mut rng);
        bios
    }

    /// Every question about every fact, split by person: the people at indices where
    /// `held_out` says so give the held-out questions, the others the finetuning ones.
    pub fn questions(&self, held_out: impl Fn(usize) -> bool) -> (Vec<Question>, Vec<Question>) {
        let (mut train, mut test) = (Vec::new(), Vec::new());
        for (i, p) in self.people.iter().enumerate() {
            for (a, attr) in ATTRIBUTES.iter().enumerate() {
                for q in attr.questions {
                    let question = Question {
                        question: fill(q, &p.name, ""),
                        answer: p.values[a].clone(),
                        attribute: attr.name,
                    };
                    if held_out(i) {
                        test.push(question);
                    } else {
                        train.push(question);
                    }
                }
            }
        }
        (train, test)
    }
}

/// Whether person `i` of `n` is held out: a seeded choice of `round(fraction · n)` people.
pub fn held_out_people(n: usize, fraction: f64, seed: u64) -> Vec<bool> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let mut held = vec![false; n];
    for &i in idx.iter().take((fraction * n as f64).round() as usize) {
        held[i] = true;
    }
    held
}

/// Train a byte-level BPE tokenizer of `vocab` tokens (with `<|endoftext|>`) on `texts`
/// and save it as a Hugging Face `tokenizer.json` at `path`. Every text is encoded with a
/// leading space (`add_prefix_space`), so that an answer on its own is the same tokens as
/// in the middle of a sentence.
pub fn train_tokenizer(
    texts: &[String],
    vocab: usize,
    path: &std::path::Path,
) -> Result<(), tokenizers::Error> {
    use tokenizers::{
        AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
        TokenizerBuilder,
        models::bpe::{BPE, BpeTrainerBuilder},
        pre_tokenizers::byte_level::ByteLevel,
    };
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(super::EOT, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let byte_level = ByteLevel::default().add_prefix_space(true);
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(byte_level.into()))
    .with_post_processor(Some(byte_level.into()))
    .with_decoder(Some(byte_level.into()))
    .build()?;
    tokenizer.train(&mut trainer, texts.iter())?;
    tokenizer.save(path, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_world_is_deterministic_and_every_fact_is_stated_and_asked() {
        let world = World::generate(50, 7);
        assert_eq!(world, World::generate(50, 7));
        let names: std::collections::BTreeSet<&str> =
            world.people.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names.len(), 50, "names are unique");
        let bios = world.biographies(4, 8);
        assert_eq!(bios.len(), 200);
        // Full names never contain one another, so a biography names one person.
        for p in &world.people {
            let about: Vec<&String> = bios.iter().filter(|b| b.contains(&p.name)).collect();
            assert_eq!(about.len(), 4, "{}", p.name);
            for bio in about {
                assert_eq!(
                    bio.matches(&p.name).count(),
                    5,
                    "the name in every sentence: {bio}"
                );
                for v in &p.values {
                    assert!(bio.contains(v.as_str()), "{bio} lacks {v}");
                }
            }
        }
        let held = held_out_people(50, 0.2, 9);
        assert_eq!(held.iter().filter(|h| **h).count(), 10);
        let (train, test) = world.questions(|i| held[i]);
        assert_eq!((train.len(), test.len()), (40 * 15, 10 * 15));
        assert!(
            test.iter()
                .all(|q| !train.iter().any(|t| t.question == q.question))
        );
    }
}
