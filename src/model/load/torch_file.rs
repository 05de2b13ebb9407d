//! The one tensor of a `torch.save` file (PyTorch's zip format), or of a safetensors file:
//! how EasyEdit ships precomputed matrices such as AlphaEdit's null-space projectors (`P_loc`).

use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::pickle::{Object, Stack};
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// Reads the single tensor `path` holds: a `torch.save(tensor)` zip, a `torch.save` dict or a
/// safetensors file with exactly one tensor.
pub fn read_single_tensor(path: &Path) -> Result<Tensor> {
    let mut head = [0u8; 2];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| Error::io(path, e))?;
    let mut tensors = if &head == b"PK" {
        read_torch_zip(path)?
    } else {
        candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| {
                Error::file(
                    path,
                    format!(
                        "neither a torch.save zip nor safetensors: {}",
                        Error::from(e)
                    ),
                )
            })?
            .into_values()
            .collect()
    };
    match tensors.len() {
        1 => Ok(tensors.remove(0)),
        n => Err(Error::file(
            path,
            format!("holds {n} tensors where one was expected"),
        )),
    }
}

fn read_torch_zip(path: &Path) -> Result<Vec<Tensor>> {
    let bad = |msg: String| Error::file(path, msg);
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| bad(format!("not a readable zip: {e}")))?;
    let names = zip
        .file_names()
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a readable zip: {e}")))?;
    let pickle_name = names
        .iter()
        .find(|n| n.ends_with("/data.pkl") || *n == "data.pkl")
        .map(|n| n.to_string())
        .ok_or_else(|| bad("no data.pkl inside; not a torch.save file".into()))?;
    let dir = pickle_name.trim_end_matches(".pkl").to_string();
    let mut stack = Stack::empty();
    {
        let entry = zip
            .by_name(&pickle_name)
            .map_err(|e| bad(format!("{pickle_name}: {e}")))?;
        stack
            .read_loop(&mut BufReader::new(entry))
            .map_err(|e| bad(format!("{pickle_name}: {}", Error::from(e))))?;
    }
    let object = stack
        .finalize()
        .map_err(|e| bad(format!("{pickle_name}: {}", Error::from(e))))?;
    // A bare tensor, or a dict of them (a state dict).
    let named = match object {
        Object::Dict(entries) => entries,
        tensor => vec![(Object::Unicode("tensor".into()), tensor)],
    };
    let mut tensors = Vec::with_capacity(named.len());
    for (name, value) in named {
        let info = value
            .into_tensor_info(name, Path::new(&dir))
            .map_err(|e| bad(format!("{pickle_name}: {}", Error::from(e))))?
            .ok_or_else(|| bad(format!("{pickle_name} holds something other than tensors")))?;
        if !info.layout.is_contiguous() {
            return Err(bad(format!("tensor `{}` is not contiguous", info.name)));
        }
        let mut entry = zip
            .by_name(&info.path)
            .map_err(|e| bad(format!("{}: {e}", info.path)))?;
        let skip = (info.layout.start_offset() * info.dtype.size_in_bytes()) as u64;
        std::io::copy(&mut entry.by_ref().take(skip), &mut std::io::sink())
            .map_err(|e| Error::io(path, e))?;
        let want = info.layout.shape().elem_count() * info.dtype.size_in_bytes();
        let mut bytes = Vec::with_capacity(want);
        entry
            .take(want as u64)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io(path, e))?;
        if bytes.len() != want {
            return Err(bad(format!(
                "tensor `{}` is truncated: {} of {want} bytes",
                info.name,
                bytes.len()
            )));
        }
        let tensor =
            Tensor::from_raw_buffer(&bytes, info.dtype, info.layout.shape().dims(), &Device::Cpu)?;
        tensors.push(tensor);
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/torch_file")
            .join(name)
    }

    #[test]
    fn reads_a_bare_tensor_saved_by_torch_save() {
        // scripts/torch_file/make_pt.py writes 0.5 * i at flat index i of a [2, 3, 4] tensor.
        let t = read_single_tensor(&fixture("arange-2x3x4.pt")).unwrap();
        assert_eq!(t.dims(), &[2, 3, 4]);
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = (0..24).map(|i| 0.5 * i as f32).collect();
        assert_eq!(v, want);
    }

    #[test]
    fn a_damaged_file_is_a_one_line_error_naming_it() {
        let dir = std::env::temp_dir().join(format!("kedit-torch-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cut = dir.join("cut.pt");
        let bytes = std::fs::read(fixture("arange-2x3x4.pt")).unwrap();
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let err = read_single_tensor(&cut).unwrap_err().to_string();
        assert!(err.contains("cut.pt") && !err.contains('\n'), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
