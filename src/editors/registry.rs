//! The one place that maps a method's name to its implementation.

use std::path::Path;

use super::hparams::alg_name;
use super::{AlphaEdit, Editor, Ft, Memit, Rome};
use crate::error::{Error, Result};

/// The editing methods kedit implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditorKind {
    /// FT-L or FT-M, chosen by `objective_optimization`.
    Ft,
    Rome,
    Memit,
    AlphaEdit,
}

impl EditorKind {
    /// EasyEdit's `alg_name` → method.
    pub fn from_alg_name(name: &str) -> Result<Self> {
        match name {
            "FT" | "FT-L" | "FT-M" => Ok(EditorKind::Ft),
            "ROME" => Ok(EditorKind::Rome),
            "MEMIT" => Ok(EditorKind::Memit),
            "AlphaEdit" => Ok(EditorKind::AlphaEdit),
            other => Err(Error::Unsupported {
                what: format!("editing method {other:?}"),
                why: "kedit implements FT (FT-L, FT-M), ROME, MEMIT and AlphaEdit so far".into(),
            }),
        }
    }
}

/// Builds the editor an EasyEdit hyperparameter file describes (its `alg_name` picks the method).
pub fn editor_from_hparams(path: &Path) -> Result<Box<dyn Editor>> {
    build_editor(&alg_name(path)?, path)
}

impl EditorKind {
    /// The folder of `hparams/` holding this method's files (EasyEdit's layout).
    pub fn hparams_dir(self) -> &'static str {
        match self {
            EditorKind::Ft => "FT",
            EditorKind::Rome => "ROME",
            EditorKind::Memit => "MEMIT",
            EditorKind::AlphaEdit => "AlphaEdit",
        }
    }
}

/// Builds the editor `name` (`FT-L`, `FT-M`, `FT`, ...) from a hyperparameter file. A name that
/// fixes a variant (FT-L, FT-M) overrides the file's choice of it.
pub fn build_editor(name: &str, hparams: &Path) -> Result<Box<dyn Editor>> {
    let kind = EditorKind::from_alg_name(name)?;
    let file_kind = EditorKind::from_alg_name(&alg_name(hparams)?)
        .map_err(|e| Error::file(hparams, e.to_string()))?;
    if kind != file_kind {
        return Err(Error::file(
            hparams,
            format!("is a {file_kind:?} file, not one for {name}"),
        ));
    }
    Ok(match kind {
        EditorKind::Ft => {
            let mut params: super::FtParams = super::hparams::read_yaml(hparams)?;
            match name {
                "FT-L" => params.objective_optimization = super::Objective::PromptLast,
                "FT-M" => params.objective_optimization = super::Objective::TargetNew,
                _ => {}
            }
            Box::new(Ft::new(params)?)
        }
        EditorKind::Rome => Box::new(Rome::from_yaml(hparams)?),
        EditorKind::Memit => Box::new(Memit::from_yaml(hparams)?),
        EditorKind::AlphaEdit => Box::new(AlphaEdit::from_yaml(hparams)?),
    })
}

/// The shipped hyperparameter file for `name` on a known model (GPT-2 XL, LLaMA-2-7B, SmolLM2-135M),
/// looked for in `$KEDIT_HPARAMS`, `./hparams`, then the source tree kedit was built from.
pub fn default_hparams(name: &str, spec: &crate::model::ModelSpec) -> Result<std::path::PathBuf> {
    use crate::model::Arch;
    let kind = EditorKind::from_alg_name(name)?;
    let model = match (spec.arch, spec.n_layers, spec.d_model) {
        (Arch::Gpt2, 48, 1600) => "gpt2-xl",
        (Arch::Llama, 32, 4096) => "llama-7b",
        (Arch::Llama, 30, 576) => "smollm2-135m",
        _ => {
            return Err(Error::Invalid(format!(
            "no shipped hyperparameters for this {:?} model ({} layers, width {}); pass --hparams",
            spec.arch, spec.n_layers, spec.d_model
        )))
        }
    };
    let roots = [
        std::env::var_os("KEDIT_HPARAMS").map(std::path::PathBuf::from),
        Some(std::path::PathBuf::from("hparams")),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("hparams")),
    ];
    let rel = Path::new(kind.hparams_dir()).join(format!("{model}.yaml"));
    roots
        .into_iter()
        .flatten()
        .map(|root| root.join(&rel))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{} not found in $KEDIT_HPARAMS, ./hparams or kedit's source tree; pass --hparams",
                rel.display()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_hyperparameter_file_builds_its_editor() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("hparams");
        let mut files = 0;
        for dir in std::fs::read_dir(&root).unwrap() {
            for file in std::fs::read_dir(dir.unwrap().path()).unwrap() {
                let path = file.unwrap().path();
                let editor = editor_from_hparams(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(!editor.name().is_empty());
                files += 1;
            }
        }
        assert!(files >= 12, "found {files} files");
    }

    #[test]
    fn a_field_no_method_knows_is_an_error_naming_file_and_field() {
        let dir = std::env::temp_dir().join(format!("kedit-registry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("hparams/ROME/gpt2-xl.yaml");
        let text = std::fs::read_to_string(shipped).unwrap();
        let with_extra = dir.join("rome-extra.yaml");
        std::fs::write(&with_extra, format!("{text}\nv_lr_decay: 0.9\n")).unwrap();
        let err = editor_from_hparams(&with_extra).err().unwrap().to_string();
        assert!(
            err.contains("rome-extra.yaml") && err.contains("v_lr_decay"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
