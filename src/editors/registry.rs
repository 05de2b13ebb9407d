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
    Mend,
    /// MEND trained and applied with instructions.
    InstructEdit,
    Ke,
    Grace,
    CaliNet,
}

/// Every name `--editor` takes, with the method it selects: the one list the CLI's help and the
/// "not supported" error are made from.
pub const EDITORS: &[(&str, EditorKind)] = &[
    ("FT-L", EditorKind::Ft),
    ("FT-M", EditorKind::Ft),
    ("FT", EditorKind::Ft),
    ("ROME", EditorKind::Rome),
    ("MEMIT", EditorKind::Memit),
    ("AlphaEdit", EditorKind::AlphaEdit),
    ("MEND", EditorKind::Mend),
    ("InstructEdit", EditorKind::InstructEdit),
    ("KE", EditorKind::Ke),
    ("GRACE", EditorKind::Grace),
    ("CaliNet", EditorKind::CaliNet),
];

/// The names `--editor` takes, comma-separated.
pub fn editor_names() -> String {
    EDITORS
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}

impl EditorKind {
    /// EasyEdit's `alg_name` → method.
    pub fn from_alg_name(name: &str) -> Result<Self> {
        EDITORS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, kind)| *kind)
            .ok_or_else(|| Error::Unsupported {
                what: format!("editing method {name:?}"),
                why: format!("kedit implements {}", editor_names()),
            })
    }
}

/// Rebuilds an overlay saved in a patch from its kind and parts.
pub fn overlay_from_parts(
    kind: &str,
    parts: &crate::model::OverlayParts,
    device: &candle_core::Device,
) -> Result<std::sync::Arc<dyn crate::model::Overlay>> {
    use super::memory::{CalibrationFfn, Codebook};
    use crate::model::LowRankAdapter;
    match kind {
        Codebook::KIND => Ok(std::sync::Arc::new(Codebook::from_parts(parts, device)?)),
        CalibrationFfn::KIND => Ok(std::sync::Arc::new(CalibrationFfn::from_parts(
            parts, device,
        )?)),
        LowRankAdapter::KIND => Ok(std::sync::Arc::new(LowRankAdapter::from_parts(
            parts, device,
        )?)),
        other => Err(Error::Unsupported {
            what: format!("overlay kind {other:?}"),
            why: format!(
                "this kedit rebuilds {}",
                [LowRankAdapter::KIND, Codebook::KIND, CalibrationFfn::KIND].join(", ")
            ),
        }),
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
            EditorKind::Mend => "MEND",
            EditorKind::InstructEdit => "InstructEdit",
            EditorKind::Ke => "KE",
            EditorKind::Grace => "GRACE",
            EditorKind::CaliNet => "CaliNet",
        }
    }
}

/// Builds the editor `name` (`FT-L`, `FT-M`, `FT`, ...) from a hyperparameter file. A name that
/// fixes a variant (FT-L, FT-M) overrides the file's choice of it.
pub fn build_editor(name: &str, hparams: &Path) -> Result<Box<dyn Editor>> {
    build_editor_with_archive(name, hparams, None)
}

/// [`build_editor`] for a trained editor (MEND, KE) whose checkpoint is `archive` rather than the
/// file's own `archive:`.
///
/// # Errors
/// An archive for a method that trains nothing.
pub fn build_editor_with_archive(
    name: &str,
    hparams: &Path,
    archive: Option<&Path>,
) -> Result<Box<dyn Editor>> {
    let kind = EditorKind::from_alg_name(name)?;
    let file_kind = EditorKind::from_alg_name(&alg_name(hparams)?)
        .map_err(|e| Error::file(hparams, e.to_string()))?;
    // EasyEdit's InstructEdit files are MEND files (`alg_name: MEND`).
    let same =
        kind == file_kind || (kind, file_kind) == (EditorKind::InstructEdit, EditorKind::Mend);
    if !same {
        return Err(Error::file(
            hparams,
            format!("is a {file_kind:?} file, not one for {name}"),
        ));
    }
    let archive = archive.map(Path::to_path_buf);
    if archive.is_some()
        && !matches!(
            kind,
            EditorKind::Mend | EditorKind::InstructEdit | EditorKind::Ke
        )
    {
        return Err(Error::Invalid(format!(
            "--archive names a trained editor: MEND, InstructEdit and KE take one, {name} does not"
        )));
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
        EditorKind::Mend => Box::new(super::hypernet::mend::MendFromArchive::from_yaml(
            hparams, archive,
        )?),
        EditorKind::InstructEdit => Box::new(
            super::hypernet::instructedit::InstructEditFromArchive::from_yaml(hparams, archive)?,
        ),
        EditorKind::Ke => Box::new(super::hypernet::ke::KeFromArchive::from_yaml(
            hparams, archive,
        )?),
        EditorKind::Grace => Box::new(super::memory::Grace::from_yaml(hparams)?),
        EditorKind::CaliNet => Box::new(super::memory::CaliNet::from_yaml(hparams)?),
    })
}

/// Which model the shipped files were tuned for, by its whole shape: layers, widths, heads and
/// vocabulary (a LLaMA-3-8B has LLaMA-2-7B's depth and width, but not its MLP, KV heads or
/// vocabulary, and must not get its file).
fn shipped_model_name(spec: &crate::model::ModelSpec) -> Option<&'static str> {
    use crate::model::Arch;
    let shape = (
        spec.arch,
        spec.n_layers,
        spec.d_model,
        spec.d_mlp,
        spec.n_kv_heads,
        spec.vocab_size,
    );
    match shape {
        (Arch::Gpt2, 48, 1600, 6400, 25, 50257) => Some("gpt2-xl"),
        (Arch::Llama, 32, 4096, 11008, 32, 32000) => Some("llama-7b"),
        (Arch::Llama, 30, 576, 1536, 3, 49152) => Some("smollm2-135m"),
        _ => None,
    }
}

/// The shipped hyperparameter file for `name` on a known model (GPT-2 XL, LLaMA-2-7B,
/// SmolLM2-135M), looked for under each of `roots` in turn.
pub fn default_hparams(
    name: &str,
    spec: &crate::model::ModelSpec,
    roots: &[std::path::PathBuf],
) -> Result<std::path::PathBuf> {
    let kind = EditorKind::from_alg_name(name)?;
    let model = shipped_model_name(spec).ok_or_else(|| {
        Error::Invalid(format!(
            "no shipped hyperparameters for this {:?} model ({} layers, width {}, MLP {}, {} KV heads, vocabulary {}); pass --hparams",
            spec.arch, spec.n_layers, spec.d_model, spec.d_mlp, spec.n_kv_heads, spec.vocab_size
        ))
    })?;
    let rel = Path::new(kind.hparams_dir()).join(format!("{model}.yaml"));
    roots
        .iter()
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
            let dir = dir.unwrap().path();
            if dir.file_name().is_some_and(|n| n == "TRAINING") {
                continue;
            }
            for file in std::fs::read_dir(dir).unwrap() {
                let path = file.unwrap().path();
                let editor = editor_from_hparams(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(!editor.name().is_empty());
                files += 1;
            }
        }
        assert!(files >= 15, "found {files} files");
        // Training files are read by `kedit train`, not the registry.
        let mend_files = std::fs::read_dir(root.join("TRAINING/MEND"))
            .unwrap()
            .chain(std::fs::read_dir(root.join("TRAINING/InstructEdit")).unwrap());
        for file in mend_files {
            let path = file.unwrap().path();
            super::super::hypernet::mend::MendParams::from_yaml(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            files += 1;
        }
        for file in std::fs::read_dir(root.join("TRAINING/KE")).unwrap() {
            let path = file.unwrap().path();
            super::super::hypernet::ke::KeParams::from_yaml(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            files += 1;
        }
        assert!(files >= 24, "found {files} files");
    }

    #[test]
    fn values_kedit_does_not_honour_are_refused_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("hparams/MEMIT/gpt2-xl.yaml");
        let text = std::fs::read_to_string(shipped).unwrap();
        let variant = |name: &str, from: &str, to: &str| {
            let path = dir.path().join(name);
            assert!(text.contains(from), "{from}");
            std::fs::write(&path, text.replace(from, to)).unwrap();
            path
        };
        let random = variant(
            "random.yaml",
            "layer_selection: \"all\"",
            "layer_selection: \"random\"",
        );
        let err = editor_from_hparams(&random).err().unwrap().to_string();
        assert!(
            err.contains("random.yaml") && err.contains("layer_selection"),
            "{err}"
        );
        let long = variant("long.yaml", "layer_selection: \"all\"", "max_length: 40");
        let err = editor_from_hparams(&long).err().unwrap().to_string();
        assert!(
            err.contains("long.yaml") && err.contains("max_length"),
            "{err}"
        );
        // batch_size is honoured: it bounds the requests of one edit call, as EasyEdit chunks them.
        let batched = variant("batched.yaml", "layer_selection: \"all\"", "batch_size: 2");
        assert_eq!(editor_from_hparams(&batched).unwrap().max_batch(), 2);
        let unbatched = variant("unbatched.yaml", "layer_selection: \"all\"", "");
        assert_eq!(
            editor_from_hparams(&unbatched).unwrap().max_batch(),
            usize::MAX
        );
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
