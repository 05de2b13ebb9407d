//! The alternative scoring protocols: perplexity against a hand computation from full logits, and
//! generation-based exact match with and without EasyEdit's missing leading space.

mod common;

use std::collections::BTreeMap;

use candle_core::{IndexOp, D};
use common::*;
use kedit::data::EditRequest;
use kedit::eval::{evaluate_with, generation_match, perplexity, Scoring};
use kedit::model::Model;

fn request(prompt: &str, target: &str) -> EditRequest {
    EditRequest {
        prompt: prompt.into(),
        target_new: target.into(),
        ground_truth: None,
        portability: BTreeMap::new(),
        locality: BTreeMap::new(),
        subject: None,
        rephrase_prompt: None,
        sentiment: None,
    }
}

#[test]
fn perplexity_equals_the_hand_computation_from_full_logits() {
    let model = tiny_gpt2();
    let (prompt, answer) = ("The capital of France is", "Paris and Lyon");
    let n_prompt = model.encode(prompt).unwrap().len();
    let ids = model.encode(&format!("{prompt} {answer}")).unwrap();
    let logits = logits_alone(&model, &ids);
    let log_probs = Model::log_probs(&logits).unwrap();
    let mut nll = 0.0;
    for (t, &id) in ids.iter().enumerate().skip(n_prompt) {
        let lp = log_probs
            .i((t - 1, id as usize))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        nll -= f64::from(lp);
    }
    let want = (nll / (ids.len() - n_prompt) as f64).exp();
    let got = perplexity(&model, prompt, answer).unwrap();
    assert!((got - want).abs() / want < 1e-5, "{got} vs {want}");
    // the tiny model is random: its perplexity is near the vocabulary size, far above 1
    assert!(got > 100.0, "{got}");
}

#[test]
fn perplexity_prefers_the_true_answer_on_a_real_model() {
    let model = smollm2();
    let paris = perplexity(&model, "The capital of France is", "Paris").unwrap();
    let london = perplexity(&model, "The capital of France is", "London").unwrap();
    assert!(
        paris < 2.0 && london > 10.0 * paris,
        "Paris {paris}, London {london}"
    );
    let m = evaluate_with(
        &model,
        &request("The capital of France is", "Paris"),
        Scoring::Perplexity,
    )
    .unwrap();
    assert!(
        m.rewrite_acc.is_empty(),
        "ppl replaces rewrite_acc, as in EasyEdit"
    );
    assert!((m.rewrite_ppl.unwrap() - paris).abs() < 1e-9);
}

#[test]
fn generation_match_compares_greedy_tokens_with_the_answer() {
    let model = smollm2();
    let greedy = model
        .generate(
            "The capital of France is",
            1,
            kedit::model::Sampling::Greedy,
        )
        .unwrap();
    assert_eq!(greedy.text, " Paris");
    let with_space = generation_match(&model, "The capital of France is", " Paris").unwrap();
    assert_eq!(with_space.accuracy(), 1.0);
    // EasyEdit encodes the bare answer: "Paris" is a different byte-level token from " Paris".
    let bare = generation_match(&model, "The capital of France is", "Paris").unwrap();
    assert_eq!(bare.accuracy(), 0.0);
    let r = request("The capital of France is", "Paris");
    let fixed = evaluate_with(
        &model,
        &r,
        Scoring::GenerationMatch {
            leading_space: true,
        },
    )
    .unwrap();
    let published = evaluate_with(
        &model,
        &r,
        Scoring::GenerationMatch {
            leading_space: false,
        },
    )
    .unwrap();
    assert_eq!((fixed.rewrite_acc[0], published.rewrite_acc[0]), (1.0, 0.0));
    // and the teacher-forced argmax agrees with greedy generation on the first token
    let ids = model.encode("The capital of France is").unwrap();
    let last = logits_alone(&model, &ids).i(ids.len() - 1).unwrap();
    assert_eq!(
        last.argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap(),
        greedy.generated_ids[0]
    );
}

#[test]
fn fluency_samples_100_tokens_with_the_prompt_seeded() {
    use kedit::eval::fluency::{fluency, fluency_sample, ngram_entropy};
    use kedit::eval::word_tokenize::word_tokenize;
    let model = smollm2();
    let prompt = "The mother tongue of Danielle Darrieux is";
    let a = fluency_sample(&model, prompt, 100, 7).unwrap();
    assert!(a.starts_with(prompt), "{a:?}");
    assert_eq!(
        a,
        fluency_sample(&model, prompt, 100, 7).unwrap(),
        "same seed, same text"
    );
    assert_ne!(a, fluency_sample(&model, prompt, 100, 8).unwrap());
    // 100 tokens in all, prompt included (re-tokenising decoded text can merge a token or two)
    let n = model.encode(&a).unwrap().len();
    assert!((95..=105).contains(&n), "{n} tokens");
    let tokens = word_tokenize(&a).unwrap();
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let f = fluency(&model, prompt, 7).unwrap();
    assert_eq!(f.ngram_entropy, ngram_entropy(&refs));
    // a fluent 100-token sample has varied trigrams: entropy well above a repetitive text's
    assert!(f.ngram_entropy > 4.0, "{}", f.ngram_entropy);
}

#[test]
fn convsent_compares_with_the_unedited_model_only_when_corrected() {
    use kedit::editors::{build_editor, EditCtx};
    use kedit::eval::sentiment::{baseline, score, SentimentProtocol};
    let mut model = smollm2();
    let ds = kedit::data::read_dataset(&fixture("data/knowedit_convsent_test.json"), None).unwrap();
    let (_, request) = ds.cases[0].clone();
    // Two sentences of each sentiment keep the test fast.
    let mut probe = request.sentiment.clone().unwrap();
    let n = probe.inner_qa.len();
    let keep = [0, 1, n - 2, n - 1];
    probe.inner_qa = keep.iter().map(|&i| probe.inner_qa[i].clone()).collect();
    probe.same_sentiment = keep.iter().map(|&i| probe.same_sentiment[i]).collect();
    probe.outer_qa.truncate(3);
    assert!(probe.same_sentiment.contains(&true) && probe.same_sentiment.contains(&false));

    let corrected = SentimentProtocol::Corrected;
    let before = baseline(&model, &probe, corrected).unwrap();
    let unchanged = score(&model, &probe, corrected, Some(&before)).unwrap();
    assert_eq!(unchanged.dd, 0.0, "no edit, no drawdown");
    assert!(unchanged.es > 0.0 && unchanged.es < 1.0, "{unchanged:?}");

    let mut editor = build_editor("FT-L", &fixture("hparams/ft-l-smollm2-quick.yaml")).unwrap();
    let edit = editor
        .apply(
            &mut model,
            std::slice::from_ref(&request),
            &EditCtx {
                seed: 0,
                ..EditCtx::default()
            },
        )
        .unwrap();
    let fixed = score(&model, &probe, corrected, Some(&before)).unwrap();
    let published = score(&model, &probe, SentimentProtocol::AsPublished, None).unwrap();
    assert!(fixed.dd > 0.0, "the edit moved the other topic: {fixed:?}");
    assert_eq!(
        published.dd, 0.0,
        "EasyEdit compares the edited model with itself"
    );
    assert!(published.es > 0.0 && published.es < 1.0, "{published:?}");
    edit.undo(&mut model).unwrap();
    let restored = score(&model, &probe, corrected, Some(&before)).unwrap();
    assert_eq!(restored, unchanged, "undo restores the scores exactly");
}

#[test]
fn chat_templates_render_as_transformers_renders_them() {
    use kedit::model::chat::render_user_turn;
    // Rendered by jinja2 as apply_chat_template does (scripts/chat/make_vectors.py).
    let templates = read_json("chat/templates.json");
    let rendered = read_json("chat/rendered.json");
    for (name, spec) in templates.as_object().unwrap() {
        for case in rendered[name].as_array().unwrap() {
            let got = render_user_turn(
                spec["template"].as_str().unwrap(),
                case["prompt"].as_str().unwrap(),
                spec["bos_token"].as_str().unwrap(),
                spec["eos_token"].as_str().unwrap(),
            )
            .unwrap();
            assert_eq!(got, case["rendered"].as_str().unwrap(), "{name}");
        }
    }
    // The GGUF carries SmolLM2's template, and its bos/eos are the tokens the template names.
    let model = smollm2();
    assert_eq!(
        model.chat_template(),
        templates["smollm2"]["template"].as_str()
    );
    let prompt = rendered["smollm2"][0]["prompt"].as_str().unwrap();
    assert_eq!(
        model.apply_chat_template(prompt).unwrap(),
        rendered["smollm2"][0]["rendered"].as_str().unwrap()
    );
    let err = render_user_turn("{{ raise_exception('no system role') }}", "x", "", "").unwrap_err();
    assert!(err.to_string().contains("no system role"), "{err}");
}

#[test]
fn use_chat_template_wraps_scored_prompts_but_not_locality() {
    use kedit::eval::case::{measure_after, measure_before, MeasureOptions};
    let model = smollm2();
    let mut r = request("The capital of France is", "Paris");
    r.rephrase_prompt = Some("France's capital city is".into());
    r.locality.insert(
        "neighborhood".into(),
        kedit::data::PromptSet {
            prompt: vec!["The capital of Italy is".into()],
            ground_truth: vec!["Rome".into()],
        },
    );
    let opts = MeasureOptions {
        chat_template: true,
        ..MeasureOptions::default()
    };
    let templated = measure_before(&model, &r, &opts).unwrap();
    let case = measure_after(&model, 0, &r, templated, 0.0, &opts).unwrap();
    // by hand: the same request with the prompts rendered, locality left plain
    let mut by_hand = r.clone();
    by_hand.prompt = model.apply_chat_template(&r.prompt).unwrap();
    by_hand.rephrase_prompt = Some(
        model
            .apply_chat_template("France's capital city is")
            .unwrap(),
    );
    let want = evaluate_with(&model, &by_hand, Scoring::TokenAccuracy).unwrap();
    assert_eq!(case.pre.rewrite_acc, want.rewrite_acc);
    assert_eq!(case.pre.rephrase_acc, want.rephrase_acc);
    assert_eq!(case.pre.locality, want.locality);
    let plain = measure_before(&model, &r, &MeasureOptions::default()).unwrap();
    let plain = measure_after(&model, 0, &r, plain, 0.0, &MeasureOptions::default()).unwrap();
    assert_eq!(
        case.pre.locality, plain.pre.locality,
        "locality is never templated"
    );
    assert_eq!(
        case.requested_rewrite, r,
        "the request itself is reported unchanged"
    );
    // perplexity tells the two prompts apart for sure
    let ppl = |opts: &MeasureOptions| {
        let before = measure_before(&model, &r, opts).unwrap();
        measure_after(&model, 0, &r, before, 0.0, opts)
            .unwrap()
            .pre
            .rewrite_ppl
            .unwrap()
    };
    let ppl_opts = |chat_template| MeasureOptions {
        chat_template,
        scoring: Scoring::Perplexity,
        ..MeasureOptions::default()
    };
    let templated_ppl = ppl(&ppl_opts(true));
    assert_ne!(templated_ppl, ppl(&ppl_opts(false)));
    assert_eq!(
        templated_ppl,
        perplexity(&model, &by_hand.prompt, "Paris").unwrap()
    );
}
