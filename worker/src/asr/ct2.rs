//! Converts a CTranslate2 Whisper `model.bin` (as faster-whisper ships it) into the
//! Hugging Face tensor names and config that [`super::model`] loads.
//!
//! CTranslate2 fuses attention projections: self-attention Q/K/V are one
//! `linear_0`, cross-attention K/V one `linear_1` (with an all-zero K bias, which
//! Whisper does not have). Splitting them back is lossless, so the converted
//! checkpoint computes exactly what the original does. The conversion runs once,
//! at fetch time.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Ct2Error {
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("not a CTranslate2 model: {0}")]
    Format(String),
    #[error("model.bin lacks `{0}`")]
    Missing(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("bad config.json: {0}")]
    Config(String),
}

/// The variables of a `model.bin`, by name, aliases resolved.
pub struct Ct2Model {
    pub spec: String,
    variables: HashMap<String, Tensor>,
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Ct2Error> {
        let end = self.at.checked_add(n).filter(|&end| end <= self.bytes.len());
        let end = end.ok_or_else(|| Ct2Error::Format(format!("truncated at byte {}", self.at)))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, Ct2Error> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Ct2Error> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, Ct2Error> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    /// A length-prefixed, NUL-terminated string.
    fn string(&mut self) -> Result<String, Ct2Error> {
        let len = self.u16()? as usize;
        let raw = self.take(len)?;
        let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
        String::from_utf8(raw.to_vec()).map_err(|_| Ct2Error::Format("a name is not UTF-8".into()))
    }
}

impl Ct2Model {
    pub fn parse(bytes: &[u8]) -> Result<Ct2Model, Ct2Error> {
        let mut r = Reader { bytes, at: 0 };
        let version = r.u32()?;
        if !(2..=6).contains(&version) {
            return Err(Ct2Error::Format(format!("binary version {version} (expected 2 to 6)")));
        }
        let spec = r.string()?;
        let _revision = r.u32()?;
        let count = r.u32()?;
        let mut variables = HashMap::new();
        for _ in 0..count {
            let name = r.string()?;
            let rank = r.u8()? as usize;
            let shape: Vec<usize> = (0..rank).map(|_| r.u32().map(|d| d as usize)).collect::<Result<_, _>>()?;
            let (dtype, len) = if version >= 4 {
                let dtype = r.u8()?;
                (dtype, r.u32()? as usize)
            } else {
                let item = r.u8()? as usize;
                let dtype = match item {
                    4 => 0,
                    1 => 1,
                    _ => return Err(Ct2Error::Format(format!("item size {item} in an old model"))),
                };
                (dtype, shape.iter().product::<usize>() * item)
            };
            let data = r.take(len)?;
            let dtype = match dtype {
                0 => DType::F32,
                1 => DType::I64, // int8; widened below
                2 => DType::I16,
                3 => DType::I32,
                4 => DType::F16,
                5 => DType::BF16,
                other => return Err(Ct2Error::Format(format!("`{name}` has unknown type {other}"))),
            };
            let tensor = match dtype {
                // candle has no i8: widen to f32 (int8 weights are rescaled later).
                DType::I64 => {
                    let values: Vec<f32> = data.iter().map(|&b| b as i8 as f32).collect();
                    Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?
                }
                DType::I16 => {
                    let values: Vec<i64> =
                        data.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]]) as i64).collect();
                    Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?
                }
                DType::I32 => {
                    let values: Vec<i64> =
                        data.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect();
                    Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?
                }
                dtype => Tensor::from_raw_buffer(data, dtype, &shape, &Device::Cpu)?,
            };
            variables.insert(name, tensor);
        }
        if version >= 3 {
            let aliases = r.u32()?;
            for _ in 0..aliases {
                let alias = r.string()?;
                let target = r.string()?;
                if let Some(tensor) = variables.get(&target).cloned() {
                    variables.insert(alias, tensor);
                }
            }
        }
        Ok(Ct2Model { spec, variables })
    }

    /// A weight as f32, undoing int8 quantization when the model has it.
    fn get(&self, name: &str) -> Result<Tensor, Ct2Error> {
        let tensor = self.variables.get(name).ok_or_else(|| Ct2Error::Missing(name.into()))?;
        let scale_name = format!("{}_scale", name);
        match self.variables.get(&scale_name) {
            // int8 rows are stored multiplied by their scale.
            Some(scale) if tensor.rank() == 2 => {
                let scale = scale.to_dtype(DType::F32)?.unsqueeze(1)?;
                Ok(tensor.to_dtype(DType::F32)?.broadcast_div(&scale)?)
            }
            _ => Ok(tensor.to_dtype(DType::F32)?),
        }
    }

    fn scalar(&self, name: &str) -> Result<usize, Ct2Error> {
        let tensor = self.variables.get(name).ok_or_else(|| Ct2Error::Missing(name.into()))?;
        Ok(tensor.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?[0] as usize)
    }

    fn count_layers(&self, stack: &str) -> usize {
        (0..).take_while(|i| self.variables.contains_key(&format!("{stack}/layer_{i}/ffn/linear_0/weight"))).count()
    }
}

/// HF-named tensors (stored as f16, which is what faster-whisper ships) and the
/// HF `config.json` for a CTranslate2 Whisper model.
pub fn to_hf(
    model: &Ct2Model,
    ct2_config: &serde_json::Value,
) -> Result<(HashMap<String, Tensor>, serde_json::Value), Ct2Error> {
    if !model.spec.starts_with("Whisper") {
        return Err(Ct2Error::Format(format!("a {} model, not Whisper", model.spec)));
    }
    let mut out = HashMap::new();
    let mut put = |name: String, tensor: Tensor| -> Result<(), Ct2Error> {
        out.insert(name, tensor.to_dtype(DType::F16)?);
        Ok(())
    };
    let norm = |put: &mut dyn FnMut(String, Tensor) -> Result<(), Ct2Error>, from: &str, to: &str| {
        put(format!("{to}.weight"), model.get(&format!("{from}/gamma"))?)?;
        put(format!("{to}.bias"), model.get(&format!("{from}/beta"))?)
    };
    let linear = |put: &mut dyn FnMut(String, Tensor) -> Result<(), Ct2Error>, from: &str, to: &str| {
        put(format!("{to}.weight"), model.get(&format!("{from}/weight"))?)?;
        put(format!("{to}.bias"), model.get(&format!("{from}/bias"))?)
    };
    // Splits a fused projection into equal row blocks, one per target; Whisper's
    // K projection has no bias, so its (zero) slice of the fused bias is dropped.
    let split = |put: &mut dyn FnMut(String, Tensor) -> Result<(), Ct2Error>, from: &str, to: &[&str]| {
        let weight = model.get(&format!("{from}/weight"))?;
        let bias = model.get(&format!("{from}/bias"))?;
        let rows = weight.dim(0)? / to.len();
        for (i, target) in to.iter().enumerate() {
            put(format!("{target}.weight"), weight.narrow(0, i * rows, rows)?)?;
            if !target.ends_with("k_proj") {
                put(format!("{target}.bias"), bias.narrow(0, i * rows, rows)?)?;
            }
        }
        Ok::<(), Ct2Error>(())
    };

    let enc_layers = model.count_layers("encoder");
    let dec_layers = model.count_layers("decoder");
    linear(&mut put, "encoder/conv1", "model.encoder.conv1")?;
    linear(&mut put, "encoder/conv2", "model.encoder.conv2")?;
    put("model.encoder.embed_positions.weight".into(), model.get("encoder/position_encodings/encodings")?)?;
    for i in 0..enc_layers {
        let (from, to) = (format!("encoder/layer_{i}"), format!("model.encoder.layers.{i}"));
        norm(&mut put, &format!("{from}/self_attention/layer_norm"), &format!("{to}.self_attn_layer_norm"))?;
        let qkv = ["q_proj", "k_proj", "v_proj"].map(|p| format!("{to}.self_attn.{p}"));
        split(&mut put, &format!("{from}/self_attention/linear_0"), &qkv.each_ref().map(|s| s.as_str()))?;
        linear(&mut put, &format!("{from}/self_attention/linear_1"), &format!("{to}.self_attn.out_proj"))?;
        norm(&mut put, &format!("{from}/ffn/layer_norm"), &format!("{to}.final_layer_norm"))?;
        linear(&mut put, &format!("{from}/ffn/linear_0"), &format!("{to}.fc1"))?;
        linear(&mut put, &format!("{from}/ffn/linear_1"), &format!("{to}.fc2"))?;
    }
    norm(&mut put, "encoder/layer_norm", "model.encoder.layer_norm")?;

    put("model.decoder.embed_tokens.weight".into(), model.get("decoder/embeddings/weight")?)?;
    put("model.decoder.embed_positions.weight".into(), model.get("decoder/position_encodings/encodings")?)?;
    for i in 0..dec_layers {
        let (from, to) = (format!("decoder/layer_{i}"), format!("model.decoder.layers.{i}"));
        norm(&mut put, &format!("{from}/self_attention/layer_norm"), &format!("{to}.self_attn_layer_norm"))?;
        let qkv = ["q_proj", "k_proj", "v_proj"].map(|p| format!("{to}.self_attn.{p}"));
        split(&mut put, &format!("{from}/self_attention/linear_0"), &qkv.each_ref().map(|s| s.as_str()))?;
        linear(&mut put, &format!("{from}/self_attention/linear_1"), &format!("{to}.self_attn.out_proj"))?;
        norm(&mut put, &format!("{from}/attention/layer_norm"), &format!("{to}.encoder_attn_layer_norm"))?;
        linear(&mut put, &format!("{from}/attention/linear_0"), &format!("{to}.encoder_attn.q_proj"))?;
        let kv = ["k_proj", "v_proj"].map(|p| format!("{to}.encoder_attn.{p}"));
        split(&mut put, &format!("{from}/attention/linear_1"), &kv.each_ref().map(|s| s.as_str()))?;
        linear(&mut put, &format!("{from}/attention/linear_2"), &format!("{to}.encoder_attn.out_proj"))?;
        norm(&mut put, &format!("{from}/ffn/layer_norm"), &format!("{to}.final_layer_norm"))?;
        linear(&mut put, &format!("{from}/ffn/linear_0"), &format!("{to}.fc1"))?;
        linear(&mut put, &format!("{from}/ffn/linear_1"), &format!("{to}.fc2"))?;
    }
    norm(&mut put, "decoder/layer_norm", "model.decoder.layer_norm")?;

    let conv1 = model.get("encoder/conv1/weight")?;
    let embeddings = model.get("decoder/embeddings/weight")?;
    let ids = |key: &str| -> Vec<u64> {
        ct2_config
            .get(key)
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
            .unwrap_or_default()
    };
    let config = serde_json::json!({
        "model_type": "whisper",
        "num_mel_bins": conv1.dim(1)?,
        "d_model": conv1.dim(0)?,
        "encoder_layers": enc_layers,
        "decoder_layers": dec_layers,
        "encoder_attention_heads": model.scalar("encoder/num_heads")?,
        "decoder_attention_heads": model.scalar("decoder/num_heads")?,
        "vocab_size": embeddings.dim(0)?,
        "max_source_positions": model.get("encoder/position_encodings/encodings")?.dim(0)?,
        "max_target_positions": model.get("decoder/position_encodings/encodings")?.dim(0)?,
        "suppress_tokens": ids("suppress_ids"),
        "begin_suppress_tokens": ids("suppress_ids_begin"),
    });
    Ok((out, config))
}

/// Converts `dir/model.bin` + its CTranslate2 `config.json` into `model.safetensors`
/// and an HF `config.json` (the original config is kept as `ctranslate2.json`).
/// A directory that already holds `model.safetensors` is left as it is, which is
/// how Hub checkpoints in HF format pass through.
pub fn convert_dir(dir: &Path) -> Result<(), Ct2Error> {
    let out = dir.join("model.safetensors");
    if out.is_file() {
        return Ok(());
    }
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|source| Ct2Error::Io { path: path.display().to_string(), source })
    };
    let model = Ct2Model::parse(&read("model.bin")?)?;
    // An interrupted earlier conversion may already have moved the original aside.
    let original = if dir.join("ctranslate2.json").is_file() { "ctranslate2.json" } else { "config.json" };
    let ct2_config: serde_json::Value =
        serde_json::from_slice(&read(original)?).map_err(|e| Ct2Error::Config(e.to_string()))?;
    let (tensors, config) = to_hf(&model, &ct2_config)?;
    let io = |path: &Path, source| Ct2Error::Io { path: path.display().to_string(), source };
    let tmp = dir.join("model.safetensors.part");
    candle_core::safetensors::save(&tensors, &tmp)?;
    if original == "config.json" {
        std::fs::rename(dir.join("config.json"), dir.join("ctranslate2.json")).map_err(|e| io(dir, e))?;
    }
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config).expect("json")).map_err(|e| io(&config_path, e))?;
    // The weights land last: their presence marks a finished conversion.
    std::fs::rename(&tmp, &out).map_err(|e| io(&out, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{write_tiny_whisper_ct2, TINY_WHISPER_TEXT_POSITIONS};

    #[test]
    fn conversion_splits_fused_projections_exactly() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_whisper_ct2(dir.path());
        let model = Ct2Model::parse(&std::fs::read(dir.path().join("model.bin")).unwrap()).unwrap();
        let config = serde_json::json!({"suppress_ids": [1, 2], "suppress_ids_begin": [256]});
        let (tensors, hf) = to_hf(&model, &config).unwrap();
        assert_eq!(hf["d_model"], 16);
        assert_eq!(hf["encoder_layers"], 2);
        assert_eq!(hf["decoder_attention_heads"], 2);
        assert_eq!(hf["max_target_positions"], TINY_WHISPER_TEXT_POSITIONS);
        assert_eq!(hf["suppress_tokens"], serde_json::json!([1, 2]));

        let f32_rows = |t: &Tensor| -> Vec<Vec<f32>> { t.to_dtype(DType::F32).unwrap().to_vec2().unwrap() };
        let f16_rows = |t: Tensor| f32_rows(&t.to_dtype(DType::F16).unwrap());
        let fused = model.get("decoder/layer_1/self_attention/linear_0/weight").unwrap();
        let fused_bias: Vec<f32> =
            model.get("decoder/layer_1/self_attention/linear_0/bias").unwrap().to_vec1().unwrap();
        for (i, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            let split = &tensors[&format!("model.decoder.layers.1.self_attn.{name}.weight")];
            assert_eq!(f32_rows(split), f16_rows(fused.narrow(0, i * 16, 16).unwrap()), "{name}");
        }
        assert!(!tensors.contains_key("model.decoder.layers.1.self_attn.k_proj.bias"));
        let v_bias: Vec<f32> =
            tensors["model.decoder.layers.1.self_attn.v_proj.bias"].to_dtype(DType::F32).unwrap().to_vec1().unwrap();
        let expected: Vec<f32> = Tensor::new(&fused_bias[32..48], &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F16)?.to_dtype(DType::F32)?.to_vec1())
            .unwrap();
        assert_eq!(v_bias, expected);
        let cross = model.get("decoder/layer_0/attention/linear_1/weight").unwrap();
        let cross_v = &tensors["model.decoder.layers.0.encoder_attn.v_proj.weight"];
        assert_eq!(f32_rows(cross_v), f16_rows(cross.narrow(0, 16, 16).unwrap()));
    }

    #[test]
    fn refuses_files_that_are_not_ctranslate2_models() {
        assert!(matches!(Ct2Model::parse(b"GGUF\x03\x00\x00\x00"), Err(Ct2Error::Format(_))));
        let mut truncated = Vec::new();
        truncated.extend_from_slice(&6u32.to_le_bytes());
        truncated.extend_from_slice(&12u16.to_le_bytes());
        truncated.extend_from_slice(b"WhisperS");
        assert!(matches!(Ct2Model::parse(&truncated), Err(Ct2Error::Format(_))));
    }
}
