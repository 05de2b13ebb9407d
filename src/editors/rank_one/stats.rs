//! Second-moment statistics of MLP keys, `C = E[k kᵀ]` over the tokens of a text corpus
//! (SPEC-editors §2.4): computed once per model, layer, corpus and sample size, cached on disk,
//! and reused by every later edit. Sums are accumulated in f64 from f32 per-batch products.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use faer::Mat;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::data::python_random::PythonRandom;
use crate::error::{Error, Result};
use crate::model::{ops, HookSpec, Model, Site, TokenBatch};

/// WikiText-2 (validation and test splits), the default corpus; see corpus/PROVENANCE.md.
const WIKITEXT_VALID: &str = include_str!("../../../corpus/wikitext-2-valid.txt");
const WIKITEXT_TEST: &str = include_str!("../../../corpus/wikitext-2-test.txt");

/// Texts whose keys the statistics average over.
pub struct Corpus {
    /// What the cache key names the corpus by: a digest of its articles.
    pub id: String,
    pub articles: Vec<String>,
}

impl Corpus {
    /// The built-in WikiText-2 corpus.
    pub fn builtin() -> Self {
        let mut articles = wikitext_articles(WIKITEXT_VALID);
        articles.extend(wikitext_articles(WIKITEXT_TEST));
        Self::new(articles)
    }

    /// A corpus file: JSON lines with a `text` field (`.jsonl`), or plain text, split into
    /// articles at WikiText's `= Title =` headings when it has them.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let articles = if path.extension().is_some_and(|e| e == "jsonl") {
            text.lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, line)| {
                    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                        Error::file(path, format!("line {}: invalid JSON: {e}", i + 1))
                    })?;
                    v.get("text")
                        .and_then(|t| t.as_str())
                        .map(str::to_string)
                        .ok_or_else(|| {
                            Error::file(path, format!("line {}: no string field \"text\"", i + 1))
                        })
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            wikitext_articles(&text)
        };
        if articles.is_empty() {
            return Err(Error::file(path, "the corpus holds no text"));
        }
        Ok(Self::new(articles))
    }

    fn new(articles: Vec<String>) -> Self {
        let mut hash = Sha256::new();
        for a in &articles {
            hash.update((a.len() as u64).to_le_bytes());
            hash.update(a.as_bytes());
        }
        let id = hex(&hash.finalize())[..16].to_string();
        Corpus { id, articles }
    }
}

/// Articles of a WikiText file (top-level `= Title =` lines start one), with the tokenisation
/// artefacts undone; a text without headings is one article.
pub fn wikitext_articles(text: &str) -> Vec<String> {
    let mut articles: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        let heading = t.starts_with("= ") && t.ends_with(" =") && !t.starts_with("= =");
        if heading && !current.trim().is_empty() {
            articles.push(std::mem::take(&mut current));
        }
        if !t.is_empty() {
            current.push_str(&undo_wikitext(t));
            current.push('\n');
        }
    }
    if !current.trim().is_empty() {
        articles.push(current);
    }
    articles
}

/// `@-@`, `@,@` and `@.@` with their spaces back to `-`, `,` and `.`.
pub fn undo_wikitext(s: &str) -> String {
    s.replace(" @-@ ", "-")
        .replace(" @,@ ", ",")
        .replace(" @.@ ", ".")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Key covariances for one model, computed into (or found in) the disk cache the first time a
/// layer is asked for: what ROME, MEMIT and AlphaEdit reuse across edits. Up to
/// [`HELD_COVARIANCE_BYTES`] of them are held in memory and shared with each edit; beyond that
/// (d_ff² f64 per layer: 1.6 GB for MEMIT's five GPT2-XL layers, 4.8 GB for LLaMA-2-7B's) each
/// is read from its cache file when an edit reaches its layer, so an edit holds one at a time.
pub struct CovarianceCache {
    model_key: Option<String>,
    by_layer: BTreeMap<usize, Held>,
    held_bytes: usize,
}

impl Default for CovarianceCache {
    fn default() -> Self {
        Self::holding_at_most(HELD_COVARIANCE_BYTES)
    }
}

/// The most covariance bytes a [`CovarianceCache`] keeps in memory between edits. Reading them back
/// (and checking their checksums) added ~9 s to a GPT2-XL MEMIT edit's five layers (1.6 GB, one
/// contended core), against minutes per edit at the widths that exceed this.
pub const HELD_COVARIANCE_BYTES: usize = 512 << 20;

#[derive(Clone)]
enum Held {
    Memory(Arc<Mat<f64>>),
    /// A cache file `write_cache` wrote, of a `[d, d]` sum.
    Disk {
        path: PathBuf,
        d: usize,
    },
}

/// The covariances of the layers an editor asked for, in its order.
pub struct Covariances(Vec<Held>);

impl Covariances {
    /// `E[k kᵀ]` of the `i`-th layer asked for: the one held, or read from its cache file.
    pub fn layer(&self, i: usize) -> Result<Arc<Mat<f64>>> {
        match self.held(i)? {
            Held::Memory(m) => Ok(m.clone()),
            Held::Disk { path, d } => read_moment(path, *d).map(Arc::new),
        }
    }

    /// The `i`-th layer's `E[k kᵀ]` as a matrix of the caller's own, to be overwritten by a solve:
    /// read from its cache file straight into it, or copied from the one held.
    pub fn layer_owned(&self, i: usize) -> Result<Mat<f64>> {
        match self.held(i)? {
            Held::Memory(m) => Ok(Mat::clone(m)),
            Held::Disk { path, d } => read_moment(path, *d),
        }
    }

    fn held(&self, i: usize) -> Result<&Held> {
        self.0.get(i).ok_or_else(|| {
            Error::Invalid(format!(
                "no statistics at index {i}: {} layers were gathered",
                self.0.len()
            ))
        })
    }
}

impl CovarianceCache {
    /// A cache that keeps covariances in memory while they total at most `bytes`, and reads the
    /// rest from the disk cache as needed (with no cache folder, every one is held).
    pub fn holding_at_most(bytes: usize) -> Self {
        CovarianceCache {
            model_key: None,
            by_layer: BTreeMap::new(),
            held_bytes: bytes,
        }
    }

    /// `E[k kᵀ]` (f64) of each of `layers`, over `samples` articles of `corpus` (default: the
    /// built-in WikiText-2) unless the store overrides them, read from or added to the store.
    pub fn get(
        &mut self,
        model: &Model,
        layers: &[usize],
        samples: usize,
        corpus: Option<&Path>,
        store: &StatsStore,
    ) -> Result<Covariances> {
        let samples = store.samples.unwrap_or(samples);
        let corpus = store.corpus.as_deref().or(corpus);
        let key = format!(
            "{} {samples} {corpus:?} {} {:?}",
            model.origin().source,
            store.context,
            store.dir
        );
        if self.model_key.as_deref() != Some(key.as_str()) {
            self.model_key = Some(key);
            self.by_layer.clear();
        }
        let mut missing: Vec<usize> = layers
            .iter()
            .copied()
            .filter(|l| !self.by_layer.contains_key(l))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if !missing.is_empty() {
            let corpus = store.corpus(corpus)?;
            let opts = store.options(samples)?;
            let d = model.spec().d_mlp;
            let held_bytes = (self.by_layer.len() + missing.len()) * d * d * 8;
            match &opts.cache_dir {
                Some(dir) if held_bytes > self.held_bytes => {
                    let fingerprint = model.fingerprint()?;
                    let path = |l| cache_path(dir, &fingerprint, l, &corpus, &opts);
                    // Computed (and written) where no file passes its checksum yet, then let go;
                    // a damaged one is recomputed with a warning, as when held.
                    let absent: Vec<usize> = missing
                        .iter()
                        .copied()
                        .filter(|&l| !verified(&path(l), "mom2.sum", d))
                        .collect();
                    if !absent.is_empty() {
                        second_moments(model, &absent, &corpus, &opts, &mut |_, _| {})?;
                    }
                    for l in missing {
                        self.by_layer.insert(l, Held::Disk { path: path(l), d });
                    }
                }
                _ => {
                    for m in second_moments(model, &missing, &corpus, &opts, &mut |_, _| {})? {
                        let held = Held::Memory(Arc::new(super::solve::to_mat(&m.second_moment)?));
                        self.by_layer.insert(m.layer, held);
                    }
                }
            }
        }
        layers
            .iter()
            .map(|l| {
                self.by_layer.get(l).cloned().ok_or_else(|| {
                    Error::Invalid(format!("no statistics were gathered for layer {l}"))
                })
            })
            .collect::<Result<_>>()
            .map(Covariances)
    }

    /// A matrix derived from each layer's statistics by `derive` (AlphaEdit's null-space
    /// projector, an eigendecomposition of `d_ff²`), cached beside them as
    /// `layerL-…-ctxC.{name}.safetensors` and trusted only while it names the checksum of the
    /// statistics file it was derived from, so a process that finds it reads neither the
    /// statistics nor repeats the derivation. `name` must change with any setting `derive` uses.
    /// With no cache folder nothing is written and every layer is derived afresh.
    #[allow(clippy::too_many_arguments)]
    pub fn derived(
        &mut self,
        model: &Model,
        layers: &[usize],
        samples: usize,
        corpus: Option<&Path>,
        store: &StatsStore,
        name: &str,
        derive: &dyn Fn(&Mat<f64>) -> Result<Mat<f64>>,
    ) -> Result<Vec<Mat<f64>>> {
        let Some(dir) = &store.dir else {
            let moments = self.get(model, layers, samples, corpus, store)?;
            return (0..layers.len())
                .map(|i| derive(&*moments.layer(i)?))
                .collect();
        };
        let source_corpus = store.corpus(corpus)?;
        let opts = store.options(samples)?;
        let fingerprint = model.fingerprint()?;
        let paths = |layer: usize| {
            let source = cache_path(dir, &fingerprint, layer, &source_corpus, &opts);
            let derived = source.with_extension(format!("{name}.safetensors"));
            (source, derived)
        };
        let d_ff = model.spec().d_mlp;
        let mut found = BTreeMap::new();
        let mut missing = Vec::new();
        for &layer in layers {
            let (source, path) = paths(layer);
            let Some(source_sum) = recorded_checksum(&source, "mom2.sum", d_ff) else {
                missing.push(layer);
                continue;
            };
            match read_matrix(&path, name, d_ff) {
                Ok(Some((matrix, info))) if info.get("source_sha256") == Some(&source_sum) => {
                    found.insert(layer, super::solve::to_mat(&matrix)?);
                }
                Ok(_) => missing.push(layer),
                Err(why) => {
                    eprintln!(
                        "warning: {}: unusable cached {name} ({why}); recomputing",
                        path.display()
                    );
                    missing.push(layer);
                }
            }
        }
        if !missing.is_empty() {
            let moments = self.get(model, &missing, samples, corpus, store)?;
            for (i, &layer) in missing.iter().enumerate() {
                let matrix = derive(&*moments.layer(i)?)?;
                let (source, path) = paths(layer);
                if let Some(source_sum) = recorded_checksum(&source, "mom2.sum", d_ff) {
                    let metadata = HashMap::from([("source_sha256".to_string(), source_sum)]);
                    let values = (0..d_ff * d_ff).map(|i| matrix[(i / d_ff, i % d_ff)]);
                    let tensor = Tensor::from_iter(values, &Device::Cpu)?.reshape((d_ff, d_ff))?;
                    write_matrix(&path, name, &tensor, metadata)?;
                }
                found.insert(layer, matrix);
            }
            // What was derived is what the caller keeps; the statistics stay on disk.
            drop(moments);
            for layer in &missing {
                self.by_layer.remove(layer);
            }
        }
        layers
            .iter()
            .map(|l| {
                found
                    .remove(l)
                    .ok_or_else(|| Error::Invalid(format!("no {name} for layer {l}")))
            })
            .collect()
    }
}

/// Where statistics are cached and how they are gathered: the settings `kedit stats` writes
/// with, so that an editor given the same store reads what it wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsStore {
    /// The cache folder; `None` keeps statistics in memory only.
    pub dir: Option<PathBuf>,
    /// Tokens per window.
    pub context: usize,
    /// Overrides the hparams file's `mom2_corpus`.
    pub corpus: Option<PathBuf>,
    /// Overrides the hparams file's `mom2_n_samples`.
    pub samples: Option<usize>,
}

impl StatsStore {
    pub fn in_memory() -> Self {
        StatsStore {
            dir: None,
            context: 1024,
            corpus: None,
            samples: None,
        }
    }

    pub fn on_disk(dir: PathBuf) -> Self {
        StatsStore {
            dir: Some(dir),
            ..Self::in_memory()
        }
    }

    /// The statistics corpus: the store's, else `corpus` (an hparams file's `mom2_corpus`), else
    /// the built-in WikiText-2.
    pub fn corpus(&self, corpus: Option<&Path>) -> Result<Corpus> {
        match self.corpus.as_deref().or(corpus) {
            Some(path) => Corpus::from_file(path),
            None => Ok(Corpus::builtin()),
        }
    }

    /// How to gather `samples` articles' statistics (the store's own sample count wins).
    ///
    /// # Errors
    /// No articles or a zero context: moments over no tokens are not statistics.
    pub fn options(&self, samples: usize) -> Result<StatsOptions> {
        let samples = self.samples.unwrap_or(samples);
        if samples == 0 {
            return Err(Error::Invalid(
                "statistics over 0 samples: mom2_n_samples (or --samples) must be at least 1"
                    .into(),
            ));
        }
        if self.context == 0 {
            return Err(Error::Invalid(
                "statistics with a context of 0 tokens: the context must be at least 1".into(),
            ));
        }
        Ok(StatsOptions {
            samples,
            context: self.context,
            cache_dir: self.dir.clone(),
        })
    }
}

/// How statistics are gathered.
#[derive(Debug, Clone)]
pub struct StatsOptions {
    /// Articles used (EasyEdit's `mom2_n_samples`), picked by CPython's `Random(1).shuffle`.
    pub samples: usize,
    /// Tokens per window; longer articles are cut into consecutive windows.
    pub context: usize,
    /// Where the moments are cached; `None` computes them without reading or writing a cache.
    pub cache_dir: Option<PathBuf>,
}

/// The statistics of one layer.
pub struct LayerMoments {
    pub layer: usize,
    /// `E[k kᵀ]`, `[d_ff, d_ff]`, f64.
    pub second_moment: Tensor,
    pub tokens: u64,
    /// The cache file (`None` when the statistics are not cached).
    pub path: Option<PathBuf>,
    /// False when read from the cache.
    pub computed: bool,
}

fn cache_path(
    dir: &Path,
    fingerprint: &str,
    layer: usize,
    corpus: &Corpus,
    opts: &StatsOptions,
) -> PathBuf {
    dir.join(fingerprint).join(format!(
        "layer{layer}-{}-n{}-ctx{}.safetensors",
        corpus.id, opts.samples, opts.context
    ))
}

/// The second moments of the MLP keys of `layers`, read from the cache where it holds them and
/// computed in one pass over the corpus for the rest. `progress(done, total)` counts tokens.
pub fn second_moments(
    model: &Model,
    layers: &[usize],
    corpus: &Corpus,
    opts: &StatsOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<LayerMoments>> {
    let fingerprint = model.fingerprint()?;
    let mut found = BTreeMap::new();
    let mut missing = Vec::new();
    for &layer in layers {
        if layer >= model.spec().n_layers {
            return Err(Error::Invalid(format!(
                "layer {layer} is out of range: the model has layers 0..{}",
                model.spec().n_layers
            )));
        }
        let Some(dir) = &opts.cache_dir else {
            missing.push(layer);
            continue;
        };
        let path = cache_path(dir, &fingerprint, layer, corpus, opts);
        match read_cache(&path, model.spec().d_mlp) {
            Ok(Some((sum, tokens))) => {
                found.insert(layer, (sum, tokens, Some(path), false));
            }
            Ok(None) => missing.push(layer),
            Err(why) => {
                eprintln!(
                    "warning: {}: unusable statistics cache ({why}); recomputing",
                    path.display()
                );
                missing.push(layer);
            }
        }
    }
    if !missing.is_empty() {
        let sums = accumulate(model, &missing, corpus, opts, progress)?;
        for (layer, (sum, tokens)) in missing.iter().zip(sums) {
            let path = match &opts.cache_dir {
                Some(dir) => {
                    let path = cache_path(dir, &fingerprint, *layer, corpus, opts);
                    write_cache(&path, &sum, tokens)?;
                    Some(path)
                }
                None => None,
            };
            found.insert(*layer, (sum, tokens, path, true));
        }
    }
    layers
        .iter()
        .enumerate()
        .map(|(i, layer)| {
            // Each sum is d_ff² f64: taken (not copied) at its layer's last mention, so the sums
            // and the moments are not all held at once.
            let entry = if layers[i + 1..].contains(layer) {
                found.get(layer).cloned()
            } else {
                found.remove(layer)
            };
            let (sum, tokens, path, computed) = entry
                .ok_or_else(|| Error::Invalid(format!("no statistics for layer {layer}")))?;
            if tokens == 0 {
                return Err(Error::Invalid(format!(
                    "the statistics corpus gave no tokens for layer {layer}: E[k kᵀ] over nothing is not defined"
                )));
            }
            Ok(LayerMoments {
                layer: *layer,
                second_moment: (sum / tokens as f64)?,
                tokens,
                path,
                computed,
            })
        })
        .collect()
}

/// Token windows of the chosen articles, each at most `context` tokens.
fn windows(model: &Model, corpus: &Corpus, opts: &StatsOptions) -> Result<Vec<Vec<u32>>> {
    let mut order: Vec<usize> = (0..corpus.articles.len()).collect();
    PythonRandom::new(1).shuffle(&mut order);
    order.truncate(opts.samples);
    let context = opts.context.min(model.spec().max_positions).max(1);
    let mut windows = Vec::new();
    for i in order {
        let ids = model.encode_with_special_tokens(&corpus.articles[i])?;
        windows.extend(ids.chunks(context).map(<[u32]>::to_vec));
    }
    Ok(windows)
}

/// `Σ k kᵀ` (f64) and the token count per layer.
fn accumulate(
    model: &Model,
    layers: &[usize],
    corpus: &Corpus,
    opts: &StatsOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<(Tensor, u64)>> {
    let mut windows = windows(model, corpus, opts)?;
    windows.sort_by_key(Vec::len);
    let total: usize = windows.iter().map(Vec::len).sum();
    if total == 0 {
        return Err(Error::Invalid(format!(
            "the statistics corpus ({} articles, {} drawn) has no tokens: E[k kᵀ] over nothing is not defined",
            corpus.articles.len(),
            opts.samples
        )));
    }
    let d_ff = model.spec().d_mlp;
    let dev = model.device();
    if let (true, Some(available)) = (dev.is_cpu(), crate::model::load::available_memory()) {
        check_sums_fit(layers.len(), d_ff, available)?;
    }
    let mut sums: Vec<Tensor> = layers
        .iter()
        .map(|_| Tensor::zeros((d_ff, d_ff), DType::F64, dev))
        .collect::<candle_core::Result<_>>()?;
    let last = *layers
        .iter()
        .max()
        .ok_or_else(|| Error::Invalid("statistics for no layers".into()))?;
    let mut hooks = HookSpec::new().stop_after(last);
    for &l in layers {
        hooks = hooks.capture(Site::MlpAct(l));
    }
    let pad = model.spec().eos_id.or(model.spec().pad_id).unwrap_or(0);
    let budget = 3 * opts.context.max(1);
    let mut done = 0;
    let mut start = 0;
    while start < windows.len() {
        // Windows are sorted by length, so a batch pads little.
        let mut end = start + 1;
        while end < windows.len() && (end + 1 - start) * windows[end].len() <= budget {
            end += 1;
        }
        let batch_windows = &windows[start..end];
        let batch = TokenBatch::new(batch_windows, pad, dev)?;
        let out = model.forward(&batch, &hooks)?;
        for (sum, &l) in sums.iter_mut().zip(layers) {
            let acts = out.capture(Site::MlpAct(l))?;
            let rows = batch_windows
                .iter()
                .enumerate()
                .map(|(r, w)| acts.get(r)?.narrow(0, 0, w.len()))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let keys = Tensor::cat(&rows, 0)?.to_dtype(DType::F32)?;
            ops::add_widened_into(sum, &ops::gram(&keys)?)?;
        }
        done += batch_windows.iter().map(Vec::len).sum::<usize>();
        progress(done, total);
        start = end;
    }
    Ok(sums.into_iter().map(|s| (s, total as u64)).collect())
}

/// Refuses, before the pass, statistics whose running sums (d_ff² f64 per layer, one pass for
/// every layer) and one batch's Gram matrix would not fit in `available` bytes.
fn check_sums_fit(layers: usize, d_ff: usize, available: u64) -> Result<()> {
    let matrix = (d_ff * d_ff) as u64;
    let need = layers as u64 * matrix * 8 + matrix * 4;
    if need <= available {
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    Err(Error::Invalid(format!(
        "statistics for {layers} layers of width {d_ff} need {:.1} GiB for their sums and {:.1} GiB \
         is available: gather fewer layers per run (`kedit stats --layers ...`), which fills the same cache",
        gib(need),
        gib(available)
    )))
}

fn checksum(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn write_cache(path: &Path, sum: &Tensor, tokens: u64) -> Result<()> {
    let metadata = HashMap::from([("tokens".to_string(), tokens.to_string())]);
    write_matrix(path, "mom2.sum", sum, metadata)
}

/// `Ok(None)` when there is no cache file; `Err(why)` when there is one that cannot be trusted.
fn read_cache(path: &Path, d_ff: usize) -> std::result::Result<Option<(Tensor, u64)>, String> {
    let Some((sum, info)) = read_matrix(path, "mom2.sum", d_ff)? else {
        return Ok(None);
    };
    Ok(Some((sum, token_count(&info)?)))
}

/// The number of tokens a `write_cache` file's sum is over, from its metadata.
fn token_count(info: &HashMap<String, String>) -> std::result::Result<u64, String> {
    info.get("tokens")
        .and_then(|t| t.parse().ok())
        .filter(|&t| t > 0)
        .ok_or_else(|| "no token count".to_string())
}

/// The mean `E[k kᵀ]` of a cache file `write_cache` wrote, read in chunks straight into an f64
/// matrix (which is all it holds).
fn read_moment(path: &Path, d: usize) -> Result<Mat<f64>> {
    let unusable = |why: String| Error::file(path, format!("unusable statistics cache ({why})"));
    let file = StoredMatrixFile::open(path, "mom2.sum", d)
        .map_err(unusable)?
        .ok_or_else(|| unusable("the file is gone".into()))?;
    let tokens = token_count(&file.info).map_err(unusable)?;
    let scale = 1.0 / tokens as f64;
    let mut moment = Mat::<f64>::zeros(d, d);
    file.read_values(|i, j, v| moment[(i, j)] = v * scale)
        .map_err(unusable)?;
    Ok(moment)
}

/// One f64 matrix in a safetensors file, with the checksum of its bytes among `metadata`.
fn write_matrix(
    path: &Path,
    name: &str,
    matrix: &Tensor,
    mut metadata: HashMap<String, String>,
) -> Result<()> {
    let matrix = matrix.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let bytes = little_endian_f64_bytes(&matrix)?;
    let (r, c) = matrix.dims2()?;
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![r, c], &bytes)
        .map_err(|e| Error::file(path, e.to_string()))?;
    metadata.insert("sha256".to_string(), checksum(&bytes));
    // Streamed: the statistics of a wide MLP are hundreds of megabytes, held once already.
    crate::files::write_safetensors(path, &[(name.to_string(), view)], metadata)
}

/// A CPU f64 tensor's elements as little-endian bytes, read where they lie when contiguous
/// (otherwise through one more copy).
fn little_endian_f64_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let from = |values: &[f64]| values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let (storage, layout) = t.storage_and_layout();
    if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F64(values)), Some((a, b))) =
        (&*storage, layout.contiguous_offsets())
    {
        return Ok(from(&values[a..b]));
    }
    drop(storage);
    Ok(from(&t.flatten_all()?.to_vec1::<f64>()?))
}

/// The `[d, d]` f64 matrix `name` of a file `write_matrix` wrote, with the file's metadata:
/// `Ok(None)` when there is no file; `Err(why)` when there is one that cannot be trusted.
type StoredMatrix = (Tensor, HashMap<String, String>);
fn read_matrix(
    path: &Path,
    name: &str,
    d: usize,
) -> std::result::Result<Option<StoredMatrix>, String> {
    let Some(file) = StoredMatrixFile::open(path, name, d)? else {
        return Ok(None);
    };
    let mut values = Vec::with_capacity(d * d);
    let info = file.read_values(|_, _, v| values.push(v))?;
    let matrix = Tensor::from_vec(values, (d, d), &Device::Cpu).map_err(|e| e.to_string())?;
    Ok(Some((matrix, info)))
}

/// Whether `path` holds a `[d, d]` f64 matrix `name` that matches the checksum it records.
fn verified(path: &Path, name: &str, d: usize) -> bool {
    matches!(
        StoredMatrixFile::open(path, name, d).map(|f| f.map(|f| f.read_values(|_, _, _| {}))),
        Ok(Some(Ok(_)))
    )
}

/// A `write_matrix` file whose header has been read: the matrix `name` in it is `[d, d]` f64 and
/// the file is as long as the header says; its bytes are checked against the recorded checksum
/// as they are read, a chunk at a time, so a statistics file is never held whole as bytes.
struct StoredMatrixFile {
    file: std::fs::File,
    info: HashMap<String, String>,
    d: usize,
}

impl StoredMatrixFile {
    /// `Ok(None)` when there is no file; `Err(why)` when its header cannot be trusted.
    fn open(path: &Path, name: &str, d: usize) -> std::result::Result<Option<Self>, String> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let file_len = file.metadata().map_err(|e| e.to_string())?.len();
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(|_| "truncated header")?;
        let header_len = u64::from_le_bytes(len);
        if header_len > 100_000_000 || 8 + header_len > file_len {
            return Err("truncated header".into());
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(|e| e.to_string())?;
        let header: serde_json::Value =
            serde_json::from_slice(&header).map_err(|e| format!("bad header: {e}"))?;
        let entry = &header[name];
        let offsets: Vec<u64> = entry["data_offsets"]
            .as_array()
            .map(|o| o.iter().filter_map(|v| v.as_u64()).collect())
            .unwrap_or_default();
        let shape: Vec<u64> = entry["shape"]
            .as_array()
            .map(|o| o.iter().filter_map(|v| v.as_u64()).collect())
            .unwrap_or_default();
        if entry["dtype"] != "F64" || shape != [d as u64, d as u64] {
            return Err(format!(
                "expected {name} as f64 [{d}, {d}], found {} {}",
                entry["dtype"], entry["shape"]
            ));
        }
        let bytes = (d * d * 8) as u64;
        let [begin, end] = offsets[..] else {
            return Err(format!("no data offsets for {name}"));
        };
        if end.checked_sub(begin) != Some(bytes) || 8 + header_len + end != file_len {
            return Err(format!(
                "{name}'s bytes do not match the file's length ({file_len} bytes; truncated?)"
            ));
        }
        file.seek(SeekFrom::Start(8 + header_len + begin))
            .map_err(|e| e.to_string())?;
        let info = header["__metadata__"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Some(StoredMatrixFile { file, info, d }))
    }

    /// Hands every value to `sink(row, column, value)` in the file's row-major order and returns
    /// the metadata; `Err` if the bytes do not match the checksum (`sink` has then seen values
    /// that must be discarded).
    fn read_values(
        mut self,
        mut sink: impl FnMut(usize, usize, f64),
    ) -> std::result::Result<HashMap<String, String>, String> {
        use std::io::Read;
        const CHUNK_BYTES: usize = 4 << 20;
        let mut hasher = Sha256::new();
        let mut chunk = vec![0u8; CHUNK_BYTES];
        let (mut left, mut row, mut col) = (self.d * self.d * 8, 0, 0);
        while left > 0 {
            let take = left.min(CHUNK_BYTES);
            self.file
                .read_exact(&mut chunk[..take])
                .map_err(|e| e.to_string())?;
            hasher.update(&chunk[..take]);
            for word in chunk[..take].chunks_exact(8) {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(word);
                sink(row, col, f64::from_le_bytes(bytes));
                col += 1;
                if col == self.d {
                    (row, col) = (row + 1, 0);
                }
            }
            left -= take;
        }
        if self.info.get("sha256") != Some(&hex(&hasher.finalize())) {
            return Err("checksum mismatch".into());
        }
        Ok(self.info)
    }
}

/// The checksum a `write_matrix` file of a `[d, d]` matrix `name` records in its header, read
/// without the matrix behind it (`None`: no such file, or no checksum in it).
fn recorded_checksum(path: &Path, name: &str, d: usize) -> Option<String> {
    let file = StoredMatrixFile::open(path, name, d).ok()??;
    file.info.get("sha256").cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// LLaMA-2-7B's MLP width: five layers' sums are 4.8 GB of f64, plus one f32 Gram matrix.
    #[test]
    fn sums_that_exceed_available_memory_are_refused_before_the_pass() {
        let need = 5 * 11008u64 * 11008 * 8 + 11008 * 11008 * 4;
        assert!(check_sums_fit(5, 11008, need).is_ok());
        let err = check_sums_fit(5, 11008, need - 1).unwrap_err().to_string();
        assert!(
            err.contains("5 layers of width 11008") && err.contains("--layers"),
            "{err}"
        );
        assert!(check_sums_fit(1, 11008, need / 3).is_ok());
    }

    #[test]
    fn wikitext_articles_split_at_top_level_headings() {
        let text = " = A = \n\n x @-@ y , 1 @,@ 000 @.@ 5 \n = = Sub = = \n more \n = B = \n b \n";
        let articles = wikitext_articles(text);
        assert_eq!(articles.len(), 2);
        assert_eq!(articles[0], "= A =\nx-y , 1,000.5\n= = Sub = =\nmore\n");
        assert_eq!(articles[1], "= B =\nb\n");
        let builtin = Corpus::builtin();
        assert!(builtin.articles.len() > 100, "{}", builtin.articles.len());
        assert_eq!(builtin.id, Corpus::builtin().id);
    }
}
