//! One forward and backward pass of a short prompt on SmolLM2-135M (f32, CPU), the unit of work
//! FT-L repeats on every step and the hypernetwork trainers repeat on every example: the loss is
//! the log-probability of one token after 16 prompt tokens.
//!
//! - `ft_l_step_16`: the gradient of one early weight (layer 5's `down_proj`, as FT-L trains);
//! - `mend_step_16`: the gradients of the MLP weights of the last three layers (MEND's edit sites).
//!
//! `cargo bench --bench train_step` (run scripts/fetch-model.sh first).

mod common;

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kedit::model::{HookSpec, Model, TokenBatch};

const TOKENS: usize = 16;

fn step(model: &Model, batch: &TokenBatch, vars: &[Var]) -> Vec<Tensor> {
    let logits = model
        .forward_at(batch, &HookSpec::new(), &[(0, TOKENS - 1)])
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
    let grads = loss.backward().unwrap();
    vars.iter()
        .map(|v| grads.get(v.as_tensor()).unwrap().clone())
        .collect()
}

fn trainable(model: &mut Model, names: &[String]) -> Vec<Var> {
    names
        .iter()
        .map(|name| {
            let id = model.weight_id_by_name(name).expect(name);
            let var = Var::from_tensor(&model.weight(id).unwrap()).unwrap();
            model.replace_weight(id, var.as_tensor().clone()).unwrap();
            var
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let prompt: Vec<u32> = (0..TOKENS).map(|t| (100 + 11 * t) as u32).collect();
    let batch = TokenBatch::new(&[prompt], 0, &Device::Cpu).unwrap();
    let mut group = c.benchmark_group("smollm2");
    group.sample_size(20);
    group.throughput(Throughput::Elements(TOKENS as u64));

    let mut model = common::smollm2_f32();
    group.bench_function("forward_16", |b| {
        b.iter(|| {
            model
                .forward_at(&batch, &HookSpec::new(), &[(0, TOKENS - 1)])
                .unwrap()
        })
    });
    let vars = trainable(
        &mut model,
        &["model.layers.5.mlp.down_proj.weight".to_string()],
    );
    group.bench_function("ft_l_step_16", |b| b.iter(|| step(&model, &batch, &vars)));

    let mut model = common::smollm2_f32();
    let names: Vec<String> = (27..30)
        .flat_map(|l| {
            ["gate_proj", "up_proj", "down_proj"]
                .map(|p| format!("model.layers.{l}.mlp.{p}.weight"))
        })
        .collect();
    let vars = trainable(&mut model, &names);
    group.bench_function("mend_step_16", |b| b.iter(|| step(&model, &batch, &vars)));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
