//! Gradients through the whole model against central finite differences, in f64. candle's fused
//! norm/softmax/rope kernels have no backward; a model built on them would fail here.

mod common;

use candle_core::{DType, IndexOp, Tensor, Var};
use common::*;
use kedit::model::{HookSpec, Intervention, Model, Module, Site, TokenBatch, WeightId};

/// −log p(target | prompt) at the last prompt position.
fn next_token_loss(model: &Model, ids: &[u32], target: u32, hooks: &HookSpec) -> Tensor {
    let batch = TokenBatch::new(&[ids.to_vec()], 0, model.device()).unwrap();
    let logits = model.forward(&batch, hooks).unwrap().logits;
    let logp = Model::log_probs(&logits.i((0, ids.len() - 1)).unwrap()).unwrap();
    logp.i(target as usize).unwrap().neg().unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn assert_close(analytic: f64, numeric: f64, what: &str) {
    let scale = analytic.abs().max(numeric.abs()).max(1e-6);
    assert!(
        (analytic - numeric).abs() / scale < 1e-4,
        "{what}: autograd {analytic:e} vs finite difference {numeric:e}"
    );
}

/// The gradient of the next-token loss with respect to layer `layer`'s down-projection, checked at
/// the entries with the largest gradient and at a few fixed ones.
fn check_weight_gradient(mut model: Model, layer: usize) {
    let ids = model
        .encode("The mother tongue of Danielle Darrieux is")
        .unwrap();
    let target = model.encode(" English").unwrap()[0];
    let id = WeightId::layer(layer, Module::MlpDown);
    let w = model.weight(id).unwrap();
    let var = Var::from_tensor(&w).unwrap();
    let original = model.replace_weight(id, var.as_tensor().clone()).unwrap();
    let loss = next_token_loss(&model, &ids, target, &HookSpec::new());
    let grads = loss.backward().unwrap();
    let grad = grads
        .get(var.as_tensor())
        .expect("no gradient reached the weight");
    let grad: Vec<Vec<f64>> = grad.to_vec2().unwrap();
    model.replace_weight(id, original.clone()).unwrap();

    let cols = grad[0].len();
    let mut flat: Vec<(usize, f64)> = grad.iter().flatten().copied().enumerate().collect();
    flat.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
    let mut entries: Vec<usize> = flat[..4].iter().map(|e| e.0).collect();
    entries.extend([0, cols + 7, 3 * cols + 11]);

    let base: Vec<f64> = original.flatten_all().unwrap().to_vec1().unwrap();
    let eps = 1e-5;
    for entry in entries {
        let mut loss_at = |shift: f64| {
            let mut v = base.clone();
            v[entry] += shift;
            let t = Tensor::from_vec(v, original.dims(), original.device()).unwrap();
            model.replace_weight(id, t).unwrap();
            scalar(&next_token_loss(&model, &ids, target, &HookSpec::new()))
        };
        let numeric = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps);
        let (r, c) = (entry / cols, entry % cols);
        assert_close(
            grad[r][c],
            numeric,
            &format!("d loss / d W_down[{layer}][{r},{c}]"),
        );
    }
}

#[test]
fn weight_gradient_matches_finite_differences_gpt2() {
    check_weight_gradient(load_as(&fixture("tiny-gpt2"), DType::F64), 0);
}

#[test]
fn weight_gradient_matches_finite_differences_llama() {
    check_weight_gradient(load_as(&smollm2_path(), DType::F64), 2);
}

#[test]
fn add_at_gradient_matches_finite_differences() {
    let model = load_as(&fixture("tiny-gpt2"), DType::F64);
    let ids = model.encode("The capital of France is").unwrap();
    let target = 17;
    let d = model.spec().d_model;
    let delta0: Vec<f64> = (0..d).map(|i| ((i as f64) * 0.37).sin() * 0.1).collect();
    let spec_with = |delta: Tensor| {
        HookSpec::new().intervene(
            Site::MlpOut(0),
            Intervention::AddAt {
                rows: vec![(0, 2)],
                delta,
            },
        )
    };
    let var = Var::from_vec(delta0.clone(), d, model.device()).unwrap();
    let loss = next_token_loss(&model, &ids, target, &spec_with(var.as_tensor().clone()));
    let grads = loss.backward().unwrap();
    let grad: Vec<f64> = grads
        .get(var.as_tensor())
        .expect("no gradient for delta")
        .to_vec1()
        .unwrap();
    assert!(grad.iter().any(|g| g.abs() > 1e-6), "the gradient is zero");
    let eps = 1e-6;
    for i in [0, 5, 17, d - 1] {
        let at = |shift: f64| {
            let mut v = delta0.clone();
            v[i] += shift;
            let t = Tensor::from_vec(v, d, model.device()).unwrap();
            scalar(&next_token_loss(&model, &ids, target, &spec_with(t)))
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        assert_close(grad[i], numeric, &format!("d loss / d delta[{i}]"));
    }
}
