//! Locate-then-edit on SmolLM2 by the properties that define a successful edit: after ROME,
//! MEMIT (a batch of 10) and AlphaEdit (10 sequential edits) the targets are the argmax for their
//! prompts, and prompts about other things keep their argmax. Every edit undoes exactly.

mod common;

use candle_core::{IndexOp, D};
use common::*;
use kedit::data::{read_dataset, EditRequest};
use kedit::editors::{build_editor, EditCtx, Editor};
use kedit::model::Model;

fn argmax_next(model: &Model, prompt: &str) -> u32 {
    let ids = model.encode(prompt).unwrap();
    logits_alone(model, &ids)
        .i(ids.len() - 1)
        .unwrap()
        .argmax(D::Minus1)
        .unwrap()
        .to_scalar::<u32>()
        .unwrap()
}

fn first_target_token(model: &Model, r: &EditRequest) -> u32 {
    model.encode(&format!(" {}", r.target_new)).unwrap()[0]
}

fn counterfact(n: usize) -> Vec<EditRequest> {
    let data = read_dataset(&fixture("data/counterfact_easyedit_edit.json"), None).unwrap();
    data.cases.into_iter().take(n).map(|(_, r)| r).collect()
}

/// Share of requests whose target's first token is the argmax after the prompt.
fn rewritten(model: &Model, requests: &[EditRequest]) -> f64 {
    let hits = requests
        .iter()
        .filter(|r| argmax_next(model, &r.prompt) == first_target_token(model, r))
        .count();
    hits as f64 / requests.len() as f64
}

/// Share of the requests' locality prompts whose argmax is what the unedited model gave.
fn kept(model: &Model, requests: &[EditRequest], before: &[u32]) -> f64 {
    let prompts = locality_prompts(requests);
    let same = prompts
        .iter()
        .zip(before)
        .filter(|(p, b)| argmax_next(model, p) == **b)
        .count();
    same as f64 / prompts.len() as f64
}

fn locality_prompts(requests: &[EditRequest]) -> Vec<String> {
    requests
        .iter()
        .flat_map(|r| r.locality.values().flat_map(|s| s.prompt.clone()))
        .collect()
}

#[test]
fn rome_makes_the_target_the_argmax_and_leaves_neighbours() {
    let mut model = smollm2();
    let request = &counterfact(1)[0];
    assert_eq!(request.prompt, "The mother tongue of Danielle Darrieux is");
    let target = first_target_token(&model, request);
    let neighbours = locality_prompts(std::slice::from_ref(request));
    let before: Vec<u32> = neighbours.iter().map(|p| argmax_next(&model, p)).collect();
    let unedited = logits_alone(&model, &model.encode(&request.prompt).unwrap());
    assert_ne!(argmax_next(&model, &request.prompt), target);

    let hparams =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("hparams/ROME/smollm2-135m.yaml");
    let mut editor = build_editor("ROME", &hparams).unwrap();
    let edit = editor
        .apply(
            &mut model,
            std::slice::from_ref(request),
            &EditCtx::default(),
        )
        .unwrap();
    assert_eq!(argmax_next(&model, &request.prompt), target);
    // The rephrase ("Where Danielle Darrieux is from, people speak the language of") is not
    // asserted: the unedited SmolLM2 answers it " the" (p 0.56) with the true " French" at rank
    // 267, and gives the true answer to 2 of the first 50 CounterFact rephrases, so its argmax
    // there does not read the fact ROME rewrites (layers 1-12 measured; see the issue notes).
    for (p, b) in neighbours.iter().zip(&before) {
        assert_eq!(argmax_next(&model, p), *b, "{p:?}");
    }
    edit.undo(&mut model).unwrap();
    let restored = logits_alone(&model, &model.encode(&request.prompt).unwrap());
    assert_eq!(max_abs_diff(&unedited, &restored), 0.0);
}

#[test]
fn memit_writes_a_batch_of_ten_facts_at_once() {
    let mut model = smollm2();
    let requests = counterfact(10);
    let before: Vec<u32> = locality_prompts(&requests)
        .iter()
        .map(|p| argmax_next(&model, p))
        .collect();
    assert!(rewritten(&model, &requests) < 0.2);
    let mut editor = build_editor("MEMIT", &fixture("hparams/memit-smollm2-test.yaml")).unwrap();
    let edit = editor
        .apply(&mut model, &requests, &EditCtx::default())
        .unwrap();
    assert_eq!(edit.changes.len(), 5, "one down projection per layer");
    let fits = edit
        .report_as::<kedit::editors::rank_one::values::ValueReport>()
        .unwrap();
    assert_eq!(fits.value_fits.len(), 10, "one target vector per fact");
    let success = rewritten(&model, &requests);
    let locality = kept(&model, &requests, &before);
    eprintln!("MEMIT batch of 10: rewritten {success}, locality {locality}");
    assert!(success >= 0.9, "rewritten {success}");
    assert!(locality >= 0.8, "locality {locality}");
    edit.undo(&mut model).unwrap();
    assert!(rewritten(&model, &requests) < 0.2);
}

#[test]
fn alphaedit_keeps_earlier_edits_over_ten_sequential_ones() {
    let mut model = smollm2();
    let requests = counterfact(10);
    let before: Vec<u32> = locality_prompts(&requests)
        .iter()
        .map(|p| argmax_next(&model, p))
        .collect();
    let mut editor =
        build_editor("AlphaEdit", &fixture("hparams/alphaedit-smollm2-test.yaml")).unwrap();
    for r in &requests {
        editor
            .apply(&mut model, std::slice::from_ref(r), &EditCtx::default())
            .unwrap();
    }
    // After all ten, the earlier edits still hold.
    let success = rewritten(&model, &requests);
    let locality = kept(&model, &requests, &before);
    eprintln!("AlphaEdit 10 sequential: rewritten {success}, locality {locality}");
    assert!(success >= 0.8, "rewritten {success}");
    assert!(locality >= 0.8, "locality {locality}");
}

#[test]
fn an_undone_alphaedit_edit_leaves_nothing_in_the_key_memory() {
    let mut model = smollm2();
    let request = &counterfact(1)[0];
    let mut editor =
        kedit::editors::AlphaEdit::from_yaml(&fixture("hparams/alphaedit-smollm2-quick.yaml"))
            .unwrap();
    let first = editor
        .apply(
            &mut model,
            std::slice::from_ref(request),
            &EditCtx::default(),
        )
        .unwrap();
    let remembered = editor.memory_trace(7);
    assert!(remembered > 0.0);
    editor.undo(&mut model, &first).unwrap();
    assert!(
        editor.memory_trace(7).abs() < 1e-9 * remembered,
        "memory left: {}",
        editor.memory_trace(7)
    );
    // With the memory empty again, the same request gives the same update, not one held away
    // from the undone edit's keys.
    let second = editor
        .apply(
            &mut model,
            std::slice::from_ref(request),
            &EditCtx::default(),
        )
        .unwrap();
    for (a, b) in first.weight_changes().zip(second.weight_changes()) {
        let da = (&a.after - &a.before).unwrap();
        let db = (&b.after - &b.before).unwrap();
        let scale = da
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(max_abs_diff(&da, &db) <= 1e-4 * scale, "{:?}", a.id);
    }
}

/// AlphaEdit on the tiny GPT-2 with its projector read from `P_loc` (`[1, 128, 128]`), the
/// hparams file written into `dir`.
fn tiny_alphaedit_hparams(dir: &std::path::Path, p_loc: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join(format!(
        "{}.yaml",
        p_loc.file_stem().unwrap().to_str().unwrap()
    ));
    let yaml = tiny_alphaedit_yaml(&p_loc.display().to_string());
    std::fs::write(&path, yaml).unwrap();
    path
}

#[test]
fn alphaedit_reads_its_projector_from_p_loc() {
    let tmp = tempfile::tempdir().unwrap();
    let mut model = tiny_gpt2();
    let request = EditRequest {
        prompt: "The capital of France is".into(),
        target_new: "Rome".into(),
        subject: Some("France".into()),
        ..EditRequest::default()
    };
    // An all-zero projector lets no update through: the edit changes nothing.
    let zero = fixture("torch_file/zero-projector-1x128x128.pt");
    let mut editor = build_editor("AlphaEdit", &tiny_alphaedit_hparams(tmp.path(), &zero)).unwrap();
    let edit = editor
        .apply(
            &mut model,
            std::slice::from_ref(&request),
            &EditCtx::default(),
        )
        .unwrap();
    assert_eq!(edit.changes.len(), 1);
    let change = edit.weight_changes().next().unwrap();
    assert_eq!(max_abs_diff(&change.before, &change.after), 0.0);

    // A file of the wrong shape is refused, naming it.
    let wrong = fixture("torch_file/arange-2x3x4.pt");
    let mut editor =
        build_editor("AlphaEdit", &tiny_alphaedit_hparams(tmp.path(), &wrong)).unwrap();
    let err = editor
        .apply(
            &mut model,
            std::slice::from_ref(&request),
            &EditCtx::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("arange-2x3x4.pt") && err.contains("[1, 128, 128]"),
        "{err}"
    );
}

/// The cached projector file of AlphaEdit's edited layer under a statistics folder.
fn cached_projector(stats: &std::path::Path) -> std::path::PathBuf {
    let mut found = Vec::new();
    for model_dir in std::fs::read_dir(stats).unwrap() {
        for file in std::fs::read_dir(model_dir.unwrap().path()).unwrap() {
            let path = file.unwrap().path();
            if path.to_string_lossy().contains(".nullspace-") {
                found.push(path);
            }
        }
    }
    assert_eq!(found.len(), 1, "{found:?}");
    found.remove(0)
}

/// Writes `values` as a `[d, d]` projector file claiming to derive from statistics `source`.
fn write_projector(path: &std::path::Path, d: usize, values: &[f64], source: &str) {
    use sha2::{Digest, Sha256};
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let sum: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![d, d], &bytes).unwrap();
    let metadata = std::collections::HashMap::from([
        ("sha256".to_string(), sum),
        ("source_sha256".to_string(), source.to_string()),
    ]);
    let name = "nullspace-2e-2";
    std::fs::write(
        path,
        safetensors::serialize([(name, view)], Some(metadata)).unwrap(),
    )
    .unwrap();
}

#[test]
fn alphaedit_caches_its_projector_beside_the_statistics_and_rederives_a_bad_one() {
    use kedit::editors::rank_one::solve::{null_space_projector, to_mat};
    use kedit::editors::rank_one::stats::{second_moments, Corpus};
    let tmp = tempfile::tempdir().unwrap();
    let hparams = tmp.path().join("alphaedit.yaml");
    std::fs::write(&hparams, tiny_alphaedit_yaml("")).unwrap();
    let ctx = EditCtx::with_cache_dir(42, &tmp.path().join("cache"));
    let request = EditRequest {
        prompt: "The capital of France is".into(),
        target_new: "Rome".into(),
        subject: Some("France".into()),
        ..EditRequest::default()
    };
    // Each edit in a fresh model and editor, as a new process would make it.
    let edit = || {
        let mut model = tiny_gpt2();
        let mut editor = build_editor("AlphaEdit", &hparams).unwrap();
        let edit = editor
            .apply(&mut model, std::slice::from_ref(&request), &ctx)
            .unwrap();
        let change = edit.weight_changes().next().unwrap();
        (change.after.clone() - &change.before).unwrap()
    };
    let first = edit();
    let size = first.abs().unwrap().max_all().unwrap();
    assert!(size.to_scalar::<f32>().unwrap() > 0.0);

    // The file holds the projector of the statistics it sits beside, bit for bit.
    let stats_dir = ctx.stats.dir.clone().unwrap();
    let path = cached_projector(&stats_dir);
    let model = tiny_gpt2();
    let opts = ctx.stats.options(2).unwrap();
    let moments = second_moments(&model, &[1], &Corpus::builtin(), &opts, &mut |_, _| {}).unwrap();
    assert!(
        !moments[0].computed,
        "the statistics were cached by the edit"
    );
    let want = null_space_projector(&to_mat(&moments[0].second_moment).unwrap(), 2e-2).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let stored: Vec<f64> = file
        .tensor("nullspace-2e-2")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let d = want.nrows();
    assert_eq!(stored.len(), d * d);
    for (i, v) in stored.iter().enumerate() {
        assert_eq!(v.to_bits(), want[(i / d, i % d)].to_bits(), "entry {i}");
    }
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let source = header.metadata().clone().unwrap()["source_sha256"].clone();

    // A later editor reads the file: a zero projector there lets no update through.
    write_projector(&path, d, &vec![0.0; d * d], &source);
    let blocked = edit().abs().unwrap().max_all().unwrap();
    assert_eq!(blocked.to_scalar::<f32>().unwrap(), 0.0);

    // One derived from other statistics is derived afresh, and so is a damaged file.
    write_projector(&path, d, &vec![0.0; d * d], "statistics-since-replaced");
    assert_eq!(max_abs_diff(&edit(), &first), 0.0);
    let mut damaged = std::fs::read(&path).unwrap();
    let last = damaged.len() - 1;
    damaged[last] ^= 0x40;
    std::fs::write(&path, damaged).unwrap();
    assert_eq!(max_abs_diff(&edit(), &first), 0.0);
    // The same matrix and header entries (their order in the JSON header is a HashMap's).
    let contents = |bytes: &[u8]| {
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
        let file = safetensors::SafeTensors::deserialize(bytes).unwrap();
        let data = file.tensor("nullspace-2e-2").unwrap().data().to_vec();
        (header.metadata().clone(), data)
    };
    let rewritten = std::fs::read(&path).unwrap();
    assert!(
        contents(&rewritten) == contents(&bytes),
        "rewritten as first written"
    );
}
