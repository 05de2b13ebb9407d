//! Causal tracing on SmolLM2: the clean run predicts the answer, corrupting the subject destroys
//! it, restoring every state of the last token at the last layer brings it back exactly, and the
//! figure is a well-formed SVG with the three panels.

mod common;

use common::*;
use kedit::analysis::svg::trace_svg;
use kedit::analysis::trace::{causal_trace, TraceOptions};

#[test]
fn causal_trace_of_the_eiffel_tower() {
    let model = smollm2();
    let opts = TraceOptions {
        samples: 2,
        ..TraceOptions::default()
    };
    let prompt = "The Eiffel Tower is located in the city of";
    let trace = causal_trace(&model, prompt, "Eiffel Tower", &opts, &mut |_, _| {}).unwrap();
    assert_eq!(trace.answer, " Paris");
    assert_eq!(trace.subject_tokens, (1, 3));
    assert!(trace.clean > 0.5, "{}", trace.clean);
    assert!(trace.corrupted < 0.1 * trace.clean, "{}", trace.corrupted);
    let n_layers = model.spec().n_layers;
    let last = trace.tokens.len() - 1;
    // The residual after the last layer at the last token is all the logits see: restoring it
    // restores the clean probability exactly.
    let restored = trace.residual[last][n_layers - 1];
    assert!(
        (restored - trace.clean).abs() < 1e-4,
        "{restored} vs {}",
        trace.clean
    );
    // Restoring a state before the subject changes nothing: it was never corrupted.
    for l in 0..n_layers {
        assert!((trace.residual[0][l] - trace.corrupted).abs() < 1e-4);
    }
    // Somewhere on the subject, early or middle MLPs carry the fact.
    let (first, last_subject) = trace.subject_tokens;
    let best_mlp = (first..=last_subject)
        .flat_map(|t| trace.mlp[t][..n_layers / 2].iter().copied())
        .fold(0.0, f64::max);
    assert!(best_mlp > 0.2, "{best_mlp}");

    let svg = trace_svg(&trace, "SmolLM2");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    for title in ["restoring state", "restoring MLP", "restoring attention"] {
        assert!(svg.contains(title), "{title}");
    }
    assert_eq!(
        svg.matches("<rect").count(),
        1 + 3 * (trace.tokens.len() * n_layers + 1 + 24 + 1),
        "background, cells, frame, colour bar and its frame per panel"
    );
}

#[test]
fn kedit_trace_writes_the_figure_and_refuses_a_missing_subject() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("trace.svg");
    let model = fixture("tiny-gpt2");
    let run = |subject: &str| {
        kedit(&[
            "trace",
            "-m",
            model.to_str().unwrap(),
            "--prompt",
            "The capital of France is",
            "--subject",
            subject,
            "--samples",
            "2",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ])
    };
    let json: serde_json::Value = serde_json::from_str(&ok(&run("France"))).unwrap();
    let n_layers = json["residual"][0].as_array().unwrap().len();
    assert_eq!(
        json["mlp"].as_array().unwrap().len(),
        json["tokens"].as_array().unwrap().len()
    );
    assert!(n_layers >= 1);
    assert!(std::fs::read_to_string(&out).unwrap().contains("</svg>"));
    assert_one_line_error(&run("Germany"), &["subject \"Germany\" does not occur"]);
}
