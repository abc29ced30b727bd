//! Tiny models the tests write themselves, so the real GGUF loader, tokenizer,
//! template and sampler run in milliseconds.

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use std::path::Path;

pub mod text_images;
pub use text_images::render_text_png;

/// GPT-2's byte-to-character map: printable bytes stand for themselves, the rest
/// are shifted past 255, so every byte is a visible vocab entry.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut shifted = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                shifted += 1;
                char::from_u32(255 + shifted).unwrap()
            }
        })
        .collect()
}

pub const TINY_CONTEXT: u32 = 512;

/// Writes a two-layer llama GGUF with random weights (fixed seed), a byte-level
/// BPE vocab with ChatML specials, the smollm pre-tokenizer tag and a ChatML
/// template. Matrices are stored as `matrix_dtype`.
pub fn write_tiny_llama(path: &Path, matrix_dtype: GgmlDType) {
    let shape = TinyShape { arch: "llama", dim: 64, ff: 128, heads: 4, kv_heads: 2 };
    write_tiny(path, &shape, |_, _| matrix_dtype, matrix_dtype, matrix_dtype);
}

/// Writes a two-layer qwen2 GGUF laid out like the real Qwen2.5 files: q/k/v
/// biases, untied Q8_0 output, Q5_0 embeddings and attention, Q8_0 values in one
/// layer, and Q4_K / Q6_K feed-forward down projections.
pub fn write_tiny_qwen2(path: &Path) {
    let shape = TinyShape { arch: "qwen2", dim: 256, ff: 512, heads: 4, kv_heads: 2 };
    let types = |layer: u32, name: &str| match (layer, name) {
        (0, "attn_v") => GgmlDType::Q8_0,
        (0, "ffn_down") => GgmlDType::Q4K,
        (_, "ffn_down") => GgmlDType::Q6K,
        _ => GgmlDType::Q5_0,
    };
    write_tiny(path, &shape, types, GgmlDType::Q5_0, GgmlDType::Q8_0);
}

struct TinyShape {
    arch: &'static str,
    dim: usize,
    ff: usize,
    heads: u32,
    kv_heads: u32,
}

fn write_tiny(
    path: &Path,
    shape: &TinyShape,
    layer_dtype: impl Fn(u32, &str) -> GgmlDType,
    embed_dtype: GgmlDType,
    output_dtype: GgmlDType,
) {
    let mut tokens: Vec<String> = byte_chars().into_iter().map(String::from).collect();
    let merges = [("h", "e"), ("l", "l"), ("Ġ", "t")];
    for (a, b) in merges {
        tokens.push(format!("{a}{b}"));
    }
    let specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"];
    let first_special = tokens.len() as u32;
    tokens.extend(specials.iter().map(|s| s.to_string()));
    let vocab = tokens.len();
    let mut token_types = vec![Value::I32(1); vocab];
    for t in token_types.iter_mut().skip(first_special as usize) {
        *t = Value::I32(3);
    }

    let TinyShape { arch, dim, ff, heads, kv_heads } = *shape;
    let layers = 2u32;
    let head_dim = dim / heads as usize;
    let kv_dim = head_dim * kv_heads as usize;
    let template = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let key = |k: &str| format!("{arch}.{k}");
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(format!("natter tiny test {arch}"))),
        (key("block_count"), Value::U32(layers)),
        (key("context_length"), Value::U32(TINY_CONTEXT)),
        (key("embedding_length"), Value::U32(dim as u32)),
        (key("feed_forward_length"), Value::U32(ff as u32)),
        (key("attention.head_count"), Value::U32(heads)),
        (key("attention.head_count_kv"), Value::U32(kv_heads)),
        (key("rope.dimension_count"), Value::U32(head_dim as u32)),
        (key("rope.freq_base"), Value::F32(10000.0)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
    ];
    metadata.extend([
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().cloned().map(Value::String).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(token_types)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.iter().map(|(a, b)| Value::String(format!("{a} {b}"))).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(first_special + 2)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(first_special + 1)),
        ("tokenizer.chat_template".into(), Value::String(template.into())),
    ]);

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut random = |rows: usize, cols: usize, scale: f32| {
        let data: Vec<f32> = (0..rows * cols).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale).collect();
        Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap()
    };
    let f32s = |t: Tensor| QTensor::quantize(&t, GgmlDType::F32).unwrap();
    let ones = |n: usize| f32s(Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).unwrap());
    let q = |t: Tensor, dtype: GgmlDType| QTensor::quantize(&t, dtype).unwrap();

    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), q(random(vocab, dim, 1.0), embed_dtype)),
        ("output_norm.weight".into(), ones(dim)),
        ("output.weight".into(), q(random(vocab, dim, 0.5), output_dtype)),
    ];
    for l in 0..layers {
        let p = |name: &str| format!("blk.{l}.{name}.weight");
        let m = |name: &str, rows: usize, cols: usize, random: &mut dyn FnMut(usize, usize, f32) -> Tensor| {
            (p(name), q(random(rows, cols, 0.2), layer_dtype(l, name)))
        };
        tensors.push((p("attn_norm"), ones(dim)));
        tensors.push(m("attn_q", dim, dim, &mut random));
        tensors.push(m("attn_k", kv_dim, dim, &mut random));
        tensors.push(m("attn_v", kv_dim, dim, &mut random));
        tensors.push(m("attn_output", dim, dim, &mut random));
        tensors.push((p("ffn_norm"), ones(dim)));
        tensors.push(m("ffn_gate", ff, dim, &mut random));
        tensors.push(m("ffn_up", ff, dim, &mut random));
        tensors.push(m("ffn_down", dim, ff, &mut random));
        if arch == "qwen2" {
            for (name, n) in [("attn_q", dim), ("attn_k", kv_dim), ("attn_v", kv_dim)] {
                let bias = random(1, n, 0.5).reshape(n).unwrap();
                tensors.push((format!("blk.{l}.{name}.bias"), f32s(bias)));
            }
        }
    }
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    gguf_file::write(&mut file, &md, &ts).unwrap();
    std::io::Write::flush(&mut file).unwrap();
}

/// Labels of the tiny BERT token classifier.
pub const TINY_BERT_LABELS: [&str; 5] = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"];
/// Positions the tiny BERT takes: windows of 14 tokens plus [CLS] and [SEP].
pub const TINY_BERT_POSITIONS: usize = 16;

/// Writes a Hugging Face style BertForTokenClassification checkpoint (config.json,
/// vocab.txt, model.safetensors) with random encoder weights and a classifier that
/// always picks `forced_label`, so aggregation results are known in advance.
pub fn write_tiny_bert(dir: &Path, forced_label: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut vocab: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"].iter().map(|s| s.to_string()).collect();
    for w in ["the", "cat", "sat", "on", "mat", "anna", "paris", "lives", "in", "and", "a", "dog"] {
        vocab.push(w.to_string());
    }
    for c in 'a'..='z' {
        vocab.push(c.to_string());
        vocab.push(format!("##{c}"));
    }
    std::fs::write(dir.join("vocab.txt"), vocab.join("\n")).unwrap();
    let (hidden, layers, inter) = (32usize, 2usize, 64usize);
    let id2label: serde_json::Map<String, serde_json::Value> =
        TINY_BERT_LABELS.iter().enumerate().map(|(i, l)| (i.to_string(), serde_json::Value::from(*l))).collect();
    let config = serde_json::json!({
        "architectures": ["BertForTokenClassification"], "model_type": "bert",
        "vocab_size": vocab.len(), "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": 4, "intermediate_size": inter, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": TINY_BERT_POSITIONS, "type_vocab_size": 2,
        "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
        "id2label": id2label, "do_lower_case": true,
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();

    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut random = |dims: &[usize]| {
        let n: usize = dims.iter().product();
        let data: Vec<f32> = (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * 0.1).collect();
        Tensor::from_vec(data, dims, &Device::Cpu).unwrap()
    };
    let ones = |n: usize| Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).unwrap();
    let zeros = |dims: &[usize]| Tensor::zeros(dims, candle_core::DType::F32, &Device::Cpu).unwrap();
    let mut t = std::collections::HashMap::new();
    t.insert("bert.embeddings.word_embeddings.weight".to_string(), random(&[vocab.len(), hidden]));
    t.insert("bert.embeddings.position_embeddings.weight".to_string(), random(&[TINY_BERT_POSITIONS, hidden]));
    t.insert("bert.embeddings.token_type_embeddings.weight".to_string(), random(&[2, hidden]));
    t.insert("bert.embeddings.LayerNorm.weight".to_string(), ones(hidden));
    t.insert("bert.embeddings.LayerNorm.bias".to_string(), zeros(&[hidden]));
    for l in 0..layers {
        let p = |s: &str| format!("bert.encoder.layer.{l}.{s}");
        for (name, out, inp) in [
            ("attention.self.query", hidden, hidden),
            ("attention.self.key", hidden, hidden),
            ("attention.self.value", hidden, hidden),
            ("attention.output.dense", hidden, hidden),
            ("intermediate.dense", inter, hidden),
            ("output.dense", hidden, inter),
        ] {
            t.insert(p(&format!("{name}.weight")), random(&[out, inp]));
            t.insert(p(&format!("{name}.bias")), zeros(&[out]));
        }
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
            t.insert(p(&format!("{norm}.weight")), ones(hidden));
            t.insert(p(&format!("{norm}.bias")), zeros(&[hidden]));
        }
    }
    t.insert("classifier.weight".to_string(), zeros(&[TINY_BERT_LABELS.len(), hidden]));
    let mut bias = vec![0f32; TINY_BERT_LABELS.len()];
    bias[forced_label] = 10.0;
    t.insert("classifier.bias".to_string(), Tensor::new(bias, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
}

/// Shape of the tiny Whisper checkpoint [`write_tiny_whisper_ct2`] writes.
pub const TINY_WHISPER_TEXT_POSITIONS: usize = 64;

/// Writes a two-layer Whisper in CTranslate2's `model.bin` format (random weights,
/// fixed seed; fused attention projections as faster-whisper ships them), its
/// CTranslate2 `config.json`, and a byte-level `tokenizer.json` with Whisper's
/// special tokens, English and German language tokens, and the 1,501 timestamps.
/// `natter-worker models fetch` converts such a directory before loading it.
pub fn write_tiny_whisper_ct2(dir: &Path) {
    let (d, heads, layers, mels, audio_positions) = (16usize, 2i16, 2usize, 80usize, 1500usize);
    let mut vocab: Vec<String> = byte_chars().into_iter().map(String::from).collect();
    let specials = [
        "<|endoftext|>",
        "<|startoftranscript|>",
        "<|en|>",
        "<|de|>",
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
    ];
    let first_special = vocab.len();
    vocab.extend(specials.iter().map(|s| s.to_string()));
    let vocab_size = vocab.len() + 1501;
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": first_special + i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_vocab: serde_json::Map<String, serde_json::Value> =
        vocab[..first_special].iter().enumerate().map(|(i, t)| (t.clone(), serde_json::json!(i))).collect();
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "vocab": byte_vocab, "merges": [], "dropout": null, "unk_token": null,
            "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false},
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_vec(&tokenizer).unwrap()).unwrap();
    let config = serde_json::json!({
        "suppress_ids": [1, 2],
        "suppress_ids_begin": [first_special],
        "lang_ids": [first_special + 2, first_special + 3],
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&config).unwrap()).unwrap();

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut variables: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut add = |name: &str, shape: &[usize], scale: f32| {
        let n = shape.iter().product();
        let values = (0..n).map(|_| (rng.random::<f32>() - 0.5) * 2.0 * scale).collect();
        variables.push((name.to_string(), shape.to_vec(), values));
    };
    let norm = |add: &mut dyn FnMut(&str, &[usize], f32), name: &str| {
        add(&format!("{name}/gamma"), &[d], 1.0);
        add(&format!("{name}/beta"), &[d], 0.1);
    };
    let linear = |add: &mut dyn FnMut(&str, &[usize], f32), name: &str, out: usize, inp: usize| {
        add(&format!("{name}/weight"), &[out, inp], 0.3);
        add(&format!("{name}/bias"), &[out], 0.1);
    };
    add("encoder/conv1/weight", &[d, mels, 3], 0.1);
    add("encoder/conv1/bias", &[d], 0.1);
    add("encoder/conv2/weight", &[d, d, 3], 0.1);
    add("encoder/conv2/bias", &[d], 0.1);
    add("encoder/position_encodings/encodings", &[audio_positions, d], 1.0);
    for i in 0..layers {
        let p = format!("encoder/layer_{i}");
        norm(&mut add, &format!("{p}/self_attention/layer_norm"));
        linear(&mut add, &format!("{p}/self_attention/linear_0"), 3 * d, d);
        linear(&mut add, &format!("{p}/self_attention/linear_1"), d, d);
        norm(&mut add, &format!("{p}/ffn/layer_norm"));
        linear(&mut add, &format!("{p}/ffn/linear_0"), 4 * d, d);
        linear(&mut add, &format!("{p}/ffn/linear_1"), d, 4 * d);
    }
    norm(&mut add, "encoder/layer_norm");
    add("decoder/embeddings/weight", &[vocab_size, d], 1.0);
    add("decoder/position_encodings/encodings", &[TINY_WHISPER_TEXT_POSITIONS, d], 1.0);
    for i in 0..layers {
        let p = format!("decoder/layer_{i}");
        norm(&mut add, &format!("{p}/self_attention/layer_norm"));
        linear(&mut add, &format!("{p}/self_attention/linear_0"), 3 * d, d);
        linear(&mut add, &format!("{p}/self_attention/linear_1"), d, d);
        norm(&mut add, &format!("{p}/attention/layer_norm"));
        linear(&mut add, &format!("{p}/attention/linear_0"), d, d);
        linear(&mut add, &format!("{p}/attention/linear_1"), 2 * d, d);
        linear(&mut add, &format!("{p}/attention/linear_2"), d, d);
        norm(&mut add, &format!("{p}/ffn/layer_norm"));
        linear(&mut add, &format!("{p}/ffn/linear_0"), 4 * d, d);
        linear(&mut add, &format!("{p}/ffn/linear_1"), d, 4 * d);
    }
    norm(&mut add, "decoder/layer_norm");

    let mut out = Vec::new();
    let string = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(&((s.len() + 1) as u16).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    };
    out.extend_from_slice(&6u32.to_le_bytes());
    string(&mut out, "WhisperSpec");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(variables.len() as u32 + 2).to_le_bytes());
    for (name, shape, values) in &variables {
        string(&mut out, name);
        out.push(shape.len() as u8);
        for dim in shape {
            out.extend_from_slice(&(*dim as u32).to_le_bytes());
        }
        out.push(0); // float32
        out.extend_from_slice(&((values.len() * 4) as u32).to_le_bytes());
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    for stack in ["encoder", "decoder"] {
        string(&mut out, &format!("{stack}/num_heads"));
        out.push(0);
        out.push(2); // int16
        out.extend_from_slice(&2u32.to_le_bytes());
        out.extend_from_slice(&heads.to_le_bytes());
    }
    out.extend_from_slice(&1u32.to_le_bytes());
    string(&mut out, "decoder/projection/weight");
    string(&mut out, "decoder/embeddings/weight");
    std::fs::write(dir.join("model.bin"), out).unwrap();
}
