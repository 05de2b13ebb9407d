//! The `kedit` binary as a user runs it: output, exit codes, and one-line errors for bad input.

mod common;

use std::path::Path;

use common::*;

/// A copy of the tiny GPT-2 folder in `dir`, with `edit` applied to it.
fn tiny_copy(dir: &Path, edit: impl FnOnce(&Path)) -> String {
    let folder = dir.join("model");
    std::fs::create_dir_all(&folder).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny-gpt2").join(f), folder.join(f)).unwrap();
    }
    edit(&folder);
    folder.to_str().unwrap().to_string()
}

#[test]
fn every_command_has_help() {
    for args in [
        vec!["--help"],
        vec!["generate", "--help"],
        vec!["inspect", "--help"],
    ] {
        let out = kedit(&args);
        assert!(out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{args:?}"
        );
    }
}

#[test]
fn generate_json_reports_ids_text_and_top5_per_step() {
    let tiny = fixture("tiny-gpt2");
    let out = kedit(&[
        "generate",
        "--model",
        tiny.to_str().unwrap(),
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "8",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reference = &read_json("tiny-gpt2/reference_outputs.json")["prompts"][0];
    assert_eq!(json["prompt_ids"], reference["input_ids"]);
    assert_eq!(json["generated_ids"], reference["greedy_new_ids"]);
    let steps = json["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 8);
    assert_eq!(steps[0]["ids"], reference["top5_ids"]);
    assert_eq!(steps[0]["logits"].as_array().unwrap().len(), 5);
    assert!(json["text"].is_string());
}

#[test]
fn generate_on_smollm2_says_paris() {
    let out = kedit(&[
        "generate",
        "-m",
        smollm2_path().to_str().unwrap(),
        "-p",
        "The capital of France is",
        "--max-new-tokens",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        "The capital of France is Paris."
    );
}

#[test]
fn top_k_sampling_is_reproducible_with_a_seed() {
    let tiny = fixture("tiny-gpt2");
    let run = |seed: &str| {
        kedit(&[
            "generate",
            "-m",
            tiny.to_str().unwrap(),
            "-p",
            "Hello",
            "--top-k",
            "5",
            "--seed",
            seed,
            "--max-new-tokens",
            "12",
        ])
        .stdout
    };
    assert_eq!(run("7"), run("7"));
    assert_ne!(run("7"), run("8"));
}

#[test]
fn inspect_describes_the_model() {
    let out = kedit(&["inspect", "-m", smollm2_path().to_str().unwrap(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let config = read_json("smollm2/config.json");
    assert_eq!(json["arch"], "llama");
    assert_eq!(json["n_layers"], config["num_hidden_layers"]);
    assert_eq!(json["d_mlp"], config["intermediate_size"]);
    assert_eq!(json["n_kv_heads"], config["num_key_value_heads"]);
    assert_eq!(json["vocab_size"], config["vocab_size"]);
    assert_eq!(json["dtype"], "f32");
    assert_eq!(json["origin"]["kind"], "gguf");
    // SmolLM2-135M: the name says 135M parameters.
    let n = json["n_params"].as_u64().unwrap();
    assert!((130_000_000..140_000_000).contains(&n), "{n}");
}

#[test]
fn truncated_safetensors_is_a_one_line_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_copy(tmp.path(), |f| {
        let p = f.join("model.safetensors");
        let data = std::fs::read(&p).unwrap();
        std::fs::write(&p, &data[..data.len() / 2]).unwrap();
    });
    let out = kedit(&["inspect", "-m", &model]);
    assert_one_line_error(&out, &["model.safetensors", "truncated"]);
}

#[test]
fn truncated_gguf_is_a_one_line_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = std::fs::read(smollm2_path()).unwrap();
    for (name, keep) in [("header.gguf", 4096), ("tensors.gguf", 20 << 20)] {
        let p = tmp.path().join(name);
        std::fs::write(&p, &data[..keep]).unwrap();
        let out = kedit_with_backtraces(&["inspect", "-m", p.to_str().unwrap()]);
        assert_one_line_error(&out, &[name]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("backtrace")
                && !stderr.contains("candle_core::")
                && stderr.len() < 400,
            "a backtrace in the message: {stderr}"
        );
    }
}

#[test]
fn unknown_model_type_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_copy(tmp.path(), |f| {
        let p = f.join("config.json");
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("\"gpt2\"", "\"bert\"");
        std::fs::write(&p, text).unwrap();
    });
    let out = kedit(&["inspect", "-m", &model]);
    assert_one_line_error(
        &out,
        &["config.json", "model_type \"bert\" is not supported"],
    );
}

#[test]
fn missing_tokenizer_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_copy(tmp.path(), |f| {
        std::fs::remove_file(f.join("tokenizer.json")).unwrap()
    });
    let out = kedit(&["inspect", "-m", &model]);
    assert_one_line_error(&out, &["tokenizer.json", "missing"]);
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let tiny = fixture("tiny-gpt2");
    let prompt = "word ".repeat(80);
    let out = kedit(&[
        "generate",
        "-m",
        tiny.to_str().unwrap(),
        "-p",
        &prompt,
        "--max-new-tokens",
        "1",
    ]);
    assert_one_line_error(&out, &["longer than the model's context of 64 positions"]);
}

#[test]
fn nonexistent_model_and_bad_device_are_refused() {
    let out = kedit(&["inspect", "-m", "/nonexistent/model"]);
    assert_one_line_error(&out, &["/nonexistent/model", "no such file"]);
    let tiny = fixture("tiny-gpt2");
    let out = kedit(&["inspect", "-m", tiny.to_str().unwrap(), "--device", "tpu"]);
    assert_one_line_error(&out, &["--device tpu"]);
    // A job script's device comes from KEDIT_DEVICE; a bad one is named as the environment's.
    let from_env = kedit_command()
        .args(["inspect", "-m", tiny.to_str().unwrap()])
        .env("KEDIT_DEVICE", "cuda:x")
        .output()
        .unwrap();
    assert_one_line_error(&from_env, &["KEDIT_DEVICE=cuda:x", "not a GPU ordinal"]);
    let overridden = kedit_command()
        .args(["inspect", "-m", tiny.to_str().unwrap(), "--device", "cpu"])
        .env("KEDIT_DEVICE", "cuda:x")
        .output()
        .unwrap();
    ok(&overridden);
}

/// `--threads` changes how the work is split, not what it computes: one thread and two give the
/// transformers reference's greedy continuation; zero threads is refused.
#[test]
fn threads_change_the_split_not_the_result() {
    let tiny = fixture("tiny-gpt2");
    let reference = &read_json("tiny-gpt2/reference_outputs.json")["prompts"][0];
    for threads in ["1", "2"] {
        let out = kedit(&[
            "--threads",
            threads,
            "generate",
            "--model",
            tiny.to_str().unwrap(),
            "--prompt",
            "The capital of France is",
            "--max-new-tokens",
            "8",
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            json["generated_ids"], reference["greedy_new_ids"],
            "--threads {threads}"
        );
    }
    let out = kedit(&["inspect", "--threads", "0", "-m", tiny.to_str().unwrap()]);
    assert_one_line_error(&out, &["--threads 0"]);
}

#[test]
fn a_model_larger_than_memory_is_refused_before_loading() {
    let tmp = tempfile::tempdir().unwrap();
    // The tiny GPT-2's files under a config of 200 layers of width 16,384 (~650B parameters):
    // the plan is checked before any weight is read, so the missing tensors never matter.
    let model = tiny_copy(tmp.path(), |folder| {
        let path = folder.join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config["n_embd"] = 16384.into();
        config["n_layer"] = 200.into();
        std::fs::write(&path, config.to_string()).unwrap();
    });
    let out = kedit_with_backtraces(&["inspect", "--model", &model, "--dtype", "f32"]);
    assert_one_line_error(&out, &[&model, "GiB in f32", "of memory is available"]);
}
