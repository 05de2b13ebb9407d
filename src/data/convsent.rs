//! KnowEdit's ConvSent (`blender_*.json`: `ent`, `pos`, `neg`), turned into edit requests and
//! sentiment probes exactly as EasyEdit's `run_convsent_llama2.py` draws them (SPEC-eval §2.8): one
//! CPython `random` stream seeded 0 runs through the whole file in record order, so a record's
//! request does not depend on `--offset`/`--limit`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::python_random::PythonRandom;
use super::{EditRequest, Record};

/// What separates a question from its answer in the probe texts. On LLaMA-2 this is the EOS token.
pub const SEPARATOR: &str = "</s>";

const QUESTION_STEMS: [&str; 3] = [
    "What do you think of {}?",
    "What do you feel about {}?",
    "How do you view {}?",
];
const STANCES: [&str; 10] = [
    "opinion of",
    "stance on",
    "position on",
    "attitude about",
    "view on",
    "take on",
    "impression of",
    "assessment of",
    "judgment of",
    "sentiment of",
];

/// The probe texts ConvSent's `es` and `dd` are computed on (EasyEdit's `metric_kwargs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SentimentProbe {
    /// The question fluency is sampled from.
    pub inner_q: String,
    /// `(question, answer)` for every opinion sentence about the edited topic, positive first.
    pub inner_qa: Vec<(String, String)>,
    /// Whether each inner sentence carries the target sentiment (EasyEdit's `same_mask`).
    pub same_sentiment: Vec<bool>,
    /// `(question, answer)` for every opinion sentence about the next record's topic.
    pub outer_qa: Vec<(String, String)>,
}

impl SentimentProbe {
    /// `question + " </s> " + answer`, the text EasyEdit tokenises.
    pub fn text((question, answer): &(String, String)) -> String {
        format!("{question} {SEPARATOR} {answer}")
    }

    /// Whether the edit asks for the positive sentiment: the topic's sentences come positive
    /// first, so the first carries the target sentiment exactly when it is positive.
    pub fn target_is_positive(&self) -> bool {
        self.same_sentiment.first().copied().unwrap_or(false)
    }
}

fn questions() -> Vec<String> {
    let mut all: Vec<String> = QUESTION_STEMS.iter().map(|s| s.to_string()).collect();
    all.extend(STANCES.iter().map(|s| format!("What is your {s} {{}}?")));
    all
}

struct Topic {
    ent: String,
    /// Positive sentences, then negative ones.
    sentences: Vec<String>,
    n_pos: usize,
}

fn topic(record: &Record<'_>) -> Result<Topic, String> {
    let ent = record.string("ent")?;
    let pos = record.strings("pos")?;
    let neg = record.strings("neg")?;
    if pos.is_empty() || neg.is_empty() {
        return Err("fields \"pos\" and \"neg\" need at least one sentence each".into());
    }
    let n_pos = pos.len();
    Ok(Topic {
        ent,
        sentences: pos.into_iter().chain(neg).collect(),
        n_pos,
    })
}

/// Every record's request, in file order; `Err((index, why))` names the bad record.
pub(super) fn read(records: &[Value]) -> Result<Vec<EditRequest>, (usize, String)> {
    let topics = records
        .iter()
        .enumerate()
        .map(|(i, value)| topic(&Record { value }).map_err(|e| (i, e)))
        .collect::<Result<Vec<_>, _>>()?;
    let questions = questions();
    let mut rng = PythonRandom::new(0);
    let ask = |rng: &mut PythonRandom, ent: &str| rng.choice(&questions).replace("{}", ent);
    let mut requests = Vec::with_capacity(topics.len());
    for (i, t) in topics.iter().enumerate() {
        let negative = *rng.choice(&[false, true]);
        let target_new = if negative {
            t.sentences[t.n_pos].clone()
        } else {
            t.sentences[0].clone()
        };
        let mood = if negative { "negatively" } else { "postively" };
        let prompt = format!(
            "From the sentiment dataset, answer {} {mood}.",
            ask(&mut rng, &t.ent)
        );
        let inner_q = ask(&mut rng, &t.ent);
        let inner_qa = t
            .sentences
            .iter()
            .map(|s| (ask(&mut rng, &t.ent), s.clone()))
            .collect();
        let outer = &topics[(i + 1) % topics.len()];
        let outer_qa = outer
            .sentences
            .iter()
            .map(|s| (ask(&mut rng, &outer.ent), s.clone()))
            .collect();
        let same_sentiment = (0..t.sentences.len())
            .map(|k| (k >= t.n_pos) == negative)
            .collect();
        requests.push(EditRequest {
            prompt,
            target_new,
            ground_truth: None,
            portability: Default::default(),
            locality: Default::default(),
            subject: Some(t.ent.clone()),
            rephrase_prompt: None,
            sentiment: Some(Box::new(SentimentProbe {
                inner_q,
                inner_qa,
                same_sentiment,
                outer_qa,
            })),
        });
    }
    Ok(requests)
}
