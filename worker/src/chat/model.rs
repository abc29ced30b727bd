//! GGUF chat models: loading, the architecture enum, and the one-time conversion
//! of quant types that candle has no SIMD kernel for.

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_gemma3, quantized_llama, quantized_qwen2};
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a readable GGUF file: {source}")]
    Gguf { path: PathBuf, source: candle_core::Error },
    #[error("GGUF architecture `{0}` is not supported (llama, qwen2 and gemma3 are)")]
    Architecture(String),
    #[error("cannot convert {path} to Q8_0: {source}")]
    Convert { path: PathBuf, source: candle_core::Error },
    #[error("cannot write the converted model {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot load weights from {path}: {source}")]
    Load { path: PathBuf, source: candle_core::Error },
}

/// The supported architectures; each wraps candle's quantized implementation.
/// Adding a family is one variant here plus its match arms.
pub enum Model {
    Llama(quantized_llama::ModelWeights),
    Qwen2(quantized_qwen2::ModelWeights),
    Gemma3(quantized_gemma3::ModelWeights),
}

impl Model {
    /// Runs `tokens` at positions `index_pos..` and returns the last position's
    /// logits. Position 0 starts a fresh sequence (the KV cache is reset).
    pub fn forward(&mut self, tokens: &[u32], index_pos: usize, device: &Device) -> candle_core::Result<Tensor> {
        let input = Tensor::new(tokens, device)?.unsqueeze(0)?;
        let logits = match self {
            Model::Llama(m) => m.forward(&input, index_pos)?,
            Model::Qwen2(m) => m.forward(&input, index_pos)?,
            Model::Gemma3(m) => m.forward(&input, index_pos)?,
        };
        logits.squeeze(0)?.to_dtype(candle_core::DType::F32)
    }
}

/// Quant types whose candle matmul is scalar-only; decoding with them is several
/// times slower than with Q8_0, whose AVX2 kernel exists.
fn needs_conversion(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1)
}

/// Reads the GGUF header of `path`.
pub fn read_content(path: &Path) -> Result<(gguf_file::Content, BufReader<File>), ModelError> {
    let file = File::open(path).map_err(|source| ModelError::Open { path: path.into(), source })?;
    let mut reader = BufReader::new(file);
    let content =
        gguf_file::Content::read(&mut reader).map_err(|source| ModelError::Gguf { path: path.into(), source })?;
    Ok((content, reader))
}

/// Returns a GGUF with only SIMD-backed quant types: `path` itself when it already
/// is one, else a Q8_0 conversion cached beside it (written once, atomically).
pub fn fast_gguf(path: &Path) -> Result<PathBuf, ModelError> {
    let (content, mut reader) = read_content(path)?;
    if !content.tensor_infos.values().any(|t| needs_conversion(t.ggml_dtype)) {
        return Ok(path.to_path_buf());
    }
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let cached = path.with_file_name(format!("{stem}.natter-q8_0.gguf"));
    if cached.is_file() && read_content(&cached).is_ok() {
        return Ok(cached);
    }
    tracing::info!("converting {} to Q8_0 (once; cached as {})", path.display(), cached.display());
    let convert = |source| ModelError::Convert { path: path.into(), source };
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let qt = content.tensor(&mut reader, name, &Device::Cpu).map_err(convert)?;
        let qt = if needs_conversion(qt.dtype()) {
            let t = qt.dequantize(&Device::Cpu).map_err(convert)?;
            let last = *t.dims().last().unwrap_or(&0);
            let target = if last % GgmlDType::Q8_0.block_size() == 0 { GgmlDType::Q8_0 } else { GgmlDType::F32 };
            QTensor::quantize(&t, target).map_err(convert)?
        } else {
            qt
        };
        tensors.push((name.as_str(), qt));
    }
    let mut metadata: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    metadata.sort_by_key(|(k, _)| *k);
    let tmp = cached.with_extension("gguf.tmp");
    let write_err = |source| ModelError::Write { path: cached.clone(), source };
    {
        let file = File::create(&tmp).map_err(write_err)?;
        let mut writer = BufWriter::new(file);
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        gguf_file::write(&mut writer, &metadata, &refs).map_err(convert)?;
        std::io::Write::flush(&mut writer).map_err(write_err)?;
    }
    std::fs::rename(&tmp, &cached).map_err(write_err)?;
    Ok(cached)
}

/// Loads the model in `path` (after [`fast_gguf`]) with its architecture's code.
pub fn load(path: &Path, device: &Device) -> Result<(Model, gguf_file::Content), ModelError> {
    let (content, mut reader) = read_content(path)?;
    let arch = architecture(&content);
    // The loaders consume the header; keep a copy for the tokenizer and template.
    let (header, _) = read_content(path)?;
    let load_err = |source| ModelError::Load { path: path.into(), source };
    let model = match arch.as_str() {
        "llama" => {
            Model::Llama(quantized_llama::ModelWeights::from_gguf(content, &mut reader, device).map_err(load_err)?)
        }
        "qwen2" => {
            Model::Qwen2(quantized_qwen2::ModelWeights::from_gguf(content, &mut reader, device).map_err(load_err)?)
        }
        "gemma3" => {
            Model::Gemma3(quantized_gemma3::ModelWeights::from_gguf(content, &mut reader, device).map_err(load_err)?)
        }
        other => return Err(ModelError::Architecture(other.to_string())),
    };
    Ok((model, header))
}

pub fn architecture(content: &gguf_file::Content) -> String {
    content.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default()
}

/// The model's trained context length, from `<arch>.context_length`.
pub fn context_length(content: &gguf_file::Content) -> Option<usize> {
    let key = format!("{}.context_length", architecture(content));
    content
        .metadata
        .get(&key)
        .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
        .map(|n| n as usize)
}
