//! InstructEdit's instructions (SPEC-editors §9.1): an edit prompt wrapped as
//! `Task: {task}\nDescription: {description}\nInput: {prompt}`, the description drawn from the
//! task's pool. Training draws one of nine per record; evaluation uses one for the whole run,
//! possibly the tenth, which training never sees.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use super::stable_hash::stable_hash;
use super::EditRequest;

/// The editing tasks InstructEdit's instructions describe, named as the records' `type` field
/// spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Task {
    Convsent,
    Counterfact,
    Wikirecent,
    Zsre,
}

impl Task {
    pub const ALL: [Task; 4] = [
        Task::Convsent,
        Task::Counterfact,
        Task::Wikirecent,
        Task::Zsre,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Task::Convsent => "convsent",
            Task::Counterfact => "counterfact",
            Task::Wikirecent => "wikirecent",
            Task::Zsre => "zsre",
        }
    }

    pub fn parse(name: &str) -> Option<Task> {
        Task::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The task a benchmark file holds, from its layout and, for KnowEdit's shared layout, its
    /// name (`knowedit_zsre_test.json`, `..._recent_...`, `..._counterfact_...`).
    pub fn of_file(path: &std::path::Path, format: super::Format) -> Option<Task> {
        use super::Format;
        match format {
            Format::ZsreMend => Some(Task::Zsre),
            Format::Convsent => Some(Task::Convsent),
            Format::Counterfact | Format::RomeCounterfact => Some(Task::Counterfact),
            Format::Knowedit => {
                let name = path.file_name()?.to_string_lossy().to_lowercase();
                let found: Vec<Task> = [
                    ("zsre", Task::Zsre),
                    ("recent", Task::Wikirecent),
                    ("counterfact", Task::Counterfact),
                    ("convsent", Task::Convsent),
                ]
                .into_iter()
                .filter(|(word, _)| name.contains(word))
                .map(|(_, t)| t)
                .collect();
                match found.as_slice() {
                    [one] => Some(*one),
                    _ => None,
                }
            }
            Format::Sanitation => None,
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Deserialize)]
struct Pool {
    train: Vec<String>,
    held_out: Vec<String>,
}

#[derive(Deserialize)]
struct InstructionsFile {
    template: String,
    tasks: BTreeMap<String, Pool>,
}

/// The template and each task's descriptions.
#[derive(Debug, Clone)]
pub struct Instructions {
    template: String,
    /// In the order of [`Task::ALL`].
    pools: [Pool; 4],
}

/// Which description an evaluation run uses for all its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// `0..=9`: the nine training descriptions, then the held-out one (EasyEdit's `--inst_index`).
    Index(usize),
    /// The held-out description, never seen in training.
    Unseen,
    /// One drawn from all ten by CPython's `random.choice` seeded 0, as EasyEdit's test script
    /// does without `--inst_index`.
    Drawn,
}

impl Instructions {
    /// kedit's copy of EasyEdit's pools (`configs/instructedit/instructions.json`).
    ///
    /// # Errors
    /// None for the file as shipped (a test reads it); an edited copy that breaks it is named.
    pub fn builtin() -> crate::Result<Self> {
        Self::from_json(include_str!("../../configs/instructedit/instructions.json")).map_err(|e| {
            crate::Error::Invalid(format!("configs/instructedit/instructions.json: {e}"))
        })
    }

    /// # Errors
    /// Not the layout of `instructions.json`, a template without its three fields, or a task
    /// missing or without training descriptions or a held-out one.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let file: InstructionsFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
        for field in ["{task}", "{description}", "{prompt}"] {
            if !file.template.contains(field) {
                return Err(format!("the template lacks {field}"));
            }
        }
        if let Some(name) = file.tasks.keys().find(|n| Task::parse(n).is_none()) {
            return Err(format!("unknown task {name:?}"));
        }
        let pool = |task: Task| -> Result<Pool, String> {
            let pool = file
                .tasks
                .get(task.name())
                .ok_or_else(|| format!("no descriptions for task {task}"))?;
            if pool.train.is_empty() || pool.held_out.is_empty() {
                return Err(format!(
                    "task {task} needs training descriptions and a held-out one"
                ));
            }
            Ok(pool.clone())
        };
        Ok(Instructions {
            pools: [
                pool(Task::Convsent)?,
                pool(Task::Counterfact)?,
                pool(Task::Wikirecent)?,
                pool(Task::Zsre)?,
            ],
            template: file.template,
        })
    }

    fn pool(&self, task: Task) -> &Pool {
        &self.pools[task as usize]
    }

    /// The descriptions training draws from.
    pub fn training_pool(&self, task: Task) -> &[String] {
        &self.pool(task).train
    }

    /// The description kept out of training.
    pub fn held_out(&self, task: Task) -> &str {
        &self.pool(task).held_out[0]
    }

    /// The description of one training record: a function of the seed and the record's text
    /// only, so it does not change with the file's order, the other files of the mixture or
    /// where a resumed run starts.
    pub fn training_description(&self, task: Task, seed: u64, record: &str) -> &str {
        let pool = self.training_pool(task);
        let k = (stable_hash(seed, &[task.name(), record]) % pool.len() as u64) as usize;
        &pool[k]
    }

    /// `text` (one of `r`'s edit prompts) wrapped as training wraps it: in the description
    /// [`Instructions::training_description`] draws for the record `r`.
    pub fn wrap_for_training(&self, task: Task, seed: u64, r: &EditRequest, text: &str) -> String {
        let record = format!("{}\n{}", r.prompt, r.target_new);
        let description = self.training_description(task, seed, &record);
        self.wrap(task, description, text, Sentiment::of(r))
    }

    /// The description of an evaluation run.
    ///
    /// # Errors
    /// An index past the ten descriptions.
    pub fn description(&self, task: Task, choice: Choice) -> Result<&str, String> {
        let pool = self.pool(task);
        let all: Vec<&str> = pool
            .train
            .iter()
            .chain(&pool.held_out[..1])
            .map(String::as_str)
            .collect();
        match choice {
            Choice::Index(k) => all.get(k).copied().ok_or_else(|| {
                format!(
                    "--instruction-index {k}: task {task} has descriptions 0 to {}",
                    all.len() - 1
                )
            }),
            Choice::Unseen => Ok(self.held_out(task)),
            Choice::Drawn => Ok(*super::python_random::PythonRandom::new(0).choice(&all)),
        }
    }

    /// `prompt` wrapped in the template. A ConvSent description names the sentiment asked for and
    /// the topic (`[LABEL]`, `[TOPIC]`).
    pub fn wrap(
        &self,
        task: Task,
        description: &str,
        prompt: &str,
        sentiment: Option<Sentiment<'_>>,
    ) -> String {
        let description = match sentiment {
            Some(s) => description
                .replace("[LABEL]", if s.positive { "positive" } else { "negative" })
                .replace("[TOPIC]", s.topic),
            None => description.to_string(),
        };
        self.template
            .replace("{task}", task.name())
            .replace("{description}", &description)
            .replace("{prompt}", prompt)
    }

    /// The request with its edit, rephrase and portability prompts wrapped; locality prompts stay
    /// as they are (they test what the edit must not touch, with or without an instruction).
    pub fn wrap_request(&self, task: Task, description: &str, r: &EditRequest) -> EditRequest {
        let sentiment = Sentiment::of(r);
        let wrap = |p: &str| self.wrap(task, description, p, sentiment);
        let mut out = r.clone();
        out.prompt = wrap(&r.prompt);
        out.rephrase_prompt = r.rephrase_prompt.as_deref().map(wrap);
        for set in out.portability.values_mut() {
            for p in &mut set.prompt {
                *p = wrap(p);
            }
        }
        out
    }
}

/// What a ConvSent description is filled in with.
#[derive(Debug, Clone, Copy)]
pub struct Sentiment<'a> {
    pub positive: bool,
    pub topic: &'a str,
}

impl<'a> Sentiment<'a> {
    /// A ConvSent request's: the sentiment of its target sentence and its topic.
    pub fn of(r: &'a EditRequest) -> Option<Self> {
        let probe = r.sentiment.as_ref()?;
        Some(Sentiment {
            positive: probe.target_is_positive(),
            topic: r.subject.as_deref().unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{read_dataset, PromptSet};

    /// Records copied from ../shared/data (see tests/fixtures/data/README.md).
    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/data")
            .join(name)
    }

    /// The strings below are written out by hand from the template and the pools of
    /// EasyEdit's multitask.py / test_InstructEdit.py, for records of each task's files.
    #[test]
    fn wrapped_prompts_are_easyedits_strings() {
        let inst = Instructions::builtin().unwrap();
        let fact = EditRequest {
            prompt: "The name of the country which Goursez Vreizh is associated with is".into(),
            target_new: "Franche-Comté".into(),
            rephrase_prompt: Some("Goursez Vreizh is associated with the country".into()),
            portability: [(
                "Reasoning".to_string(),
                PromptSet {
                    prompt: vec!["The name of the capital city of the country Goursez Vreizh is associated with is".into()],
                    ground_truth: vec!["Besançon".into()],
                },
            )]
            .into(),
            locality: [(
                "Relation_Specificity".to_string(),
                PromptSet {
                    prompt: vec!["The name of the founder of Goursez Vreizh is".into()],
                    ground_truth: vec!["Jean Le Fustec".into()],
                },
            )]
            .into(),
            ..Default::default()
        };
        let d = inst
            .description(Task::Counterfact, Choice::Index(1))
            .unwrap();
        let wrapped = inst.wrap_request(Task::Counterfact, d, &fact);
        assert_eq!(
            wrapped.prompt,
            "Task: counterfact\nDescription: A test set for measuring how well models can identify and deal with less common or 'tail' entities.\nInput: The name of the country which Goursez Vreizh is associated with is"
        );
        assert_eq!(
            wrapped.rephrase_prompt.as_deref(),
            Some("Task: counterfact\nDescription: A test set for measuring how well models can identify and deal with less common or 'tail' entities.\nInput: Goursez Vreizh is associated with the country")
        );
        assert_eq!(
            wrapped.portability["Reasoning"].prompt[0],
            "Task: counterfact\nDescription: A test set for measuring how well models can identify and deal with less common or 'tail' entities.\nInput: The name of the capital city of the country Goursez Vreizh is associated with is"
        );
        assert_eq!(
            wrapped.locality, fact.locality,
            "locality prompts stay bare"
        );
        assert_eq!(wrapped.target_new, fact.target_new);

        let recent = EditRequest {
            prompt: "The gender of Ingrīda Amantova is".into(),
            target_new: "female".into(),
            ..Default::default()
        };
        let d = inst.description(Task::Wikirecent, Choice::Unseen).unwrap();
        assert_eq!(
            inst.wrap_request(Task::Wikirecent, d, &recent).prompt,
            "Task: wikirecent\nDescription: A dataset focusing on the integration of newly verified factual data from WikiData.\nInput: The gender of Ingrīda Amantova is"
        );
        let d = inst.description(Task::Zsre, Choice::Index(9)).unwrap();
        assert_eq!(
            inst.wrap(Task::Zsre, d, "What is the original channel that It's a Business played on?", None),
            "Task: zsre\nDescription: A dataset for driving the development of AI that can predict objects given a subject and its relation.\nInput: What is the original channel that It's a Business played on?"
        );
        // EasyEdit's test script without --inst_index: random.seed(0), random.choice of ten,
        // which is index 6.
        assert_eq!(
            inst.description(Task::Zsre, Choice::Drawn).unwrap(),
            "A dataset facilitating the assessment of models' capacity to answer questions based on subject-relation prompts."
        );
        assert!(inst.description(Task::Zsre, Choice::Index(10)).is_err());

        // ConvSent: [LABEL] is the sentiment the request's prompt asks for, [TOPIC] its subject.
        let ds = read_dataset(&fixture("knowedit_convsent_test.json"), None).unwrap();
        let mut labels = std::collections::BTreeSet::new();
        for (_, r) in ds.cases.iter().take(6) {
            let label = if r.prompt.ends_with(" negatively.") {
                "negative"
            } else {
                assert!(r.prompt.ends_with(" postively."), "{}", r.prompt);
                "positive"
            };
            labels.insert(label);
            let d = inst.description(Task::Convsent, Choice::Index(0)).unwrap();
            assert_eq!(
                inst.wrap_request(Task::Convsent, d, r).prompt,
                format!(
                    "Task: convsent\nDescription: Teach the chatbot to sound {label} when talking about {}, but keep its cool on everything else.\nInput: {}",
                    r.subject.as_deref().unwrap(),
                    r.prompt
                )
            );
        }
        assert_eq!(labels.len(), 2, "both sentiments among the first records");
    }

    /// A record's training description is a function of the seed and the record alone, comes
    /// from the nine training descriptions (all of them in use), and is never the held-out one.
    #[test]
    fn training_descriptions_depend_on_seed_and_record_only_and_never_the_held_out_one() {
        let inst = Instructions::builtin().unwrap();
        for (task, file) in [
            (Task::Counterfact, "knowedit_wiki_counterfact_train.json"),
            (Task::Wikirecent, "knowedit_wiki_recent_train.json"),
            (Task::Convsent, "knowedit_convsent_test.json"),
        ] {
            let ds = read_dataset(&fixture(file), None).unwrap();
            let keys: Vec<String> = ds
                .cases
                .iter()
                .map(|(_, r)| format!("{}\n{}", r.prompt, r.target_new))
                .collect();
            let draw = |seed: u64, keys: &[String]| -> Vec<String> {
                keys.iter()
                    .map(|k| inst.training_description(task, seed, k).to_string())
                    .collect()
            };
            let forward = draw(42, &keys);
            let mut reversed_keys = keys.clone();
            reversed_keys.reverse();
            let mut backward = draw(42, &reversed_keys);
            backward.reverse();
            assert_eq!(forward, backward, "{task}: the order of records matters");
            let held_out = inst.held_out(task);
            let used: std::collections::BTreeSet<&String> = forward.iter().collect();
            assert!(!used.contains(&held_out.to_string()), "{task}");
            assert_eq!(used.len(), 9, "{task}: {used:?}");
            for d in &used {
                assert!(inst.training_pool(task).contains(d));
            }
            let other_seed = draw(43, &keys);
            let moved = forward
                .iter()
                .zip(&other_seed)
                .filter(|(a, b)| a != b)
                .count();
            assert!(moved > keys.len() / 2, "{task}: seed 43 moved only {moved}");
        }
    }

    #[test]
    fn the_tasks_of_the_benchmark_files() {
        use crate::data::Format;
        let of = |name: &str, f| Task::of_file(std::path::Path::new(name), f);
        assert_eq!(
            of("zsre_mend_eval.json", Format::ZsreMend),
            Some(Task::Zsre)
        );
        assert_eq!(
            of("knowedit_zsre_test.json", Format::Knowedit),
            Some(Task::Zsre)
        );
        assert_eq!(
            of("knowedit_wiki_recent_train.json", Format::Knowedit),
            Some(Task::Wikirecent)
        );
        assert_eq!(
            of("knowedit_wiki_counterfact_train.json", Format::Knowedit),
            Some(Task::Counterfact)
        );
        assert_eq!(of("wikibio.json", Format::Knowedit), None);
    }
}
