//! Whisper's encoder-decoder transformer on candle-core, in Hugging Face tensor
//! names (what `ct2::convert_dir` writes and what Hub checkpoints ship).
//!
//! candle-transformers' Whisper re-runs the decoder over every earlier token at
//! each step; this one keeps a per-layer self-attention KV cache and computes the
//! cross-attention keys and values once per 30-second window, so a step costs one
//! token's work.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Conv1d, Conv1dConfig, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    pub num_mel_bins: usize,
    pub d_model: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub decoder_attention_heads: usize,
    pub vocab_size: usize,
    pub max_source_positions: usize,
    pub max_target_positions: usize,
    #[serde(default)]
    pub suppress_tokens: Vec<u32>,
    #[serde(default)]
    pub begin_suppress_tokens: Vec<u32>,
}

fn linear(inp: usize, out: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out, inp), "weight")?;
    let bias = if bias { Some(vb.get(out, "bias")?) } else { None };
    Ok(Linear::new(weight, bias))
}

fn layer_norm(size: usize, vb: VarBuilder) -> Result<LayerNorm> {
    Ok(LayerNorm::new(vb.get(size, "weight")?, vb.get(size, "bias")?, 1e-5))
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl Attention {
    fn load(d: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Attention {
            q: linear(d, d, true, vb.pp("q_proj"))?,
            k: linear(d, d, false, vb.pp("k_proj"))?,
            v: linear(d, d, true, vb.pp("v_proj"))?,
            out: linear(d, d, true, vb.pp("out_proj"))?,
            heads,
        })
    }

    /// [1, n, d] -> [1, heads, n, d/heads]
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        x.reshape((b, n, self.heads, d / self.heads))?.transpose(1, 2)?.contiguous()
    }

    fn keys_values(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.split_heads(&self.k.forward(x)?)?, self.split_heads(&self.v.forward(x)?)?))
    }

    fn attend(&self, x: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let scale = ((d / self.heads) as f64).powf(-0.5);
        let q = (self.split_heads(&self.q.forward(x)?)? * scale)?;
        let mut scores = q.matmul(&k.t()?)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let weights = scores.apply_op1_no_bwd(&super::kernels::SoftmaxLastDim)?;
        let mixed = weights.matmul(v)?.transpose(1, 2)?.reshape((b, n, d))?;
        self.out.forward(&mixed)
    }
}

struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn load(d: usize, vb: &VarBuilder) -> Result<Self> {
        Ok(Mlp { fc1: linear(d, 4 * d, true, vb.pp("fc1"))?, fc2: linear(4 * d, d, true, vb.pp("fc2"))? })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.gelu_erf()?)
    }
}

struct EncoderLayer {
    attn_ln: LayerNorm,
    attn: Attention,
    mlp_ln: LayerNorm,
    mlp: Mlp,
}

pub struct Encoder {
    conv1: Conv1d,
    conv2: Conv1d,
    positions: Tensor,
    layers: Vec<EncoderLayer>,
    ln: LayerNorm,
}

impl Encoder {
    fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        let conv = |inp, stride, vb: VarBuilder| -> Result<Conv1d> {
            let config = Conv1dConfig { padding: 1, stride, ..Default::default() };
            Ok(Conv1d::new(vb.get((d, inp, 3), "weight")?, Some(vb.get(d, "bias")?), config))
        };
        let layers = (0..cfg.encoder_layers)
            .map(|i| {
                let vb = vb.pp(format!("layers.{i}"));
                Ok(EncoderLayer {
                    attn_ln: layer_norm(d, vb.pp("self_attn_layer_norm"))?,
                    attn: Attention::load(d, cfg.encoder_attention_heads, vb.pp("self_attn"))?,
                    mlp_ln: layer_norm(d, vb.pp("final_layer_norm"))?,
                    mlp: Mlp::load(d, &vb)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Encoder {
            conv1: conv(cfg.num_mel_bins, 1, vb.pp("conv1"))?,
            conv2: conv(d, 2, vb.pp("conv2"))?,
            positions: vb.get((cfg.max_source_positions, d), "embed_positions.weight")?,
            layers,
            ln: layer_norm(d, vb.pp("layer_norm"))?,
        })
    }

    /// mel [1, n_mels, 3000] -> audio features [1, 1500, d]
    pub fn forward(&self, mel: &Tensor) -> Result<Tensor> {
        let x = self.conv1.forward(mel)?.gelu_erf()?;
        let x = self.conv2.forward(&x)?.gelu_erf()?.transpose(1, 2)?;
        let n = x.dim(1)?;
        let mut x = x.broadcast_add(&self.positions.narrow(0, 0, n)?)?;
        for layer in &self.layers {
            let h = layer.attn_ln.forward(&x)?;
            let (k, v) = layer.attn.keys_values(&h)?;
            x = (x + layer.attn.attend(&h, &k, &v, None)?)?;
            x = (&x + layer.mlp.forward(&layer.mlp_ln.forward(&x)?)?)?;
        }
        self.ln.forward(&x)
    }
}

struct DecoderLayer {
    self_ln: LayerNorm,
    self_attn: Attention,
    cross_ln: LayerNorm,
    cross_attn: Attention,
    mlp_ln: LayerNorm,
    mlp: Mlp,
}

pub struct Decoder {
    /// The token embedding, which is also the output projection, in f16 (as the
    /// checkpoints store it).
    embed_f16: Vec<half::f16>,
    d_model: usize,
    positions: Tensor,
    layers: Vec<DecoderLayer>,
    ln: LayerNorm,
    max_positions: usize,
}

/// Cross-attention keys and values of one window's audio, per layer: computed
/// once and shared by language detection and every decoding attempt.
#[derive(Clone)]
pub struct AudioContext(Vec<(Tensor, Tensor)>);

/// One decoding pass: the audio it attends to, and the growing self-attention
/// K/V of the tokens decoded so far.
pub struct DecoderState {
    cross: AudioContext,
    cache: Vec<Option<(Tensor, Tensor)>>,
    /// Tokens already in the cache.
    pub len: usize,
}

impl Decoder {
    fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        let layers = (0..cfg.decoder_layers)
            .map(|i| {
                let vb = vb.pp(format!("layers.{i}"));
                Ok(DecoderLayer {
                    self_ln: layer_norm(d, vb.pp("self_attn_layer_norm"))?,
                    self_attn: Attention::load(d, cfg.decoder_attention_heads, vb.pp("self_attn"))?,
                    cross_ln: layer_norm(d, vb.pp("encoder_attn_layer_norm"))?,
                    cross_attn: Attention::load(d, cfg.decoder_attention_heads, vb.pp("encoder_attn"))?,
                    mlp_ln: layer_norm(d, vb.pp("final_layer_norm"))?,
                    mlp: Mlp::load(d, &vb)?,
                })
            })
            .collect::<Result<_>>()?;
        let embed_weight = vb.get((cfg.vocab_size, d), "embed_tokens.weight")?.to_dtype(DType::F16)?;
        Ok(Decoder {
            embed_f16: embed_weight.flatten_all()?.to_vec1()?,
            d_model: d,
            positions: vb.get((cfg.max_target_positions, d), "embed_positions.weight")?,
            layers,
            ln: layer_norm(d, vb.pp("layer_norm"))?,
            max_positions: cfg.max_target_positions,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Projects one window's audio features for cross-attention.
    pub fn audio_context(&self, audio: &Tensor) -> Result<AudioContext> {
        Ok(AudioContext(self.layers.iter().map(|l| l.cross_attn.keys_values(audio)).collect::<Result<_>>()?))
    }

    /// Starts a decoding pass over `audio`.
    pub fn start(&self, audio: &AudioContext) -> DecoderState {
        DecoderState { cross: audio.clone(), cache: vec![None; self.layers.len()], len: 0 }
    }

    /// Runs `tokens` after those already in `state`; returns the final hidden
    /// state of each of them, [n, d].
    pub fn forward(&self, tokens: &[u32], state: &mut DecoderState) -> Result<Tensor> {
        let n = tokens.len();
        let offset = state.len;
        let device = self.positions.device();
        let d = self.d_model;
        let mut embedded = vec![0f32; n * d];
        for (row, &token) in embedded.chunks_exact_mut(d).zip(tokens) {
            let t = token as usize;
            if t * d >= self.embed_f16.len() {
                candle_core::bail!("token {token} is outside the vocabulary");
            }
            half::slice::HalfFloatSliceExt::convert_to_f32_slice(&self.embed_f16[t * d..(t + 1) * d], row);
        }
        let embedded = Tensor::from_vec(embedded, (1, n, d), device)?;
        let mut x = embedded.broadcast_add(&self.positions.narrow(0, offset, n)?)?;
        let mask = if n > 1 { Some(causal_mask(n, offset, device)?) } else { None };
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.self_ln.forward(&x)?;
            let (k, v) = layer.self_attn.keys_values(&h)?;
            let (k, v) = match state.cache[i].take() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                None => (k, v),
            };
            x = (x + layer.self_attn.attend(&h, &k, &v, mask.as_ref())?)?;
            state.cache[i] = Some((k, v));
            let (ck, cv) = &state.cross.0[i];
            x = (&x + layer.cross_attn.attend(&layer.cross_ln.forward(&x)?, ck, cv, None)?)?;
            x = (&x + layer.mlp.forward(&layer.mlp_ln.forward(&x)?)?)?;
        }
        state.len += n;
        self.ln.forward(&x)?.squeeze(0)
    }

    /// Vocabulary logits of one hidden state (a row of [`Self::forward`]'s output).
    pub fn logits(&self, hidden: &Tensor) -> Result<Vec<f32>> {
        Ok(super::kernels::project_f16(&self.embed_f16, self.d_model, &hidden.to_vec1::<f32>()?))
    }
}

fn causal_mask(n: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let total = offset + n;
    let mask: Vec<f32> =
        (0..n).flat_map(|i| (0..total).map(move |j| if j > offset + i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(mask, (n, total), device)
}

pub struct Whisper {
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub config: Config,
}

impl Whisper {
    pub fn load(vb: VarBuilder, config: Config) -> Result<Self> {
        Ok(Whisper {
            encoder: Encoder::load(&config, vb.pp("model.encoder"))?,
            decoder: Decoder::load(&config, vb.pp("model.decoder"))?,
            config,
        })
    }
}

/// The dtype the model computes in (f32: the CPU kernels are fastest there).
pub const DTYPE: DType = DType::F32;
