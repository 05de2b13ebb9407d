//! Aggregation over cases as KnowEdit reports it: a mean of means (prompts → keys → cases), ×100.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::eval::case::CaseResult;
use crate::eval::{LocalityEntry, PhaseMetrics};

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct PhaseSummary {
    pub rewrite_acc: Option<f64>,
    pub rephrase_acc: Option<f64>,
    pub locality: Option<f64>,
    pub portability: Option<f64>,
    pub fluency: Option<f64>,
    /// Mean perplexities (not ×100), with `--metric ppl`.
    pub rewrite_ppl: Option<f64>,
    pub rephrase_ppl: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub cases: usize,
    pub pre: PhaseSummary,
    pub post: PhaseSummary,
    /// Mean seconds per edit call.
    pub edit_seconds: Option<f64>,
    /// ConvSent (×100, as KnowEdit reports): edit success, drawdown (lower is better) and the
    /// fluency of the edited model on a question about the topic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sentiment: Option<SentimentSummary>,
    /// `phase.section` → the comparable groups of its scores. More than one means the cases were
    /// scored differently (a run resumed with another --metric) and must not be averaged.
    pub metric_protocols: BTreeMap<String, BTreeSet<String>>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SentimentSummary {
    pub es: Option<f64>,
    pub dd: Option<f64>,
    pub fluency: Option<f64>,
}

/// Mean of the finite values, or `None` when there are none.
fn mean(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values
        .into_iter()
        .filter(|v| v.is_finite())
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

fn pct(v: Option<f64>) -> Option<f64> {
    v.map(|v| v * 100.0)
}

fn phase(metrics: &[&PhaseMetrics]) -> PhaseSummary {
    let locality = metrics.iter().filter_map(|m| {
        mean(
            m.locality
                .iter()
                .filter_map(|(k, v)| match (k.ends_with("_acc"), v) {
                    (true, LocalityEntry::Acc(accs)) => mean(accs.iter().copied()),
                    _ => None,
                }),
        )
    });
    let portability = metrics.iter().filter_map(|m| {
        mean(
            m.portability
                .values()
                .filter_map(|accs| mean(accs.iter().copied())),
        )
    });
    PhaseSummary {
        rewrite_acc: pct(mean(
            metrics
                .iter()
                .filter_map(|m| mean(m.rewrite_acc.iter().copied())),
        )),
        rephrase_acc: pct(mean(metrics.iter().filter_map(|m| {
            m.rephrase_acc
                .as_ref()
                .and_then(|r| mean(r.iter().copied()))
        }))),
        locality: pct(mean(locality)),
        portability: pct(mean(portability)),
        fluency: pct(mean(
            metrics
                .iter()
                .filter_map(|m| m.fluency.as_ref().map(|f| f.ngram_entropy)),
        )),
        rewrite_ppl: mean(metrics.iter().filter_map(|m| m.rewrite_ppl)),
        rephrase_ppl: mean(metrics.iter().filter_map(|m| m.rephrase_ppl)),
    }
}

fn protocols(results: &[CaseResult]) -> BTreeMap<String, BTreeSet<String>> {
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in results {
        for (phase, m) in [("pre", &r.pre), ("post", &r.post)] {
            for (section, meta) in &m.metric_meta {
                seen.entry(format!("{phase}.{section}"))
                    .or_default()
                    .insert(meta.comparable_group.clone());
            }
        }
    }
    seen
}

pub fn summarize(results: &[CaseResult]) -> Summary {
    let pre: Vec<&PhaseMetrics> = results.iter().map(|r| &r.pre).collect();
    let post: Vec<&PhaseMetrics> = results.iter().map(|r| &r.post).collect();
    Summary {
        cases: results.len(),
        pre: phase(&pre),
        post: phase(&post),
        edit_seconds: mean(results.iter().map(|r| r.time)),
        sentiment: results
            .iter()
            .any(|r| r.es.is_some())
            .then(|| SentimentSummary {
                es: pct(mean(results.iter().filter_map(|r| r.es))),
                dd: pct(mean(results.iter().filter_map(|r| r.dd))),
                fluency: pct(mean(
                    results
                        .iter()
                        .filter_map(|r| r.fluency.as_ref().map(|f| f.ngram_entropy)),
                )),
            }),
        metric_protocols: protocols(results),
    }
}

impl Summary {
    /// One line per section whose cases were scored under different protocols.
    pub fn warnings(&self) -> Vec<String> {
        self.metric_protocols
            .iter()
            .filter(|(_, groups)| groups.len() > 1)
            .map(|(section, groups)| {
                let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
                format!(
                    "WARNING: {section} mixes {}; do not average or compare these scores directly",
                    groups.join(" and ")
                )
            })
            .collect()
    }

    /// The human table.
    pub fn table(&self) -> String {
        let cell = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.2}"));
        let mut out = format!(
            "{:<16}{:>10}{:>10}\n",
            format!("{} cases", self.cases),
            "pre",
            "post"
        );
        let rows = [
            ("reliability", self.pre.rewrite_acc, self.post.rewrite_acc),
            (
                "generalization",
                self.pre.rephrase_acc,
                self.post.rephrase_acc,
            ),
            ("locality", self.pre.locality, self.post.locality),
            ("portability", self.pre.portability, self.post.portability),
            ("fluency", self.pre.fluency, self.post.fluency),
            ("rewrite ppl", self.pre.rewrite_ppl, self.post.rewrite_ppl),
            (
                "rephrase ppl",
                self.pre.rephrase_ppl,
                self.post.rephrase_ppl,
            ),
        ];
        for (name, pre, post) in rows {
            if name.ends_with("ppl") && pre.is_none() && post.is_none() {
                continue;
            }
            out.push_str(&format!("{name:<16}{:>10}{:>10}\n", cell(pre), cell(post)));
        }
        if let Some(s) = &self.sentiment {
            for (name, v) in [
                ("sentiment es", s.es),
                ("sentiment dd", s.dd),
                ("topic fluency", s.fluency),
            ] {
                out.push_str(&format!("{name:<16}{:>10}{:>10}\n", "", cell(v)));
            }
        }
        if let Some(s) = self.edit_seconds {
            out.push_str(&format!("{:<16}{:>20}\n", "s / edit", format!("{s:.3}")));
        }
        for warning in self.warnings() {
            out.push_str(&warning);
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(rewrite: f64, loc: &[(&str, Vec<f64>)], port: &[(&str, Vec<f64>)]) -> PhaseMetrics {
        PhaseMetrics {
            rewrite_acc: vec![rewrite],
            locality: loc
                .iter()
                .map(|(k, v)| (format!("{k}_acc"), LocalityEntry::Acc(v.clone())))
                .chain(
                    loc.iter().map(|(k, _)| {
                        (format!("{k}_output"), LocalityEntry::Output(vec![vec![1]]))
                    }),
                )
                .collect(),
            portability: port
                .iter()
                .map(|(k, v)| (format!("{k}_acc"), v.clone()))
                .collect(),
            rephrase_acc: None,
            metric_meta: BTreeMap::new(),
            fluency: None,
            rewrite_ppl: None,
            rephrase_ppl: None,
        }
    }

    #[test]
    fn mean_of_means_over_prompts_keys_and_cases() {
        // case 0: locality keys a = mean(1, 0) = .5, b = 1 → .75; portability r = mean(1, 1/3) = 2/3
        // case 1: locality a = 0 → 0; no portability (excluded from that mean)
        let a = metrics(
            1.0,
            &[("a", vec![1.0, 0.0]), ("b", vec![1.0])],
            &[("r", vec![1.0, 1.0 / 3.0])],
        );
        let b = metrics(0.5, &[("a", vec![0.0])], &[]);
        let results: Vec<CaseResult> = [a, b]
            .into_iter()
            .enumerate()
            .map(|(i, m)| CaseResult {
                pre: m.clone(),
                case_id: i,
                requested_rewrite: crate::data::EditRequest {
                    prompt: "p".into(),
                    target_new: "t".into(),
                    ground_truth: None,
                    portability: BTreeMap::new(),
                    locality: BTreeMap::new(),
                    subject: None,
                    rephrase_prompt: None,
                    sentiment: None,
                },
                post: m,
                time: 2.0,
                es: Some([0.5, 0.7][i]),
                dd: Some([0.0, 0.02][i]),
                fluency: None,
            })
            .collect();
        let s = summarize(&results);
        let sentiment = s.sentiment.as_ref().unwrap();
        assert!((sentiment.es.unwrap() - 60.0).abs() < 1e-9);
        assert!((sentiment.dd.unwrap() - 1.0).abs() < 1e-9);
        assert_eq!(sentiment.fluency, None);
        assert!((s.post.rewrite_acc.unwrap() - 75.0).abs() < 1e-9);
        assert!((s.post.locality.unwrap() - 37.5).abs() < 1e-9);
        assert!((s.post.portability.unwrap() - 200.0 / 3.0).abs() < 1e-9);
        assert_eq!(s.post.rephrase_acc, None);
        assert_eq!(s.edit_seconds, Some(2.0));
        assert!(s.table().contains("locality"));
        assert!(!s.table().contains("WARNING"));
    }

    #[test]
    fn mixed_scoring_protocols_are_flagged() {
        use crate::eval::Scoring;
        let request = crate::data::EditRequest {
            prompt: "p".into(),
            target_new: "t".into(),
            ground_truth: None,
            portability: BTreeMap::new(),
            locality: BTreeMap::new(),
            subject: None,
            rephrase_prompt: None,
            sentiment: None,
        };
        let case = |case_id, scoring: Scoring| {
            let mut m = metrics(1.0, &[], &[]);
            m.metric_meta
                .insert("rewrite".into(), scoring.meta("rewrite"));
            CaseResult {
                pre: m.clone(),
                case_id,
                requested_rewrite: request.clone(),
                post: m,
                time: 1.0,
                es: None,
                dd: None,
                fluency: None,
            }
        };
        let same = summarize(&[
            case(0, Scoring::TokenAccuracy),
            case(1, Scoring::TokenAccuracy),
        ]);
        assert_eq!(
            same.metric_protocols["post.rewrite"],
            BTreeSet::from(["lm.decoder_only_teacher_forcing.token_accuracy".to_string()])
        );
        assert!(!same.table().contains("WARNING"));
        let mixed = summarize(&[
            case(0, Scoring::TokenAccuracy),
            case(
                1,
                Scoring::GenerationMatch {
                    leading_space: true,
                },
            ),
        ]);
        assert_eq!(mixed.metric_protocols["pre.rewrite"].len(), 2);
        let table = mixed.table();
        assert!(
            table.contains("WARNING: post.rewrite mixes lm.decoder_only_teacher_forcing.token_accuracy and lm.vanilla_generation.token_match"),
            "{table}"
        );
    }
}
