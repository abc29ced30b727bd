//! The tokenizer, rebuilt from the GGUF's own metadata (no tokenizer.json ships
//! with GGUF files).

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::Tokenizer;

/// Token strings that end a turn in the chat templates natter supports.
const END_OF_TURN: [&str; 6] = ["<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "</s>"];

pub struct GgufTokenizer {
    pub inner: Tokenizer,
    /// Tokens that end generation: EOS plus any end-of-turn marker in the vocab.
    pub stop_ids: Vec<u32>,
    pub bos: Option<(u32, String)>,
    pub add_bos: bool,
}

impl GgufTokenizer {
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self, String> {
        let mut inner =
            Tokenizer::from_gguf(content).map_err(|e| format!("cannot build the tokenizer from GGUF metadata: {e}"))?;
        let pre = content.metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned();
        if pre.as_deref() == Some("smollm") {
            // SmolLM's tokenizer.json: digits split one by one, then byte-level
            // without a prefix space; candle's generic GPT-2 pipeline would add one.
            let pre = Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]);
            inner.with_pre_tokenizer(Some(pre));
        }
        let id_of = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok());
        let mut stop_ids: Vec<u32> = id_of("tokenizer.ggml.eos_token_id").into_iter().collect();
        stop_ids.extend(id_of("tokenizer.ggml.eot_token_id"));
        for marker in END_OF_TURN {
            if let Some(id) = inner.token_to_id(marker) {
                stop_ids.push(id);
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let bos = id_of("tokenizer.ggml.bos_token_id").and_then(|id| inner.id_to_token(id).map(|t| (id, t)));
        let add_bos =
            content.metadata.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
        Ok(GgufTokenizer { inner, stop_ids, bos, add_bos })
    }

    /// Encodes a rendered prompt; special-token strings in it become their ids.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, String> {
        let encoding = self.inner.encode(text, false).map_err(|e| format!("cannot tokenize the prompt: {e}"))?;
        let mut ids = encoding.get_ids().to_vec();
        if let Some((bos_id, bos_text)) = &self.bos {
            if self.add_bos && !text.starts_with(bos_text.as_str()) {
                ids.insert(0, *bos_id);
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.inner.decode(ids, true).map_err(|e| format!("cannot decode tokens: {e}"))
    }

    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}
