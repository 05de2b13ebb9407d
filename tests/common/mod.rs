//! Shared helpers for the integration tests: fixture paths and the real SmolLM2 model.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use kedit::model::load::{load, DTypeChoice, LoadOptions};
use kedit::model::{HookSpec, Model, TokenBatch};

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

pub fn read_json(rel: &str) -> serde_json::Value {
    let path = fixture(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// The SmolLM2 GGUF fetched by `scripts/fetch-model.sh` (or `$KEDIT_SMOLLM2_GGUF`). A missing
/// model fails the test: the suite's command fetches it first, so absence is a real error.
pub fn smollm2_path() -> PathBuf {
    let path = kedit::model::load::fetched_smollm2(|k| std::env::var_os(k));
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-model.sh first",
        path.display()
    );
    path
}

/// The device the suite's models load on: CPU, or `KEDIT_TEST_DEVICE=cuda` (a build with
/// `--features cuda`) to run the same tests on a GPU. One per test process, as `kedit` has: each
/// `Device::new_cuda` is a device of its own, whose tensors do not mix with another's and which
/// loads candle's kernels again.
pub fn test_device() -> Device {
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| match std::env::var("KEDIT_TEST_DEVICE").as_deref() {
            Err(_) | Ok("") | Ok("cpu") => Device::Cpu,
            Ok("cuda") => Device::new_cuda(0).expect("KEDIT_TEST_DEVICE=cuda: no CUDA device"),
            Ok(other) => panic!("KEDIT_TEST_DEVICE={other}: expected cpu or cuda"),
        })
        .clone()
}

pub fn load_as(source: &Path, dtype: DType) -> Model {
    let opts = LoadOptions {
        device: test_device(),
        dtype: DTypeChoice::Exact(dtype),
        ..LoadOptions::default()
    };
    load(source.to_str().unwrap(), &opts)
        .unwrap_or_else(|e| panic!("loading {}: {e}", source.display()))
}

pub fn tiny_gpt2() -> Model {
    load_as(&fixture("tiny-gpt2"), DType::F32)
}

pub fn smollm2() -> Model {
    load_as(&smollm2_path(), DType::F32)
}

/// Logits `[s, vocab]` of one sequence, run alone.
pub fn logits_alone(model: &Model, ids: &[u32]) -> Tensor {
    let batch = TokenBatch::new(&[ids.to_vec()], 0, model.device()).unwrap();
    model
        .forward(&batch, &HookSpec::new())
        .unwrap()
        .logits
        .squeeze(0)
        .unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// `max |a − b| / max(1, max |b|)`.
pub fn relative_gap(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1.0);
    max_abs_diff(a, b) / scale
}

pub fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Relative L2 distance `|a - b| / |b|`.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f32>()
        .sqrt();
    let den: f32 = b.iter().map(|y| y * y).sum::<f32>().sqrt();
    num / den
}

/// The result lines with the (timing-dependent) `time` field removed.
pub fn results_without_time(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("time");
            v
        })
        .collect()
}

/// Runs the `kedit` binary.
pub fn kedit<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    kedit_command().args(args).output().unwrap()
}

/// The `kedit` binary, on the suite's device (`KEDIT_TEST_DEVICE`, handed on as `KEDIT_DEVICE`;
/// a `KEDIT_DEVICE` of the caller's own does not reach the tests).
pub fn kedit_command() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kedit"));
    match std::env::var("KEDIT_TEST_DEVICE").as_deref() {
        Ok(device) if !device.is_empty() => command.env("KEDIT_DEVICE", device),
        _ => command.env_remove("KEDIT_DEVICE"),
    };
    command
}

/// `kedit` with `RUST_BACKTRACE=1`, as many users run it: errors must still be one plain line.
pub fn kedit_with_backtraces<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    kedit_command()
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap()
}

/// The command succeeded; its stdout.
pub fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The command failed with exit code 2 and one line on stderr containing every `needle`.
pub fn assert_one_line_error(out: &std::process::Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    for n in needles {
        assert!(stderr.contains(n), "{n:?} not in: {stderr}");
    }
    assert!(
        out.stdout.is_empty(),
        "stdout on error: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// AlphaEdit hyperparameters for the tiny GPT-2 (`hparams/alphaedit-tiny-gpt2.yaml`: layer 1,
/// five value steps, statistics over two articles, the bare `{}` template), with its projector
/// file at `p_loc` (used when it exists).
pub fn tiny_alphaedit_yaml(p_loc: &str) -> String {
    let path = fixture("hparams/alphaedit-tiny-gpt2.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let line = "P_loc: \"./no-such-projector.pt\"";
    assert!(
        text.contains(line),
        "{} lost its P_loc line",
        path.display()
    );
    text.replace(line, &format!("P_loc: \"{p_loc}\""))
}

/// Training pairs (edit and locality prompt) of the ZsRE training sample in the fixtures.
pub fn zsre_pairs(
    range: std::ops::Range<usize>,
) -> Vec<kedit::editors::hypernet::trainer::TrainingPair> {
    let ds = kedit::data::read_dataset(&fixture("data/zsre_mend_train_sample.json"), None).unwrap();
    ds.cases[range]
        .iter()
        .map(|(_, r)| {
            kedit::editors::hypernet::trainer::TrainingPair::from_request(r, &|p: &str| {
                p.to_string()
            })
            .unwrap()
        })
        .collect()
}

/// An edit request of a prompt and a new answer only.
pub fn request(prompt: &str, target: &str) -> kedit::data::EditRequest {
    kedit::data::EditRequest {
        prompt: prompt.into(),
        target_new: target.into(),
        ..Default::default()
    }
}

/// The model's argmax next token after `prompt`.
pub fn next_token(model: &Model, prompt: &str) -> u32 {
    let ids = model.encode_with_special_tokens(prompt).unwrap();
    let logits = logits_alone(model, &ids);
    let last = logits.get(ids.len() - 1).unwrap();
    last.argmax(0).unwrap().to_scalar::<u32>().unwrap()
}

/// The first token of `" " + target`, the answer an edit should make the argmax.
pub fn first_token(model: &Model, target: &str) -> u32 {
    model.encode(&format!(" {target}")).unwrap()[0]
}

/// A deterministic `[rows, cols]` matrix, `scale · sin(0.37 i + phase)` over its flat index `i`:
/// weights that are not zero, not random, and differ between phases.
pub fn sine_matrix(rows: usize, cols: usize, scale: f64, phase: f64, device: &Device) -> Tensor {
    Tensor::arange(0f32, (rows * cols) as f32, device)
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
        .affine(0.37, phase)
        .unwrap()
        .sin()
        .unwrap()
        .affine(scale, 0.0)
        .unwrap()
}
