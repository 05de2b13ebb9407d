//! GRACE's codebook as an overlay: keys (inputs of the wrapped projection at edited tokens),
//! the values that replace its output there, and a deferral radius per entry. A token whose input
//! lies within an entry's radius of that entry's key gets the entry's value; every other token's
//! output is passed through untouched, so a model whose queries all miss computes exactly what
//! the unedited model computes.

use std::any::Any;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{Overlay, OverlayInput, OverlayParts, Site, WeightForm};

/// Which input of the layer the keys are read from: the input of the projection the codebook
/// wraps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyInput {
    /// The normalised MLP input (the up projection's input): a codebook at `MlpAct`.
    MlpIn,
    /// The down projection's input: a codebook at `MlpOut`.
    MlpAct,
}

/// Which outputs a matched query replaces (EasyEdit's `replacement`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Replacement {
    /// The matched token's output only.
    ReplaceLast,
    /// The matched token's and every earlier token's output in the row.
    ReplacePrompt,
    /// Every token's output in the row.
    ReplaceAll,
}

/// Which tokens of a row are looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryTokens {
    /// Every token (kedit). Attention is causal, so the last prompt token of
    /// `prompt + " " + target` has the same input as the last token of `prompt` alone: the edit's
    /// key is found whether the prompt is scored teacher-forced or generated from.
    Every,
    /// One token per row, `min(position, row length − 1)`, with `position` the last edited
    /// prompt's last token (EasyEdit, which reuses the most recent edit's `key_id` at inference).
    Fixed { position: usize },
}

/// One entry's bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The deferral radius (Euclidean, in the key's units).
    pub radius: f32,
    /// The answer the entry's value was trained for; an edit near the key with another answer
    /// splits the radii instead of widening this one.
    pub answer: String,
    /// EasyEdit's label "hash": the mean of the edit's label ids, prompt positions counted as
    /// −100 (compared instead of `answer` in compatibility mode).
    pub label_mean: f64,
    /// The edit that created the entry (its rollback removes it).
    pub edit: u64,
}

/// The codebook of one layer. Immutable: an edit builds its successor.
#[derive(Debug, Clone)]
pub struct Codebook {
    pub key_input: KeyInput,
    pub replacement: Replacement,
    pub query: QueryTokens,
    /// `[n, d_key]` f32.
    pub keys: Tensor,
    /// `[n, d_value]` f32.
    pub values: Tensor,
    pub entries: Vec<Entry>,
    /// The next edit's id.
    pub next_edit: u64,
}

/// The nearest entry of a token, if the token lies within its radius.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub entry: usize,
    pub distance: f32,
}

impl Codebook {
    pub const KIND: &'static str = "grace_codebook";

    pub fn empty(
        key_input: KeyInput,
        replacement: Replacement,
        query: QueryTokens,
        d_key: usize,
        d_value: usize,
        device: &Device,
    ) -> Result<Self> {
        Ok(Codebook {
            key_input,
            replacement,
            query,
            keys: Tensor::zeros((0, d_key), DType::F32, device)?,
            values: Tensor::zeros((0, d_value), DType::F32, device)?,
            entries: Vec::new(),
            next_edit: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The site the codebook sits at.
    pub fn site(&self, layer: usize) -> Site {
        Self::site_for(self.key_input, layer)
    }

    /// The output of the projection whose input is `key_input`.
    pub fn site_for(key_input: KeyInput, layer: usize) -> Site {
        match key_input {
            KeyInput::MlpIn => Site::MlpAct(layer),
            KeyInput::MlpAct => Site::MlpOut(layer),
        }
    }

    /// The nearest key of each query row and its Euclidean distance, in one batched product
    /// (`‖q‖² − 2 q·k + ‖k‖²` picks the nearest key; its distance is then recomputed exactly from
    /// `q − k`, so a radius decides the same way whatever the other keys are).
    ///
    /// # Shapes
    /// `queries: [m, d_key]` → `m` pairs (`None` for an empty codebook)
    pub fn nearest(&self, queries: &Tensor) -> candle_core::Result<Vec<Option<(usize, f32)>>> {
        let m = queries.dim(0)?;
        if self.is_empty() || m == 0 {
            return Ok(vec![None; m]);
        }
        let q = queries.to_dtype(DType::F32)?;
        let q_sq = q.sqr()?.sum_keepdim(1)?;
        let k_sq = self.keys.sqr()?.sum_keepdim(1)?.t()?;
        let cross = q.matmul(&self.keys.t()?)?;
        let squared = q_sq.broadcast_add(&k_sq)?.sub(&(cross * 2.0)?)?;
        let nearest = squared.argmin_keepdim(1)?.squeeze(1)?;
        let chosen = self.keys.index_select(&nearest, 0)?;
        let exact = (q - chosen)?.sqr()?.sum(1)?.sqrt()?;
        let nearest = nearest.to_vec1::<u32>()?;
        let exact = exact.to_vec1::<f32>()?;
        Ok(nearest
            .into_iter()
            .zip(exact)
            .map(|(j, d)| Some((j as usize, d)))
            .collect())
    }

    /// For every token of the batch (row-major, `rows × width`), the entry whose value replaces
    /// its output, if any. Padding (past a row's length) is never replaced.
    ///
    /// # Shapes
    /// `keys_in: [b, s, d_key]`
    pub fn assign(
        &self,
        keys_in: &Tensor,
        lengths: &[usize],
    ) -> candle_core::Result<Vec<Option<usize>>> {
        let (b, s, d) = keys_in.dims3()?;
        let mut assigned = vec![None; b * s];
        if self.is_empty() {
            return Ok(assigned);
        }
        let queried: Vec<(usize, usize)> = match self.query {
            QueryTokens::Every => (0..b)
                .flat_map(|row| {
                    (0..lengths.get(row).copied().unwrap_or(s).min(s)).map(move |p| (row, p))
                })
                .collect(),
            QueryTokens::Fixed { position } => (0..b)
                .filter_map(|row| {
                    let len = lengths.get(row).copied().unwrap_or(s).min(s);
                    (len > 0).then(|| (row, position.min(len - 1)))
                })
                .collect(),
        };
        if queried.is_empty() {
            return Ok(assigned);
        }
        let flat: Vec<u32> = queried.iter().map(|&(r, p)| (r * s + p) as u32).collect();
        let index = Tensor::new(flat.as_slice(), keys_in.device())?;
        let queries = keys_in.reshape((b * s, d))?.index_select(&index, 0)?;
        let hits = self.nearest(&queries)?;
        // The last hit of each row decides the row for replace_prompt and replace_all.
        let mut last_hit: Vec<Option<(usize, usize)>> = vec![None; b];
        for (&(row, pos), hit) in queried.iter().zip(hits) {
            if let Some((j, dist)) = hit {
                if dist <= self.entries[j].radius {
                    assigned[row * s + pos] = Some(j);
                    last_hit[row] = Some((pos, j));
                }
            }
        }
        if self.replacement != Replacement::ReplaceLast {
            for (row, hit) in last_hit.into_iter().enumerate() {
                let Some((pos, j)) = hit else { continue };
                let len = lengths.get(row).copied().unwrap_or(s).min(s);
                let end = match self.replacement {
                    Replacement::ReplacePrompt => pos + 1,
                    _ => len,
                };
                for slot in &mut assigned[row * s..row * s + end] {
                    *slot = Some(j);
                }
            }
        }
        Ok(assigned)
    }

    pub fn from_parts(parts: &OverlayParts, device: &Device) -> Result<Self> {
        #[derive(Deserialize)]
        struct Header {
            key_input: KeyInput,
            replacement: Replacement,
            query: QueryTokens,
            entries: Vec<Entry>,
            next_edit: u64,
        }
        let bad = |why: String| Error::Invalid(format!("{}: {why}", Self::KIND));
        let h: Header =
            serde_json::from_value(parts.header.clone()).map_err(|e| bad(e.to_string()))?;
        let tensor = |name: &str| -> Result<Tensor> {
            let t = parts
                .tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| bad(format!("no tensor {name:?}")))?;
            Ok(t.to_device(device)?.to_dtype(DType::F32)?)
        };
        let (keys, values) = (tensor("keys")?, tensor("values")?);
        let n = h.entries.len();
        if keys.dims2()?.0 != n || values.dims2()?.0 != n {
            return Err(bad(format!(
                "{n} entries but keys {:?} and values {:?}",
                keys.dims(),
                values.dims()
            )));
        }
        Ok(Codebook {
            key_input: h.key_input,
            replacement: h.replacement,
            query: h.query,
            keys,
            values,
            entries: h.entries,
            next_edit: h.next_edit,
        })
    }
}

impl Overlay for Codebook {
    fn forward(&self, input: &OverlayInput<'_>, output: &Tensor) -> candle_core::Result<Tensor> {
        if self.is_empty() {
            return Ok(output.clone());
        }
        let keys_in = match self.key_input {
            KeyInput::MlpIn => input.mlp_in,
            KeyInput::MlpAct => input.mlp_act,
        }
        .ok_or_else(|| {
            candle_core::Error::Msg("a GRACE codebook sits after the MLP's input".into())
        })?;
        let assigned = self.assign(keys_in, input.lengths)?;
        if assigned.iter().all(Option::is_none) {
            return Ok(output.clone());
        }
        let (b, s, d) = output.dims3()?;
        let mask: Vec<u8> = assigned.iter().map(|a| u8::from(a.is_some())).collect();
        let rows: Vec<u32> = assigned.iter().map(|a| a.unwrap_or(0) as u32).collect();
        let device = output.device();
        let mask = Tensor::from_vec(mask, (b * s, 1), device)?.broadcast_as((b * s, d))?;
        let rows = Tensor::from_vec(rows, b * s, device)?;
        let replaced = self
            .values
            .index_select(&rows, 0)?
            .to_dtype(output.dtype())?;
        mask.where_cond(&replaced, &output.reshape((b * s, d))?)?
            .reshape((b, s, d))
    }

    fn kind(&self) -> &'static str {
        Self::KIND
    }

    fn parts(&self) -> Result<OverlayParts> {
        Ok(OverlayParts {
            header: serde_json::json!({
                "key_input": self.key_input,
                "replacement": self.replacement,
                "query": self.query,
                "entries": self.entries,
                "next_edit": self.next_edit,
            }),
            tensors: vec![
                ("keys".into(), self.keys.clone()),
                ("values".into(), self.values.clone()),
            ],
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_weights(&self, site: Site) -> std::result::Result<WeightForm, String> {
        Err(format!(
            "GRACE's codebook at {site} ({} entries) replaces the layer's output only for inputs \
             within an entry's radius, which no weights of a transformers architecture compute; \
             run the edited model with kedit and --patch instead",
            self.entries.len()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book(keys: &[[f32; 2]], radii: &[f32], replacement: Replacement) -> Codebook {
        let d = &Device::Cpu;
        let n = keys.len();
        Codebook {
            key_input: KeyInput::MlpAct,
            replacement,
            query: QueryTokens::Every,
            keys: Tensor::from_vec(keys.concat(), (n, 2), d).unwrap(),
            values: Tensor::from_vec(
                (0..n).flat_map(|i| [10.0 * (i + 1) as f32; 3]).collect(),
                (n, 3),
                d,
            )
            .unwrap(),
            entries: radii
                .iter()
                .enumerate()
                .map(|(i, &radius)| Entry {
                    radius,
                    answer: format!("a{i}"),
                    label_mean: 0.0,
                    edit: i as u64,
                })
                .collect(),
            next_edit: n as u64,
        }
    }

    fn run(book: &Codebook, tokens: &[[f32; 2]], lengths: &[usize]) -> Vec<Vec<f32>> {
        let d = &Device::Cpu;
        let b = lengths.len();
        let s = tokens.len() / b;
        let keys_in = Tensor::from_vec(tokens.concat(), (b, s, 2), d).unwrap();
        let output = Tensor::arange(0f32, (b * s * 3) as f32, d)
            .unwrap()
            .reshape((b, s, 3))
            .unwrap();
        let resid = Tensor::zeros((b, s, 4), DType::F32, d).unwrap();
        let input = OverlayInput {
            resid_pre: &resid,
            mlp_in: None,
            mlp_act: Some(&keys_in),
            lengths,
        };
        book.forward(&input, &output)
            .unwrap()
            .reshape((b * s, 3))
            .unwrap()
            .to_vec2()
            .unwrap()
    }

    /// A key at (0, 0) with radius 1: a token at distance 0.999 is replaced, one at 1.001 is not,
    /// and the tokens that miss keep their outputs bit for bit.
    #[test]
    fn a_query_just_inside_the_radius_is_replaced_and_one_just_outside_is_not() {
        let book = book(
            &[[0.0, 0.0], [5.0, 5.0]],
            &[1.0, 1.0],
            Replacement::ReplaceLast,
        );
        let out = run(
            &book,
            &[[0.999, 0.0], [0.0, 1.001], [5.0, 5.5], [9.0, 9.0]],
            &[4],
        );
        assert_eq!(out[0], [10.0; 3]);
        assert_eq!(out[1], [3.0, 4.0, 5.0]);
        assert_eq!(out[2], [20.0; 3]);
        assert_eq!(out[3], [9.0, 10.0, 11.0]);
    }

    /// replace_prompt fills a row up to its last hit; replace_all the whole row (padding never).
    #[test]
    fn replacement_modes_cover_the_row_as_documented() {
        let tokens = [[9.0, 9.0], [0.0, 0.0], [9.0, 9.0], [0.0, 0.0]];
        let prompt = run(
            &book(&[[0.0, 0.0]], &[1.0], Replacement::ReplacePrompt),
            &tokens,
            &[3],
        );
        assert_eq!(prompt[0], [10.0; 3]);
        assert_eq!(prompt[1], [10.0; 3]);
        assert_eq!(prompt[2], [6.0, 7.0, 8.0]);
        assert_eq!(prompt[3], [9.0, 10.0, 11.0], "padding is replaced");
        let all = run(
            &book(&[[0.0, 0.0]], &[1.0], Replacement::ReplaceAll),
            &tokens,
            &[3],
        );
        assert_eq!(&all[..3], &[[10.0; 3]; 3]);
        assert_eq!(all[3], [9.0, 10.0, 11.0]);
    }

    /// Compatibility mode looks at one token per row, the edit's position clipped to the row.
    #[test]
    fn a_fixed_query_position_is_clipped_to_each_row() {
        let mut book = book(&[[0.0, 0.0]], &[1.0], Replacement::ReplaceLast);
        book.query = QueryTokens::Fixed { position: 1 };
        let out = run(
            &book,
            &[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [9.0, 9.0]],
            &[2, 1],
        );
        assert_eq!(out[0], [0.0, 1.0, 2.0], "only position 1 is looked at");
        assert_eq!(out[1], [10.0; 3]);
        assert_eq!(
            out[2], [10.0; 3],
            "a one-token row is looked at its token 0"
        );
    }

    #[test]
    fn parts_round_trip() {
        let book = book(
            &[[0.0, 1.0], [2.0, 3.0]],
            &[0.5, 0.25],
            Replacement::ReplaceAll,
        );
        let back = Codebook::from_parts(&book.parts().unwrap(), &Device::Cpu).unwrap();
        assert_eq!(back.entries, book.entries);
        assert_eq!(back.replacement, book.replacement);
        let keys = |c: &Codebook| c.keys.to_vec2::<f32>().unwrap();
        assert_eq!(keys(&back), keys(&book));
        let mut broken = book.parts().unwrap();
        broken.tensors.pop();
        assert!(Codebook::from_parts(&broken, &Device::Cpu).is_err());
    }
}
