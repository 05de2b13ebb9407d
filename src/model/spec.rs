//! The resolved description of a model: architecture, widths and special tokens, parsed once from
//! a Hugging Face `config.json` or from GGUF metadata.

use std::path::Path;

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The two block flavours of the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Learned positions, LayerNorm, `gelu_new` MLP with biases, fused QKV.
    Gpt2,
    /// RMSNorm, SwiGLU MLP, rotary positions, grouped key/value heads.
    Llama,
}

/// GPT-2's MLP activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// The exact erf form (`gelu`).
    GeluErf,
    /// `silu` (LLaMA's gate).
    Silu,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelSpec {
    pub arch: Arch,
    pub n_layers: usize,
    pub d_model: usize,
    pub d_mlp: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// The longest sequence the model accepts (GPT-2's position table, LLaMA's context length).
    pub max_positions: usize,
    pub norm_eps: f64,
    /// Rotary base (LLaMA only).
    pub rope_theta: f64,
    pub activation: Activation,
    pub tied_embeddings: bool,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
}

fn one_id(v: &serde_json::Value) -> Option<u32> {
    match v {
        serde_json::Value::Number(n) => n.as_u64().map(|n| n as u32),
        serde_json::Value::Array(a) => a.first().and_then(one_id),
        _ => None,
    }
}

#[derive(Deserialize)]
struct Gpt2Config {
    n_embd: usize,
    n_head: usize,
    n_layer: usize,
    n_positions: usize,
    n_inner: Option<usize>,
    #[serde(default = "default_ln_eps")]
    layer_norm_epsilon: f64,
    vocab_size: usize,
    #[serde(default = "default_gelu_new")]
    activation_function: String,
    #[serde(default = "default_true")]
    tie_word_embeddings: bool,
    #[serde(default)]
    scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    reorder_and_upcast_attn: bool,
}

#[derive(Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct LlamaConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<RopeParameters>,
    #[serde(default = "default_llama_positions")]
    max_position_embeddings: usize,
    vocab_size: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default = "default_silu")]
    hidden_act: String,
}

fn default_ln_eps() -> f64 {
    1e-5
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_gelu_new() -> String {
    "gelu_new".into()
}
fn default_silu() -> String {
    "silu".into()
}
fn default_true() -> bool {
    true
}
fn default_llama_positions() -> usize {
    4096
}

impl ModelSpec {
    /// Parses a Hugging Face `config.json`. `path` is only used in error messages.
    pub fn from_hf_config(json: &str, path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::file(path, msg);
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let model_type = value
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("field \"model_type\" is missing".into()))?;
        let id = |key: &str| value.get(key).and_then(one_id);
        let (bos_id, eos_id, pad_id) = (id("bos_token_id"), id("eos_token_id"), id("pad_token_id"));
        let spec = match model_type {
            "gpt2" => {
                let c: Gpt2Config = serde_json::from_value(value.clone())
                    .map_err(|e| bad(format!("not a GPT-2 config: {e}")))?;
                if c.scale_attn_by_inverse_layer_idx || c.reorder_and_upcast_attn {
                    return Err(bad("scale_attn_by_inverse_layer_idx and reorder_and_upcast_attn are not supported".into()));
                }
                let activation = match c.activation_function.as_str() {
                    "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
                    "gelu" => Activation::GeluErf,
                    other => return Err(bad(format!("activation_function \"{other}\" is not supported (expected gelu_new or gelu)"))),
                };
                ModelSpec {
                    arch: Arch::Gpt2,
                    n_layers: c.n_layer,
                    d_model: c.n_embd,
                    d_mlp: c.n_inner.unwrap_or(4 * c.n_embd),
                    n_heads: c.n_head,
                    n_kv_heads: c.n_head,
                    head_dim: c.n_embd / c.n_head.max(1),
                    vocab_size: c.vocab_size,
                    max_positions: c.n_positions,
                    norm_eps: c.layer_norm_epsilon,
                    rope_theta: 0.0,
                    activation,
                    tied_embeddings: c.tie_word_embeddings,
                    bos_id,
                    eos_id,
                    pad_id,
                }
            }
            "llama" => {
                let c: LlamaConfig = serde_json::from_value(value.clone())
                    .map_err(|e| bad(format!("not a LLaMA config: {e}")))?;
                if c.hidden_act != "silu" {
                    return Err(bad(format!(
                        "hidden_act \"{}\" is not supported (expected silu)",
                        c.hidden_act
                    )));
                }
                for rope in [&c.rope_parameters, &c.rope_scaling].into_iter().flatten() {
                    let kind = rope
                        .rope_type
                        .as_deref()
                        .or(rope.kind.as_deref())
                        .unwrap_or("default");
                    if kind != "default" {
                        return Err(bad(format!("rope type \"{kind}\" is not supported (only the default rotary embedding)")));
                    }
                }
                let rope_theta = c
                    .rope_parameters
                    .as_ref()
                    .and_then(|r| r.rope_theta)
                    .or(c.rope_theta)
                    .unwrap_or(10_000.0);
                ModelSpec {
                    arch: Arch::Llama,
                    n_layers: c.num_hidden_layers,
                    d_model: c.hidden_size,
                    d_mlp: c.intermediate_size,
                    n_heads: c.num_attention_heads,
                    n_kv_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
                    head_dim: c
                        .head_dim
                        .unwrap_or(c.hidden_size / c.num_attention_heads.max(1)),
                    vocab_size: c.vocab_size,
                    max_positions: c.max_position_embeddings,
                    norm_eps: c.rms_norm_eps,
                    rope_theta,
                    activation: Activation::Silu,
                    tied_embeddings: c.tie_word_embeddings,
                    bos_id,
                    eos_id,
                    pad_id,
                }
            }
            other => {
                return Err(bad(format!(
                    "model_type \"{other}\" is not supported (expected \"gpt2\" or \"llama\")"
                )))
            }
        };
        spec.validate().map_err(bad)?;
        Ok(spec)
    }

    /// Checks the widths fit together; a corrupt config fails here rather than deep in a matmul.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.n_heads == 0 || self.n_kv_heads == 0 || self.n_layers == 0 {
            return Err("the model needs at least one layer, head and key/value head".into());
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(format!(
                "{} attention heads cannot be grouped over {} key/value heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.arch == Arch::Gpt2 && self.head_dim * self.n_heads != self.d_model {
            return Err(format!(
                "n_embd {} is not divisible by n_head {}",
                self.d_model, self.n_heads
            ));
        }
        if self.arch == Arch::Llama && !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "rotary embeddings need an even head_dim, got {}",
                self.head_dim
            ));
        }
        Ok(())
    }

    /// Number of parameters, counting a tied head once.
    pub fn n_params(&self) -> usize {
        let (d, m, l) = (self.d_model, self.d_mlp, self.n_layers);
        let kv = self.n_kv_heads * self.head_dim;
        let q = self.n_heads * self.head_dim;
        let head = if self.tied_embeddings {
            0
        } else {
            self.vocab_size * d
        };
        match self.arch {
            Arch::Gpt2 => {
                let block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d);
                self.vocab_size * d + self.max_positions * d + l * block + 2 * d + head
            }
            Arch::Llama => {
                let block = 2 * d + d * q + 2 * d * kv + q * d + 3 * d * m;
                self.vocab_size * d + l * block + d + head
            }
        }
    }

    /// Multiply-add FLOPs (counted as 2 each) of one forward pass over `tokens` tokens in
    /// sequences of `seq`: every weight matrix once per token, the head included, plus attention's
    /// scores and mixing over the causal prefix (on average (seq + 1) / 2 positions).
    pub fn forward_flops(&self, seq: usize, tokens: usize) -> f64 {
        let (d, m) = (self.d_model as f64, self.d_mlp as f64);
        let q = (self.n_heads * self.head_dim) as f64;
        let kv = (self.n_kv_heads * self.head_dim) as f64;
        let per_layer = match self.arch {
            Arch::Gpt2 => 3.0 * d * d + d * d + 2.0 * d * m,
            Arch::Llama => d * q + 2.0 * d * kv + q * d + 3.0 * d * m,
        };
        let matrices = self.n_layers as f64 * per_layer + self.vocab_size as f64 * d;
        let attention = self.n_layers as f64 * 2.0 * q * (seq as f64 + 1.0) / 2.0;
        2.0 * tokens as f64 * (matrices + attention)
    }

    /// Refuses weights that alone would not fit in `available_bytes`: a clear error before
    /// loading, rather than a machine that swaps or a process the OOM killer ends halfway.
    pub fn check_fits(&self, dtype: DType, available_bytes: u64) -> crate::Result<()> {
        let need = self.n_params() as u64 * dtype.size_in_bytes() as u64;
        if need > available_bytes {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            let name = format!("{dtype:?}").to_lowercase();
            return Err(crate::Error::Invalid(format!(
                "the model's {:.2}B weights take {:.1} GiB in {name} but only {:.1} GiB of memory \
                 is available{}",
                self.n_params() as f64 / 1e9,
                gib(need),
                gib(available_bytes),
                match dtype {
                    DType::F32 => "; --dtype bf16 halves it",
                    _ => "",
                }
            )));
        }
        Ok(())
    }

    /// The dtype `auto` resolves to: f32 when the weights fit comfortably in memory, else bf16.
    pub fn auto_dtype(&self, available_bytes: Option<u64>) -> DType {
        let f32_bytes = self.n_params() as u64 * 4;
        match available_bytes {
            Some(avail) if f32_bytes > avail / 2 => DType::BF16,
            _ => DType::F32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama_json(rope: &str) -> String {
        format!(
            r#"{{"model_type":"llama","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
               "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100,{rope}}}"#
        )
    }

    #[test]
    fn rope_theta_is_read_from_either_field() {
        let p = Path::new("config.json");
        let old = ModelSpec::from_hf_config(&llama_json(r#""rope_theta":500000.0"#), p).unwrap();
        assert_eq!(old.rope_theta, 500000.0);
        let new = ModelSpec::from_hf_config(
            &llama_json(r#""rope_parameters":{"rope_theta":100000.0,"rope_type":"default"}"#),
            p,
        )
        .unwrap();
        assert_eq!(new.rope_theta, 100000.0);
        assert_eq!(new.head_dim, 16);
        assert_eq!(new.n_kv_heads, 2);
        let scaled = ModelSpec::from_hf_config(
            &llama_json(r#""rope_scaling":{"rope_type":"llama3","factor":8.0}"#),
            p,
        );
        assert!(scaled.unwrap_err().to_string().contains("llama3"));
    }

    #[test]
    fn bad_head_grouping_is_rejected() {
        let json = llama_json(r#""rope_theta":1.0"#)
            .replace(r#""num_key_value_heads":2"#, r#""num_key_value_heads":3"#);
        let err = ModelSpec::from_hf_config(&json, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot be grouped"), "{err}");
    }

    #[test]
    fn auto_dtype_falls_back_to_bf16_when_f32_would_crowd_memory() {
        let spec =
            ModelSpec::from_hf_config(&llama_json(r#""rope_theta":1.0"#), Path::new("c")).unwrap();
        let f32_bytes = spec.n_params() as u64 * 4;
        assert_eq!(spec.auto_dtype(Some(4 * f32_bytes)), DType::F32);
        assert_eq!(spec.auto_dtype(Some(f32_bytes)), DType::BF16);
        assert_eq!(spec.auto_dtype(None), DType::F32);
    }

    #[test]
    fn weights_that_exceed_available_memory_are_refused_before_loading() {
        let spec =
            ModelSpec::from_hf_config(&llama_json(r#""rope_theta":1.0"#), Path::new("c")).unwrap();
        let params = spec.n_params() as u64;
        assert!(spec.check_fits(DType::F32, 4 * params).is_ok());
        let err = spec
            .check_fits(DType::F32, 4 * params - 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("in f32") && err.contains("--dtype bf16"),
            "{err}"
        );
        assert!(spec.check_fits(DType::BF16, 2 * params).is_ok());
        assert!(spec.check_fits(DType::BF16, 2 * params - 1).is_err());
    }
}
