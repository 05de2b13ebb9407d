//! kedit's AVX-512 kernels (inputs of up to 32 rows) and OpenBLAS (more rows, where it was linked)
//! against candle's matmul, the pure-Rust fallback, on SmolLM2: the same logits and the same
//! gradient within 1e-4; and the kernels reading the GGUF's quantised rows against the same
//! kernels reading the f32 weights: the same bits. One test binary of its own, as the switch is
//! process-wide.

mod common;

use candle_core::{Tensor, Var};
use kedit::model::ops::set_fast_products;
use kedit::model::{blas, kernels, HookSpec, Model, TokenBatch};

/// Logits of a short prompt (the kernels' rows), a batch of 8 × 32 tokens (OpenBLAS's), and the
/// gradient of one early weight through the rest of the model (the kernels' backward product).
fn outputs(model: &mut Model) -> (Tensor, Tensor, Tensor) {
    let short: Vec<u32> = (0..12).map(|t| 200 + 13 * t).collect();
    let short = common::logits_alone(model, &short);
    let rows: Vec<Vec<u32>> = (0..8)
        .map(|b| (0..32).map(|t| (100 + 37 * b + 11 * t) as u32).collect())
        .collect();
    let batch = TokenBatch::new(&rows, 0, model.device()).unwrap();
    let long = model.forward(&batch, &HookSpec::new()).unwrap().logits;

    let id = model
        .weight_id_by_name("model.layers.5.mlp.down_proj.weight")
        .unwrap();
    let original = model.weight(id).unwrap();
    let var = Var::from_tensor(&original).unwrap();
    model.replace_weight(id, var.as_tensor().clone()).unwrap();
    let prompt =
        TokenBatch::new(&[(0..16).map(|t| 300 + 7 * t).collect()], 0, model.device()).unwrap();
    let logits = model
        .forward_at(&prompt, &HookSpec::new(), &[(0, 15)])
        .unwrap()
        .logits;
    let loss = Model::log_probs(&logits)
        .unwrap()
        .get(0)
        .unwrap()
        .get(42)
        .unwrap()
        .neg()
        .unwrap();
    let grad = loss
        .backward()
        .unwrap()
        .get(var.as_tensor())
        .unwrap()
        .clone();
    model.replace_weight(id, original).unwrap();
    (short, long, grad)
}

#[test]
fn fast_products_give_the_fallbacks_logits_and_gradients() {
    let mut model = common::smollm2();
    set_fast_products(false);
    let (short_ref, long_ref, grad_ref) = outputs(&mut model);
    set_fast_products(true);
    let (short, long, grad) = outputs(&mut model);
    eprintln!(
        "AVX-512 kernels: {}; OpenBLAS linked: {}",
        kernels::available(),
        blas::available()
    );
    for (what, got, want) in [
        ("logits of 12 tokens", &short, &short_ref),
        ("logits of 8 x 32 tokens", &long, &long_ref),
        ("gradient of layer 5's down_proj", &grad, &grad_ref),
    ] {
        let gap = common::relative_gap(got, want);
        eprintln!("{what}: relative gap {gap:.2e}");
        assert!(gap <= 1e-4, "{what}: fast and fallback differ by {gap:e}");
    }

    // The quantised rows expand to the f32 weights and the tiles sum in the same order.
    let (packed, bytes) = model.packed_weights();
    eprintln!("quantised rows beside {packed} weights, {} MB", bytes >> 20);
    if kernels::available() {
        assert_eq!(
            packed,
            1 + 7 * 30,
            "every matrix of SmolLM2's GGUF keeps its blocks"
        );
    }
    // The layers below 20 kept only as quantised rows: the same bits again, the same weights and
    // fingerprint, and layer 5's down_proj made f32 when replaced.
    let fingerprint = model.fingerprint().unwrap();
    let up = model
        .weight_id_by_name("model.layers.3.mlp.up_proj.weight")
        .unwrap();
    let up_f32 = model.weight(up).unwrap();
    let (released, freed) = model.release_dense_below(20);
    if kernels::available() {
        assert_eq!((released, freed), (7 * 20, 20 * 3_538_944 * 4));
    }
    assert_eq!(model.fingerprint().unwrap(), fingerprint);
    assert_eq!(
        model.weight(up).unwrap().to_vec2::<f32>().unwrap(),
        up_f32.to_vec2::<f32>().unwrap()
    );
    let (short_rows, long_rows, grad_rows) = outputs(&mut model);
    model.discard_packed_weights().unwrap();
    let (short_f32, long_f32, grad_f32) = outputs(&mut model);
    for (what, got, want) in [
        ("logits of 12 tokens", &short, &short_f32),
        ("logits of 8 x 32 tokens", &long, &long_f32),
        ("gradient of layer 5's down_proj", &grad, &grad_f32),
        ("logits of 12 tokens, rows alone", &short_rows, &short_f32),
        ("logits of 8 x 32 tokens, rows alone", &long_rows, &long_f32),
        (
            "gradient of layer 5's down_proj, rows alone",
            &grad_rows,
            &grad_f32,
        ),
    ] {
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        assert!(
            bits(got) == bits(want),
            "{what}: quantised rows and f32 weights differ"
        );
    }
    // The gradient is not zero, so the comparison means something.
    assert!(
        grad_ref
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
}
