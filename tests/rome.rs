//! ROME against EasyEdit's own numbers (tests/fixtures/easyedit/rome_golden_smollm2.json, context
//! templates fixed to "{}") and by its defining properties on SmolLM2.

mod common;

use candle_core::{IndexOp, D};
use common::*;
use kedit::data::read_dataset;
use kedit::editors::rank_one::keys::mean_key;
use kedit::editors::{build_editor, EditCtx};
use kedit::model::subject::{fact_token, fact_token_by_counts, with_placeholder, FactToken};

fn next_token_top(model: &kedit::model::Model, prompt: &str) -> (u32, candle_core::Tensor) {
    let ids = model.encode(prompt).unwrap();
    let logits = logits_alone(model, &ids).i(ids.len() - 1).unwrap();
    let top = logits
        .argmax(D::Minus1)
        .unwrap()
        .to_scalar::<u32>()
        .unwrap();
    (top, logits)
}

#[test]
fn rome_matches_easyedit_left_and_right_vectors() {
    let golden = read_json("easyedit/rome_golden_smollm2.json");
    let hparams = fixture("hparams/rome-golden-smollm2.yaml");
    let mut model = smollm2();
    let data = read_dataset(&fixture("data/counterfact_easyedit_edit.json"), None).unwrap();
    let mut editor = build_editor("ROME", &hparams).unwrap();
    for case in golden["cases"].as_array().unwrap() {
        let i = case["case_index"].as_u64().unwrap() as usize;
        let request = &data.cases[i].1;
        assert_eq!(request.prompt, case["prompt"].as_str().unwrap());
        let prompt =
            with_placeholder(&request.prompt, request.subject.as_deref().unwrap()).unwrap();
        let u = mean_key(
            &model,
            5,
            &["{}".to_string()],
            &prompt,
            request.subject.as_deref().unwrap(),
            FactToken::SubjectLast,
        )
        .unwrap();
        let u = (&u
            / u.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .sqrt()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64)
            .unwrap();
        let u_vec: Vec<f32> = u.to_vec1().unwrap();
        let want_u = f32s(&case["u_first16"]);
        assert!(
            rel_l2(&u_vec[..16], &want_u) < 1e-4,
            "case {i}: u {:?} vs {want_u:?}",
            &u_vec[..16]
        );

        let (pre_top, _) = next_token_top(&model, &request.prompt);
        assert_eq!(pre_top, u32s(&case["pre_top5"])[0]);
        let edit = editor
            .apply(
                &mut model,
                std::slice::from_ref(request),
                &EditCtx::default(),
            )
            .unwrap();
        assert_eq!(edit.changes.len(), 1);
        let change = edit.weight_changes().next().unwrap();
        assert_eq!(
            model.checkpoint_name(change.id).unwrap(),
            case["weight"].as_str().unwrap()
        );
        let delta = (&change.after - &change.before).unwrap();
        // ΔW = w uᵀ with ‖u‖ = 1, so w = ΔW u.
        let w: Vec<f32> = delta
            .matmul(&u.unsqueeze(1).unwrap())
            .unwrap()
            .squeeze(1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let w_norm = w.iter().map(|x| x * x).sum::<f32>().sqrt();
        let want_norm = case["v_norm"].as_f64().unwrap() as f32;
        assert!(
            (w_norm - want_norm).abs() / want_norm < 1e-2,
            "case {i}: |v| {w_norm} vs {want_norm}"
        );
        let want_v = f32s(&case["v_first16"]);
        assert!(
            rel_l2(&w[..16], &want_v) < 1e-2,
            "case {i}: v {:?} vs {want_v:?}",
            &w[..16]
        );

        let (post_top, logits) = next_token_top(&model, &request.prompt);
        let target = case["target_first_token"].as_u64().unwrap() as u32;
        assert_eq!(
            post_top, target,
            "case {i}: the target is the argmax after the edit"
        );
        assert_eq!(post_top, u32s(&case["post_top5"])[0]);
        let lp = kedit::model::Model::log_probs(&logits)
            .unwrap()
            .i(target as usize)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        eprintln!(
            "case {i}: target log-prob {lp} (EasyEdit {})",
            case["post_target_logprob"]
        );
        edit.undo(&mut model).unwrap();
    }
}

#[test]
fn fact_token_from_offsets_agrees_with_easyedits_token_counts() {
    let model = smollm2();
    let data = read_dataset(&fixture("data/counterfact_easyedit_edit.json"), None).unwrap();
    for (i, r) in data.cases.iter().take(100) {
        let subject = r.subject.as_deref().unwrap();
        let template = with_placeholder(&r.prompt, subject).unwrap();
        for rule in [FactToken::SubjectLast, FactToken::Last] {
            let (text, by_offsets) = fact_token(&model, &template, subject, rule).unwrap();
            assert_eq!(text, r.prompt);
            let by_counts = fact_token_by_counts(&model, &template, subject, rule).unwrap();
            assert_eq!(by_offsets, by_counts, "record {i} {rule:?}: {:?}", r.prompt);
        }
        // EasyEdit's `subject_first` counts the tokens of the prefix alone, whose trailing space
        // byte-level BPE makes a token of its own: one past the subject's first token ("Dan" of
        // " Danielle"). The offsets find the token that holds the subject's first byte.
        let (_, first) = fact_token(&model, &template, subject, FactToken::SubjectFirst).unwrap();
        let by_counts =
            fact_token_by_counts(&model, &template, subject, FactToken::SubjectFirst).unwrap();
        let ids = model.encode(&r.prompt).unwrap();
        let first_piece = model.decode(&ids[first..=first]).unwrap();
        assert!(
            subject.starts_with(first_piece.trim_start())
                || first_piece.trim_start().starts_with(subject),
            "record {i}: {first_piece:?} does not start {subject:?}"
        );
        assert!(by_counts == first || by_counts == first + 1, "record {i}");
    }
}

#[test]
fn rome_with_statistics_writes_along_the_inverse_covariance_of_the_key() {
    use kedit::editors::rank_one::solve::{solve_vector, to_mat};
    use kedit::editors::rank_one::stats::{second_moments, Corpus, StatsStore};
    let mut model = smollm2();
    let data = read_dataset(&fixture("data/counterfact_easyedit_edit.json"), None).unwrap();
    let request = &data.cases[0].1;
    let subject = request.subject.as_deref().unwrap();
    let prompt = with_placeholder(&request.prompt, subject).unwrap();
    let k = mean_key(
        &model,
        5,
        &["{}".to_string()],
        &prompt,
        subject,
        FactToken::SubjectLast,
    )
    .unwrap();
    let c = second_moments(
        &model,
        &[5],
        &Corpus::builtin(),
        &StatsStore::in_memory().options(4).unwrap(),
        &mut |_, _| {},
    )
    .unwrap();
    let u = solve_vector(to_mat(&c[0].second_moment).unwrap(), &k).unwrap();
    let u = (&u
        / u.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64)
        .unwrap();

    let mut editor = build_editor("ROME", &fixture("hparams/rome-mom2-smollm2-test.yaml")).unwrap();
    let start = std::time::Instant::now();
    let edit = editor
        .apply(
            &mut model,
            std::slice::from_ref(request),
            &EditCtx::default(),
        )
        .unwrap();
    let wall = start.elapsed().as_secs_f64();
    // The edit says where its time went: every phase, each counted once, within the wall time.
    let phases: Vec<(&str, f64)> = edit.phases.iter().collect();
    let names: Vec<&str> = phases.iter().map(|p| p.0).collect();
    assert_eq!(
        names,
        ["templates", "statistics", "keys", "values", "solve"]
    );
    let total: f64 = phases.iter().map(|p| p.1).sum();
    assert!(
        phases.iter().all(|p| p.1 >= 0.0) && total <= wall,
        "{phases:?} in {wall} s"
    );
    // One value optimisation (one fact, one layer): it stops early only below EasyEdit's loss
    // floor of 5e-2, else it runs all 25 steps.
    let fits = &edit
        .report_as::<kedit::editors::rank_one::values::ValueReport>()
        .unwrap()
        .value_fits;
    assert_eq!(fits.len(), 1, "{fits:?}");
    assert!(
        (1..=25).contains(&fits[0].steps)
            && fits[0].loss.is_finite()
            && (fits[0].steps == 25 || fits[0].loss < 5e-2),
        "{fits:?}"
    );

    let change = edit.weight_changes().next().unwrap();
    let delta = (&change.after - &change.before).unwrap();
    // ΔW = w uᵀ: nothing of ΔW is left once its component along u is taken out.
    let w = delta.matmul(&u.unsqueeze(1).unwrap()).unwrap();
    let rest = (&delta - w.matmul(&u.unsqueeze(0).unwrap()).unwrap()).unwrap();
    let norm = |t: &candle_core::Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert!(
        norm(&rest) < 1e-4 * norm(&delta),
        "{} vs {}",
        norm(&rest),
        norm(&delta)
    );
    let (top, _) = next_token_top(&model, &request.prompt);
    assert_eq!(top, model.encode(" English").unwrap()[0]);
}
