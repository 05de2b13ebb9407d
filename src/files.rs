//! Writing files so that a reader or a crash never sees half of one.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Writes `bytes` to `path` through a temporary file beside it (`.NAME.partial`) renamed into
/// place, creating the folder if needed.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically_with(path, |out| out.write_all(bytes))
}

/// Writes what `fill` writes to `path` as [`write_atomically`] does, without holding the whole
/// file in memory.
pub fn write_atomically_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("output");
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = dir.join(format!(".{name}.partial"));
    // Flushed before the rename, so a crash or power cut never leaves `path` renamed over with
    // bytes that had not reached the disk.
    let write = || -> std::io::Result<()> {
        let file = std::fs::File::create(&tmp)?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        fill(&mut out)?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()
    };
    write().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    // The rename itself lasts once the folder's entry is on disk; a file system that cannot sync
    // a folder (some network mounts) still has the file, so this is best effort.
    if let Ok(folder) = std::fs::File::open(dir) {
        let _ = folder.sync_all();
    }
    Ok(())
}

/// Writes `tensors` as a safetensors file with `metadata`, atomically, one tensor's bytes in
/// memory at a time (`safetensors::serialize` builds the whole file in memory first: a training
/// checkpoint's size again, at the moment memory is tightest).
pub fn write_safetensors<V: safetensors::View>(
    path: &Path,
    tensors: &[(String, V)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    // In name order, so that the same tensors always make the same bytes.
    let mut order: Vec<&(String, V)> = tensors.iter().collect();
    order.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::to_value(&metadata).unwrap_or_default(),
    );
    let mut offset = 0usize;
    for (name, t) in &order {
        let end = offset + t.data_len();
        header.insert(
            name.to_string(),
            serde_json::json!({
                "dtype": t.dtype().to_string(),
                "shape": t.shape(),
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header)).map_err(|e| {
        Error::file(
            path,
            format!("cannot serialise the safetensors header: {e}"),
        )
    })?;
    // The format pads its header with spaces so that the data starts 8-byte aligned.
    json.resize(json.len().next_multiple_of(8), b' ');
    write_atomically_with(path, |out| {
        out.write_all(&(json.len() as u64).to_le_bytes())?;
        out.write_all(&json)?;
        for (_, t) in &order {
            out.write_all(&t.data())?;
        }
        Ok(())
    })
}

/// This process's resident memory and its peak so far, in KiB (`VmRSS`, `VmHWM` of
/// `/proc/self/status`); `None` where the file does not exist.
pub fn process_memory_kb() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    /// What `write_safetensors` writes reads back through the safetensors crate's own parser:
    /// names, dtypes, shapes, values and metadata.
    #[test]
    fn streamed_safetensors_read_back_with_the_reference_parser() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a = Tensor::new(&[[1f32, -2.5, 3.0], [4.0, 5.0, 6.25]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[7f64, 8.5], &Device::Cpu).unwrap();
        let c = Tensor::new(&[3u32], &Device::Cpu).unwrap();
        let tensors = vec![
            ("zeta".to_string(), a.clone()),
            ("alpha".to_string(), b.clone()),
            ("mid".to_string(), c.clone()),
        ];
        let metadata = HashMap::from([("k".to_string(), "v w".to_string())]);
        write_safetensors(&path, &tensors, metadata.clone()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref(), Some(&metadata));
        let read = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let view = read.tensor("zeta").unwrap();
        assert_eq!(view.dtype(), safetensors::Dtype::F32);
        assert_eq!(view.shape(), [2, 3]);
        let loaded = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        assert_eq!(
            loaded["zeta"].to_vec2::<f32>().unwrap(),
            a.to_vec2::<f32>().unwrap()
        );
        assert_eq!(loaded["alpha"].dtype(), DType::F64);
        assert_eq!(loaded["alpha"].to_vec1::<f64>().unwrap(), [7.0, 8.5]);
        assert_eq!(loaded["mid"].to_vec1::<u32>().unwrap(), [3]);
        assert!(!dir.path().join(".t.safetensors.partial").exists());
    }
}
