//! Writing the edited model as a GGUF file (llama.cpp's format) in f32, f16 or bf16, with the
//! source GGUF's metadata (tokenizer, chat template, architecture) carried over. One tensor is
//! converted at a time, so a 7B model is written without a second copy of it in memory.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};

use super::super::{Arch, Model, WeightId};
use crate::error::{Error, Result};

/// GGUF's default alignment of tensor data (bytes), which this writer uses.
const ALIGNMENT: usize = 32;

/// Writes the weights (already folded, see `folded_weights`) to the new file `out`, atomically,
/// with the metadata of the GGUF `model` was loaded from, or, from a folder, llama.cpp's metadata
/// made from its configuration and tokenizer.
pub(super) fn write_gguf(
    model: &Model,
    weights: &BTreeMap<WeightId, Tensor>,
    added_mlp_neurons: usize,
    dtype: DType,
    blocks: Option<GgufBlocks>,
    out: &Path,
    provenance: &serde_json::Value,
) -> Result<usize> {
    let (ggml_type, file_type) = match dtype {
        DType::F32 => (0u32, 0u32),
        DType::F16 => (1, 1),
        DType::BF16 => (30, 32),
        other => {
            return Err(Error::Invalid(format!(
                "GGUF export writes f32, f16 or bf16, not {other:?}"
            )))
        }
    };
    let source = match model.origin().kind {
        "gguf" => model.origin().files.first().cloned(),
        _ => None,
    };
    let mut metadata = match (source, &model.origin().tokenizer_file) {
        (Some(_), Some(given)) => {
            return Err(Error::Unsupported {
                what: format!("writing GGUF with the tokenizer {}", given.display()),
                why: "a GGUF export carries the source GGUF's tokenizer metadata over; export a folder with --out to ship another tokenizer".into(),
            })
        }
        (Some(source), None) => carried_over_metadata(&source)?,
        (None, _) => metadata_of(model)?,
    };
    let arch_name = match metadata.get("general.architecture") {
        Some(Value::String(s)) => s.clone(),
        _ => {
            return Err(Error::Invalid(
                "the GGUF metadata name no general.architecture".into(),
            ))
        }
    };
    let file_type = blocks.map_or(file_type, GgufBlocks::file_type);
    metadata.insert("general.file_type".into(), Value::U32(file_type));
    if blocks.is_some() {
        metadata.insert("general.quantization_version".into(), Value::U32(2));
    }
    if added_mlp_neurons > 0 {
        let width = model.spec().d_mlp + added_mlp_neurons;
        metadata.insert(
            format!("{arch_name}.feed_forward_length"),
            Value::U32(width as u32),
        );
    }
    metadata.insert("kedit.export".into(), Value::String(provenance.to_string()));

    let spec = model.spec();
    let mut tensors = Vec::with_capacity(weights.len());
    let mut offset = 0usize;
    for (&id, w) in weights {
        let name = super::super::load::gguf_name(spec, id)
            .ok_or_else(|| Error::UnknownWeight(id.to_string()))?;
        let form = match blocks.filter(|b| b.fits(w.dims())) {
            Some(b) => Form::Blocks(b),
            None => Form::Float(dtype, ggml_type),
        };
        tensors.push((name, id, offset, form));
        offset += form.bytes(w.elem_count()).next_multiple_of(ALIGNMENT);
    }
    let mut header = Vec::new();
    put_u32(&mut header, 0x4655_4747); // "GGUF"
    put_u32(&mut header, 3);
    put_u64(&mut header, tensors.len() as u64);
    put_u64(&mut header, metadata.len() as u64);
    for (key, value) in &metadata {
        put_string(&mut header, key);
        put_value(&mut header, value, true);
    }
    for (name, id, offset, form) in &tensors {
        let dims = weights[id].dims();
        put_string(&mut header, name);
        put_u32(&mut header, dims.len() as u32);
        // GGUF lists dimensions innermost first.
        for &d in dims.iter().rev() {
            put_u64(&mut header, d as u64);
        }
        put_u32(&mut header, form.type_id());
        put_u64(&mut header, *offset as u64);
    }
    header.resize(header.len().next_multiple_of(ALIGNMENT), 0);
    let arch = spec.arch;
    crate::files::write_atomically_with(out, |w| {
        w.write_all(&header)?;
        for (_, id, _, form) in &tensors {
            let bytes = tensor_bytes(spec, arch, *id, &weights[id], *form)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let padded = bytes.len().next_multiple_of(ALIGNMENT);
            w.write_all(&bytes)?;
            w.write_all(&vec![0u8; padded - bytes.len()])?;
        }
        Ok(())
    })?;
    Ok(header.len() + offset)
}

/// The metadata of the GGUF a model was loaded from, less what this writer sets itself.
fn carried_over_metadata(source: &Path) -> Result<BTreeMap<String, Value>> {
    let mut file = std::fs::File::open(source).map_err(|e| Error::io(source, e))?;
    let content = Content::read(&mut file)
        .map_err(|e| Error::file(source, format!("reading GGUF metadata: {}", Error::from(e))))?;
    Ok(content
        .metadata
        .into_iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "general.alignment" | "general.quantization_version"
            )
        })
        .collect())
}

/// llama.cpp's metadata for a model loaded from a Hugging Face folder: the architecture's
/// hyperparameters (the keys its `convert_hf_to_gguf.py` writes) and the tokenizer's.
fn metadata_of(model: &Model) -> Result<BTreeMap<String, Value>> {
    let spec = model.spec();
    let arch = match spec.arch {
        Arch::Llama => "llama",
        Arch::Gpt2 => "gpt2",
    };
    let mut md = BTreeMap::new();
    let mut put = |k: &str, v: Value| {
        md.insert(k.to_string(), v);
    };
    let u32_of = |n: usize| Value::U32(n as u32);
    put("general.architecture", Value::String(arch.into()));
    let name = Path::new(&model.origin().source)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| model.origin().source.clone());
    put("general.name", Value::String(name));
    put(
        &format!("{arch}.context_length"),
        u32_of(spec.max_positions),
    );
    put(&format!("{arch}.embedding_length"), u32_of(spec.d_model));
    put(&format!("{arch}.block_count"), u32_of(spec.n_layers));
    put(&format!("{arch}.feed_forward_length"), u32_of(spec.d_mlp));
    put(
        &format!("{arch}.attention.head_count"),
        u32_of(spec.n_heads),
    );
    match spec.arch {
        Arch::Llama => {
            put("llama.attention.head_count_kv", u32_of(spec.n_kv_heads));
            put("llama.rope.dimension_count", u32_of(spec.head_dim));
            put("llama.rope.freq_base", Value::F32(spec.rope_theta as f32));
            put(
                "llama.attention.layer_norm_rms_epsilon",
                Value::F32(spec.norm_eps as f32),
            );
            put("llama.vocab_size", u32_of(spec.vocab_size));
        }
        Arch::Gpt2 => put(
            "gpt2.attention.layer_norm_epsilon",
            Value::F32(spec.norm_eps as f32),
        ),
    }
    for (key, value) in crate::model::load::tokenizer_to_gguf(model.tokenizer(), spec.vocab_size)? {
        put(&key, value);
    }
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", spec.bos_id),
        ("tokenizer.ggml.eos_token_id", spec.eos_id),
        ("tokenizer.ggml.padding_token_id", spec.pad_id),
    ] {
        if let Some(id) = id {
            put(key, Value::U32(id));
        }
    }
    if let Some(template) = model.chat_template() {
        put(
            "tokenizer.chat_template",
            Value::String(template.to_string()),
        );
    }
    Ok(md)
}

/// The quantised block types a GGUF export writes: those llama.cpp's converter writes too, which
/// candle quantises byte for byte as llama.cpp's gguf-py does (`tests/export.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufBlocks {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
}

impl GgufBlocks {
    pub const NAMES: [&'static str; 5] = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"];

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "q4_0" => Self::Q4_0,
            "q4_1" => Self::Q4_1,
            "q5_0" => Self::Q5_0,
            "q5_1" => Self::Q5_1,
            "q8_0" => Self::Q8_0,
            _ => return None,
        })
    }

    fn ggml(self) -> GgmlDType {
        match self {
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q8_0 => GgmlDType::Q8_0,
        }
    }

    /// llama.cpp's `llama_ftype` of a file whose matrices are in these blocks.
    fn file_type(self) -> u32 {
        match self {
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 7,
            Self::Q5_0 => 8,
            Self::Q5_1 => 9,
        }
    }

    /// Matrices whose rows split into whole blocks are quantised; vectors (norms, biases) keep
    /// the float type, as llama.cpp keeps them.
    fn fits(self, dims: &[usize]) -> bool {
        dims.len() == 2 && dims[1].is_multiple_of(self.ggml().block_size())
    }
}

/// How one tensor is stored: a float type (with its GGML type id) or quantised blocks.
#[derive(Debug, Clone, Copy)]
enum Form {
    Float(DType, u32),
    Blocks(GgufBlocks),
}

impl Form {
    fn type_id(self) -> u32 {
        match self {
            Form::Float(_, id) => id,
            Form::Blocks(GgufBlocks::Q4_0) => 2,
            Form::Blocks(GgufBlocks::Q4_1) => 3,
            Form::Blocks(GgufBlocks::Q5_0) => 6,
            Form::Blocks(GgufBlocks::Q5_1) => 7,
            Form::Blocks(GgufBlocks::Q8_0) => 8,
        }
    }

    fn bytes(self, elements: usize) -> usize {
        match self {
            Form::Float(dtype, _) => elements * dtype.size_in_bytes(),
            Form::Blocks(b) => elements / b.ggml().block_size() * b.ggml().type_size(),
        }
    }
}

/// A weight's bytes as GGUF stores it: LLaMA's query and key rows in llama.cpp's rotary order
/// (the loader undoes it), little-endian in `dtype`.
fn tensor_bytes(
    spec: &super::super::ModelSpec,
    arch: Arch,
    id: WeightId,
    w: &Tensor,
    form: Form,
) -> Result<Vec<u8>> {
    let mut w = w.to_device(&candle_core::Device::Cpu)?;
    if arch == Arch::Llama {
        if let Some(heads) = super::super::llama::gguf_rotary_heads(id, spec) {
            w = super::super::llama::permute_rotary_rows(&w, heads)?;
        }
    }
    let dtype = match form {
        Form::Blocks(blocks) => {
            let q = QTensor::quantize(&w.to_dtype(DType::F32)?, blocks.ggml())?;
            return Ok(q.data()?.into_owned());
        }
        Form::Float(dtype, _) => dtype,
    };
    let flat = w.to_dtype(dtype)?.flatten_all()?;
    Ok(match dtype {
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        _ => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    })
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// GGUF's type tag of a metadata value.
fn type_tag(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

/// A metadata value (with its type tag when `tagged`; an array's elements share one tag).
fn put_value(out: &mut Vec<u8>, v: &Value, tagged: bool) {
    if tagged {
        put_u32(out, type_tag(v));
    }
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => put_u32(out, *x),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => put_u64(out, *x),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            // An empty array's element type is not recorded anywhere; u32 reads back as empty.
            put_u32(out, items.first().map_or(4, type_tag));
            put_u64(out, items.len() as u64);
            for item in items {
                put_value(out, item, false);
            }
        }
    }
}
