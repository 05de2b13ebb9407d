//! What the benchmarks share: the fetched SmolLM2 in f32 and the CounterFact records of the tests.

use std::path::Path;

use candle_core::DType;
use kedit::data::{read_dataset, EditRequest};
use kedit::model::load::{fetched_smollm2, load, DTypeChoice, LoadOptions};
use kedit::model::Model;

pub fn smollm2_f32() -> Model {
    let opts = LoadOptions {
        dtype: DTypeChoice::Exact(DType::F32),
        ..LoadOptions::default()
    };
    load(
        fetched_smollm2(|k| std::env::var_os(k))
            .to_str()
            .unwrap_or_default(),
        &opts,
    )
    .expect("SmolLM2 GGUF: run scripts/fetch-model.sh")
}

/// The records of a file in the test fixtures.
fn fixture_records(name: &str) -> Vec<EditRequest> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data")
        .join(name);
    read_dataset(&path, None)
        .unwrap()
        .cases
        .into_iter()
        .map(|(_, r)| r)
        .collect()
}

/// The CounterFact records copied into the test fixtures.
#[allow(dead_code)] // not every benchmark edits
pub fn counterfact() -> Vec<EditRequest> {
    fixture_records("counterfact_easyedit_edit.json")
}

/// The ZsRE training records copied into the test fixtures.
#[allow(dead_code)] // only the hypernetwork benchmark trains
pub fn zsre_training() -> Vec<EditRequest> {
    fixture_records("zsre_mend_train_sample.json")
}
