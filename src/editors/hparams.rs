//! Reading EasyEdit's hyperparameter YAML files unchanged: field names as they are, unknown fields
//! an error that names them, numbers written as YAML 1.1 strings (`5e-4`) accepted as EasyEdit
//! converts them, `norm_constraint: false` meaning "none".

use std::path::Path;

use serde::de::{DeserializeOwned, Deserializer, Error as _};
use serde::Deserialize;

use crate::error::{Error, Result};

/// Parses a YAML file into a method's parameters.
pub fn read_yaml<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_yaml(&text).map_err(|msg| Error::file(path, msg))
}

/// EasyEdit fields that say where its Python code finds things (module paths, devices, its own
/// statistics folder and dtype): every method's file may carry them and no kedit editor reads
/// them, so they are dropped before a method's fields are checked strictly.
const BOOKKEEPING: &[&str] = &[
    "model_name",
    "device",
    "model_parallel",
    "fp16",
    "stats_dir",
    "mom2_dataset",
    "mom2_dtype",
    "layer_module_tmp",
    "mlp_module_tmp",
    "attn_module_tmp",
    "ln_f_module",
    "lm_head_module",
];

pub fn parse_yaml<T: DeserializeOwned>(text: &str) -> std::result::Result<T, String> {
    let mut value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    if let Some(map) = value.as_mapping_mut() {
        for key in BOOKKEEPING {
            map.remove(*key);
        }
    }
    serde_yaml::from_value(value).map_err(|e| e.to_string())
}

/// Whether the file sets EasyEdit's `use_chat_template` to a true value.
pub fn wants_chat_template(path: &Path) -> Result<bool> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|e| Error::file(path, e.to_string()))?;
    Ok(value
        .get("use_chat_template")
        .and_then(serde_yaml::Value::as_bool)
        .unwrap_or(false))
}

/// The `alg_name` (editing files) or `alg` (training files) of a YAML file.
pub fn alg_name(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|e| Error::file(path, e.to_string()))?;
    ["alg_name", "alg"]
        .iter()
        .find_map(|k| value.get(*k).and_then(|v| v.as_str()).map(str::to_string))
        .ok_or_else(|| Error::file(path, "field \"alg_name\" is missing"))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Number {
    F(f64),
    S(String),
}

/// A float that may be written as a YAML 1.1 string such as `5e-4`.
pub fn float<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    match Number::deserialize(d)? {
        Number::F(f) => Ok(f),
        Number::S(s) => s
            .trim()
            .parse()
            .map_err(|_| D::Error::custom(format!("{s:?} is not a number"))),
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FloatOrFalse {
    Bool(bool),
    F(f64),
    S(String),
}

/// `false`, `null` or absent → `None`; a number (or numeric string) → `Some`.
pub fn float_or_false<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<f64>, D::Error> {
    match Option::<FloatOrFalse>::deserialize(d)? {
        None | Some(FloatOrFalse::Bool(false)) => Ok(None),
        Some(FloatOrFalse::Bool(true)) => {
            Err(D::Error::custom("expected a number or false, found true"))
        }
        Some(FloatOrFalse::F(f)) => Ok(Some(f)),
        Some(FloatOrFalse::S(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| D::Error::custom(format!("{s:?} is not a number"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct P {
        #[serde(deserialize_with = "float")]
        lr: f64,
        #[serde(default, deserialize_with = "float_or_false")]
        norm_constraint: Option<f64>,
    }

    #[test]
    fn yaml_numbers_and_false() {
        let p: P = parse_yaml("lr: 5e-4\nnorm_constraint: false\n").unwrap();
        assert_eq!((p.lr, p.norm_constraint), (5e-4, None));
        let p: P = parse_yaml("lr: \"1e-4\"\nnorm_constraint: 5e-4\n").unwrap();
        assert_eq!((p.lr, p.norm_constraint), (1e-4, Some(5e-4)));
        let p: P = parse_yaml("lr: 1\n").unwrap();
        assert_eq!((p.lr, p.norm_constraint), (1.0, None));
        let err = parse_yaml::<P>("lr: 1\nlearning_rate: 2\n").unwrap_err();
        assert!(err.contains("unknown field `learning_rate`"), "{err}");
    }
}
