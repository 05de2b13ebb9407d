//! `kedit export`: an edited model written as a Hugging Face folder loads back with the edited
//! model's logits, calibration neurons fold into wider MLPs, and what cannot be exported (GRACE's
//! codebook, an existing folder) is refused with nothing written.

mod common;

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use common::*;
use kedit::editors::memory::{CaliNet, CaliNetParams, CalibrationFfn, Grace, GraceParams};
use kedit::editors::{patch, Change, Edit, EditCtx, Editor, WeightChange};
use kedit::model::{export_gguf, export_hf, Activation, GgufBlocks, Module, Site, WeightId};

const PROMPT: &str = "The capital of France is";

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn a_weight_edit_exported_by_the_cli_loads_back_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let mut model = tiny_gpt2();
    let ids = model.encode(PROMPT).unwrap();
    let plain = logits_alone(&model, &ids);
    let base = model.fingerprint().unwrap();
    // Two kinds of weight: a Conv1D matrix GPT-2 stores transposed, and a bias.
    let mut changes = Vec::new();
    for id in [
        WeightId::layer(1, Module::MlpDown),
        WeightId::layer(0, Module::MlpUp).bias(),
    ] {
        let before = model.weight(id).unwrap();
        let after = (&before * 1.25).unwrap();
        model.replace_weight(id, after.clone()).unwrap();
        changes.push(Change::Weight(WeightChange { id, before, after }));
    }
    let edit = Edit {
        changes,
        ..Edit::default()
    };
    let edited = logits_alone(&model, &ids);
    assert!(
        max_abs_diff(&plain, &edited) > 1e-3,
        "the edit changed nothing"
    );
    let file = tmp.path().join("edit.safetensors");
    patch::save(&file, &model, "test", &base, &edit, None).unwrap();

    let out = tmp.path().join("exported");
    let source = fixture("tiny-gpt2");
    let stdout = ok(&kedit(&[
        "export",
        "--model",
        source.to_str().unwrap(),
        "--dtype",
        "f32",
        "--patch",
        file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(stdout.contains("wrote"), "{stdout}");
    let exported = load_as(&out, DType::F32);
    assert_eq!(max_abs_diff(&edited, &logits_alone(&exported, &ids)), 0.0);

    // The config is the source's, the tokenizer files are copied as they are, and the export
    // says what it was made from.
    let mut config = read_json(&out.join("config.json"));
    assert_eq!(config["torch_dtype"], "float32");
    config.as_object_mut().unwrap().remove("torch_dtype");
    let mut original = read_json(&source.join("config.json"));
    original.as_object_mut().unwrap().remove("torch_dtype");
    assert_eq!(config, original);
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        std::fs::read(source.join("tokenizer.json")).unwrap()
    );
    let provenance = read_json(&out.join("kedit-export.json"));
    assert_eq!(provenance["patches"][0]["method"], "test");
    assert_eq!(provenance["source_fingerprint"], base.as_str());

    // A second export onto the same folder is refused, and the folder is left as it was.
    let before: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let again = kedit_with_backtraces(&[
        "export",
        "--model",
        source.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_one_line_error(&again, &["exported", "already exists"]);
    // GGUF from a GPT-2 folder, its metadata made from the config and tokenizer.json: the edited
    // model reads back bit for bit, with the same tokens.
    let gguf = tmp.path().join("tiny.gguf");
    ok(&kedit(&[
        "export",
        "--model",
        source.to_str().unwrap(),
        "--dtype",
        "f32",
        "--patch",
        file.to_str().unwrap(),
        "--gguf",
        gguf.to_str().unwrap(),
    ]));
    let reread = load_as(&gguf, DType::F32);
    assert_eq!(max_abs_diff(&edited, &logits_alone(&reread, &ids)), 0.0);
    assert_eq!(reread.encode(PROMPT).unwrap(), ids);
    for (flags, needles) in [
        (["--quantize", "q3_k", "--gguf"], ["q3_k", "q8_0"]),
        (["--quantize", "q8_0", "--out"], ["--quantize", "--gguf"]),
    ] {
        let target = tmp.path().join("not-written");
        let mut args = vec!["export", "--model", source.to_str().unwrap()];
        args.extend(flags);
        args.push(target.to_str().unwrap());
        assert_one_line_error(&kedit_with_backtraces(&args), &needles);
        assert!(!target.exists());
    }
    let after: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(before, after);
    assert_eq!(
        max_abs_diff(&edited, &logits_alone(&load_as(&out, DType::F32), &ids)),
        0.0
    );

    // A model loaded with --tokenizer exports that tokenizer, not the source folder's.
    let given = tmp.path().join("given-tokenizer.json");
    let pretty = serde_json::to_string_pretty(&read_json(&source.join("tokenizer.json"))).unwrap();
    std::fs::write(&given, &pretty).unwrap();
    let with_given = tmp.path().join("with-given");
    ok(&kedit(&[
        "export",
        "--model",
        source.to_str().unwrap(),
        "--tokenizer",
        given.to_str().unwrap(),
        "--out",
        with_given.to_str().unwrap(),
    ]));
    assert_eq!(
        std::fs::read_to_string(with_given.join("tokenizer.json")).unwrap(),
        pretty
    );
    assert!(with_given.join("tokenizer_config.json").is_file());

    // GGUF is written for byte-level BPE only: a tokenizer with byte fallback (LLaMA-2's kind)
    // is refused in one line, and no file is left.
    let mut fallback = read_json(&source.join("tokenizer.json"));
    fallback["model"]["byte_fallback"] = true.into();
    let fallback_file = tmp.path().join("fallback-tokenizer.json");
    std::fs::write(&fallback_file, fallback.to_string()).unwrap();
    let refused_gguf = tmp.path().join("fallback.gguf");
    let refused = kedit_with_backtraces(&[
        "export",
        "--model",
        source.to_str().unwrap(),
        "--tokenizer",
        fallback_file.to_str().unwrap(),
        "--gguf",
        refused_gguf.to_str().unwrap(),
    ]);
    assert_one_line_error(&refused, &["byte fallback", "convert_hf_to_gguf"]);
    assert!(!refused_gguf.exists());
}

#[test]
fn calinet_neurons_fold_into_a_wider_gpt2_mlp_and_grace_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut params: CaliNetParams = serde_yaml::from_str(
        &std::fs::read_to_string(root.join("hparams/CaliNet/gpt2-xl.yaml")).unwrap(),
    )
    .unwrap();
    params.kb_layer = vec![1];
    params.num_steps = 100;
    let mut model = tiny_gpt2();
    let ids = model.encode(PROMPT).unwrap();
    let plain = logits_alone(&model, &ids);
    let target = first_token(&model, "Rome");
    let mut calinet = CaliNet::new(params).unwrap();
    calinet
        .apply(&mut model, &[request(PROMPT, "Rome")], &EditCtx::default())
        .unwrap();
    let neurons = model
        .overlay_as::<CalibrationFfn>(Site::MlpOut(1))
        .unwrap()
        .neurons();
    let edited = logits_alone(&model, &ids);
    assert_eq!(next_token(&model, PROMPT), target);

    let out = tmp.path().join("calinet");
    let written = export_hf(&model, &out, DType::F32, 1 << 30, &serde_json::json!({})).unwrap();
    assert_eq!(written.added_mlp_neurons, neurons);
    let exported = load_as(&out, DType::F32);
    let spec = exported.spec();
    assert_eq!(spec.d_mlp, model.spec().d_mlp + neurons);
    assert!(exported.overlays().next().is_none());
    let folded = logits_alone(&exported, &ids);
    assert!(max_abs_diff(&plain, &folded) > 1e-2);
    assert!(
        max_abs_diff(&edited, &folded) < 1e-4,
        "{}",
        max_abs_diff(&edited, &folded)
    );
    assert_eq!(next_token(&exported, PROMPT), target);
    // Layer 0 had no neurons: its padding is zero.
    let padded = exported
        .weight(WeightId::layer(0, Module::MlpUp))
        .unwrap()
        .narrow(0, model.spec().d_mlp, neurons)
        .unwrap();
    assert_eq!(
        padded
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );

    // GRACE's codebook has no weights to become: refused, naming it, with nothing written.
    let mut grace_params: GraceParams = serde_yaml::from_str(
        &std::fs::read_to_string(root.join("hparams/GRACE/gpt2-xl.yaml")).unwrap(),
    )
    .unwrap();
    grace_params.inner_params = vec!["transformer.h[1].mlp.c_fc.weight".into()];
    grace_params.n_iter = 40;
    let mut model = tiny_gpt2();
    Grace::new(grace_params)
        .unwrap()
        .apply(&mut model, &[request(PROMPT, "Rome")], &EditCtx::default())
        .unwrap();
    let refused = tmp.path().join("grace");
    let err = export_hf(
        &model,
        &refused,
        DType::F32,
        1 << 30,
        &serde_json::json!({}),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("GRACE") && err.contains("--patch"), "{err}");
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(!left.iter().any(|n| n.contains("grace")), "{left:?}");
}

/// SmolLM2 from its GGUF: the export is sharded, carries a tokenizer and config transformers
/// reads, and loads back with the logits of the dense in-process model; gated calibration
/// neurons fold into `gate_proj`/`up_proj` rows and `down_proj` columns.
#[test]
fn a_gguf_llama_exports_sharded_and_its_gated_neurons_fold() {
    let tmp = tempfile::tempdir().unwrap();
    let mut model = smollm2();
    model.discard_packed_weights().unwrap();
    let ids = model.encode(PROMPT).unwrap();
    let plain = logits_alone(&model, &ids);

    // GGUF carries the source GGUF's tokenizer over, so one given with --tokenizer is refused.
    let gguf = tmp.path().join("retokenized.gguf");
    let refused = kedit_with_backtraces(&[
        "export",
        "--model",
        smollm2_path().to_str().unwrap(),
        "--tokenizer",
        fixture("smollm2/tokenizer.json").to_str().unwrap(),
        "--gguf",
        gguf.to_str().unwrap(),
    ]);
    assert_one_line_error(&refused, &["tokenizer.json", "--out"]);
    assert!(!gguf.exists());

    let out = tmp.path().join("plain");
    let written = export_hf(
        &model,
        &out,
        DType::F32,
        200_000_000,
        &serde_json::json!({}),
    )
    .unwrap();
    assert!(
        written
            .files
            .iter()
            .filter(|f| f.ends_with(".safetensors"))
            .count()
            >= 3
    );
    let index = read_json(&out.join("model.safetensors.index.json"));
    assert_eq!(
        index["weight_map"].as_object().unwrap().len(),
        written.tensors
    );
    let config = read_json(&out.join("config.json"));
    let reference = read_json(&fixture("smollm2/config.json"));
    for field in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "tie_word_embeddings",
        "rms_norm_eps",
    ] {
        match (config[field].as_f64(), reference[field].as_f64()) {
            (Some(ours), Some(theirs)) => assert_eq!(ours, theirs, "{field}"),
            _ => assert_eq!(config[field], reference[field], "{field}"),
        }
    }
    // transformers 5 nests the rotary base under rope_parameters and still reads it at the top.
    assert_eq!(
        config["rope_theta"].as_f64(),
        reference["rope_parameters"]["rope_theta"].as_f64()
    );
    let exported = load_as(&out, DType::F32);
    assert_eq!(max_abs_diff(&plain, &logits_alone(&exported, &ids)), 0.0);
    let text = "Danielle Darrieux's mother tongue is French.";
    assert_eq!(exported.encode(text).unwrap(), model.encode(text).unwrap());
    assert_eq!(exported.chat_template(), model.chat_template());

    // GGUF from that folder: the metadata llama.cpp's convert_hf_to_gguf.py wrote into the
    // SmolLM2 GGUF (hyperparameters, tokens and their types, merges, pre-tokeniser, special ids,
    // chat template) come out the same from the folder's config and tokenizer.json, and the file
    // reads back bit for bit.
    let from_folder = tmp.path().join("from-folder.gguf");
    export_gguf(
        &exported,
        &from_folder,
        DType::F32,
        None,
        &serde_json::json!({}),
    )
    .unwrap();
    let metadata = |path: &Path| {
        let mut file = std::fs::File::open(path).unwrap();
        candle_core::quantized::gguf_file::Content::read(&mut file)
            .unwrap()
            .metadata
    };
    let theirs = metadata(&smollm2_path());
    let ours = metadata(&from_folder);
    // Descriptions (name, licence, ...) are not in a folder's config; the unknown-token id is
    // in tokenizer_config.json, which kedit does not read; the file type is Q4_1 there.
    let not_compared = |k: &str| {
        (k.starts_with("general.") && k != "general.architecture")
            || k == "tokenizer.ggml.unknown_token_id"
            || k == "kedit.export"
    };
    let mut compared = 0;
    for (key, value) in &theirs {
        if not_compared(key) {
            continue;
        }
        let mine = ours.get(key).unwrap_or_else(|| panic!("{key} is missing"));
        assert_eq!(format!("{mine:?}"), format!("{value:?}"), "{key}");
        compared += 1;
    }
    assert!(compared >= 20, "only {compared} keys compared");
    for key in ours.keys() {
        assert!(
            theirs.contains_key(key) || not_compared(key),
            "{key} is extra"
        );
    }
    let reread = load_as(&from_folder, DType::F32);
    assert_eq!(max_abs_diff(&plain, &logits_alone(&reread, &ids)), 0.0);
    assert_eq!(reread.encode(text).unwrap(), model.encode(text).unwrap());
    drop((exported, reread));

    // The same as GGUF: f32 reads back bit for bit (query and key rows go back into llama.cpp's
    // rotary order, which the loader undoes); f16 holds every weight rounded to f16.
    let gguf = tmp.path().join("plain.gguf");
    export_gguf(&model, &gguf, DType::F32, None, &serde_json::json!({})).unwrap();
    let reread = load_as(&gguf, DType::F32);
    assert_eq!(max_abs_diff(&plain, &logits_alone(&reread, &ids)), 0.0);
    assert_eq!(reread.encode(text).unwrap(), model.encode(text).unwrap());
    assert_eq!(reread.chat_template(), model.chat_template());
    drop(reread);
    let half = tmp.path().join("half.gguf");
    export_gguf(&model, &half, DType::F16, None, &serde_json::json!({})).unwrap();
    let reread = load_as(&half, DType::F32);
    for id in [
        WeightId::layer(4, Module::AttnQ),
        WeightId::layer(4, Module::AttnK),
        WeightId::layer(4, Module::MlpDown),
    ] {
        let rounded = model
            .weight(id)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(
            max_abs_diff(&rounded, &reread.weight(id).unwrap()),
            0.0,
            "{id}"
        );
    }
    drop(reread);
    // Q8_0: every matrix reads back as candle's quantisation of it (which is llama.cpp's, see
    // candle_quantises_blocks_as_llama_cpp_does), vectors stay f32, the answer stays the same.
    let blocks = tmp.path().join("q8_0.gguf");
    export_gguf(
        &model,
        &blocks,
        DType::F32,
        Some(GgufBlocks::Q8_0),
        &serde_json::json!({}),
    )
    .unwrap();
    let reread = load_as(&blocks, DType::F32);
    for id in [
        WeightId::layer(4, Module::AttnQ),
        WeightId::layer(4, Module::AttnK),
        WeightId::layer(4, Module::MlpDown),
        WeightId::layer(4, Module::MlpNorm),
    ] {
        let original = model.weight(id).unwrap();
        let expected = if original.rank() == 2 {
            QTensor::quantize(&original, GgmlDType::Q8_0)
                .unwrap()
                .dequantize(&candle_core::Device::Cpu)
                .unwrap()
        } else {
            original
        };
        assert_eq!(
            max_abs_diff(&expected, &reread.weight(id).unwrap()),
            0.0,
            "{id}"
        );
    }
    let quantised = logits_alone(&reread, &ids);
    let argmax = |t: &Tensor| {
        t.argmax(candle_core::D::Minus1)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap()
    };
    assert_eq!(argmax(&quantised), argmax(&plain));
    assert!(relative_gap(&quantised, &plain) < 0.05);
    drop(reread);
    let err = export_gguf(&model, &half, DType::F16, None, &serde_json::json!({}))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("half.gguf") && err.contains("already exists"),
        "{err}"
    );

    let (n, d) = (6, model.spec().d_model);
    let neurons = CalibrationFfn {
        activation: Activation::Silu,
        w_in: sine_matrix(n, d, 0.5, 0.1, model.device()),
        w_gate: Some(sine_matrix(n, d, 0.5, 0.7, model.device())),
        w_out: sine_matrix(d, n, 2.0, 0.3, model.device()),
    };
    model
        .set_overlay(Site::MlpOut(3), Some(Arc::new(neurons)))
        .unwrap();
    let edited = logits_alone(&model, &ids);
    assert!(
        max_abs_diff(&plain, &edited) > 1e-2,
        "the neurons changed nothing"
    );
    let out = tmp.path().join("calibrated");
    export_hf(&model, &out, DType::F32, 1 << 30, &serde_json::json!({})).unwrap();
    assert_eq!(
        read_json(&out.join("config.json"))["intermediate_size"],
        model.spec().d_mlp + n
    );
    let folded = logits_alone(&load_as(&out, DType::F32), &ids);
    assert!(
        relative_gap(&edited, &folded) < 1e-5,
        "{}",
        relative_gap(&edited, &folded)
    );
}

/// The block types a quantised GGUF export writes are quantised by candle exactly as llama.cpp's
/// gguf-py quantises them (`scripts/make-quant-fixture.py` made the bytes: a 6 × 64 matrix with an
/// all-zero block, an outlier and a one-sign block).
#[test]
fn candle_quantises_blocks_as_llama_cpp_does() {
    let dir = fixture("quant");
    let bytes = std::fs::read(dir.join("matrix-6x64.f32")).unwrap();
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let matrix = candle_core::Tensor::from_vec(values, (6, 64), &candle_core::Device::Cpu).unwrap();
    for (name, dtype) in [
        ("q4_0", GgmlDType::Q4_0),
        ("q4_1", GgmlDType::Q4_1),
        ("q5_0", GgmlDType::Q5_0),
        ("q5_1", GgmlDType::Q5_1),
        ("q8_0", GgmlDType::Q8_0),
    ] {
        let theirs = std::fs::read(dir.join(format!("matrix-6x64.{name}"))).unwrap();
        let ours = QTensor::quantize(&matrix, dtype).unwrap();
        assert!(ours.data().unwrap().as_ref() == theirs.as_slice(), "{name}");
    }
}

/// GPT-2 stores its Conv1D matrices `[in, out]`; the loader reads half-precision ones straight
/// into their `[out, in]` transpose. Exported in f16 and bf16 and loaded back, every weight must
/// be the f32 model's weight rounded by candle, bit for bit.
#[test]
fn half_precision_gpt2_folders_load_transposed_to_the_rounded_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_gpt2();
    for dtype in [DType::F16, DType::BF16] {
        let out = tmp.path().join(format!("{dtype:?}"));
        export_hf(&model, &out, dtype, 200_000_000, &serde_json::json!({})).unwrap();
        let loaded = load_as(&out, dtype);
        let mut transposed = 0;
        for id in model.weight_ids().collect::<Vec<_>>() {
            let want = model.weight(id).unwrap().to_dtype(dtype).unwrap();
            let got = loaded.weight(id).unwrap();
            assert_eq!(got.dtype(), dtype, "{id}");
            assert_eq!(got.dims(), want.dims(), "{id}");
            let bits = |t: &Tensor| {
                t.flatten_all()
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            };
            assert_eq!(bits(&got), bits(&want), "{dtype:?} {id}");
            transposed += usize::from(got.dims().len() == 2 && got.dims()[0] != got.dims()[1]);
        }
        assert!(transposed >= 4, "only {transposed} rectangular matrices");
    }
}
