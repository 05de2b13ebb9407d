//! The single-op RMSNorm, softmax, log-softmax and rope with hand-written backward passes against the composed
//! forms candle differentiates itself, through the whole of SmolLM2 in f32: the same gradients of
//! an early MLP weight and of a norm's weight within 1e-4. (In f64, `tests/gradients.rs` holds the
//! single ops to finite differences.) One test binary of its own, as the switch is process-wide.

mod common;

use candle_core::{Tensor, Var};
use kedit::model::ops::set_fused_grad_ops;
use kedit::model::{HookSpec, Model, TokenBatch};

/// Gradients of a next-token loss after two 10-token prompts with respect to `names`.
fn gradients(model: &mut Model, names: &[&str]) -> Vec<Tensor> {
    let vars: Vec<(kedit::model::WeightId, Tensor, Var)> = names
        .iter()
        .map(|name| {
            let id = model.weight_id_by_name(name).unwrap();
            let original = model.weight(id).unwrap();
            let var = Var::from_tensor(&original).unwrap();
            model.replace_weight(id, var.as_tensor().clone()).unwrap();
            (id, original, var)
        })
        .collect();
    let rows: Vec<Vec<u32>> = (0..2)
        .map(|b| (0..10).map(|t| 300 + 41 * b + 7 * t).collect())
        .collect();
    let batch = TokenBatch::new(&rows, 0, model.device()).unwrap();
    let logits = model
        .forward_at(&batch, &HookSpec::new(), &[(0, 9), (1, 9)])
        .unwrap()
        .logits;
    let loss = Model::log_probs(&logits)
        .unwrap()
        .narrow(1, 42, 1)
        .unwrap()
        .sum_all()
        .unwrap()
        .neg()
        .unwrap();
    let grads = loss.backward().unwrap();
    vars.into_iter()
        .map(|(id, original, var)| {
            let grad = grads.get(var.as_tensor()).unwrap().clone();
            model.replace_weight(id, original).unwrap();
            grad
        })
        .collect()
}

#[test]
fn fused_ops_give_the_composed_gradients() {
    let mut model = common::smollm2();
    let names = [
        "model.layers.5.mlp.down_proj.weight",
        "model.layers.5.post_attention_layernorm.weight",
    ];
    set_fused_grad_ops(false);
    let composed = gradients(&mut model, &names);
    set_fused_grad_ops(true);
    let fused = gradients(&mut model, &names);
    for ((name, got), want) in names.iter().zip(&fused).zip(&composed) {
        let size = want
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(size > 0.0, "{name}: the reference gradient is zero");
        let gap = common::relative_gap(got, want);
        eprintln!("{name}: relative gap {gap:.2e}");
        assert!(gap <= 1e-4, "{name}: fused and composed differ by {gap:e}");
    }
}
