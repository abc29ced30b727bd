//! The NER engine: a BERT token classifier on candle (any Hugging Face
//! `BertForTokenClassification` checkpoint), texts of any length in overlapping
//! windows, word pieces merged into entities with exact character offsets.

pub mod aggregate;
pub mod onnx;

use crate::engine::{Completed, Engine, EngineError, JobContext};
use aggregate::{TokenPrediction, WordSpan};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use candle_transformers::models::bert::{BertModel, Config};
use natter_shared::proto::{Entity, ErrorCode, Job, JobInput, JobResult, Metrics};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;
use tokenizers::Tokenizer;

/// Longest text a job may carry, in characters.
pub const MAX_TEXT_CHARS: usize = 100_000;

pub struct NerEngine {
    bert: BertModel,
    classifier: Linear,
    tokenizer: Tokenizer,
    labels: Vec<String>,
    cls: u32,
    sep: u32,
    /// Tokens per window, [CLS] and [SEP] included.
    window: usize,
    device: Device,
}

#[derive(serde::Deserialize)]
struct LabelConfig {
    id2label: HashMap<String, String>,
}

impl NerEngine {
    /// Loads a checkpoint directory: config.json (with id2label), tokenizer.json
    /// or vocab.txt, and model.safetensors or pytorch_model.bin.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).map_err(|e| format!("{}: {e}", dir.join(name).display()))
        };
        let config_text = read("config.json")?;
        let config: Config = serde_json::from_str(&config_text).map_err(|e| format!("config.json: {e}"))?;
        let labels: LabelConfig =
            serde_json::from_str(&config_text).map_err(|e| format!("config.json id2label: {e}"))?;
        let mut labels_by_id: Vec<(usize, String)> = labels
            .id2label
            .into_iter()
            .map(|(k, v)| {
                k.parse::<usize>().map(|k| (k, v)).map_err(|_| format!("config.json: label id `{k}` is not a number"))
            })
            .collect::<Result<_, _>>()?;
        labels_by_id.sort();
        let labels: Vec<String> = labels_by_id.into_iter().map(|(_, v)| v).collect();

        let tokenizer = if dir.join("tokenizer.json").is_file() {
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| format!("tokenizer.json: {e}"))?
        } else {
            wordpiece_from_vocab(&dir.join("vocab.txt"), &config_text)?
        };
        let special = |t: &str| tokenizer.token_to_id(t).ok_or_else(|| format!("the vocabulary has no {t} token"));
        let (cls, sep) = (special("[CLS]")?, special("[SEP]")?);

        let device = Device::Cpu;
        let vb = if dir.join("model.safetensors").is_file() {
            unsafe { VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &device) }
                .map_err(|e| format!("model.safetensors: {e}"))?
        } else {
            VarBuilder::from_pth(dir.join("pytorch_model.bin"), DType::F32, &device)
                .map_err(|e| format!("pytorch_model.bin: {e}"))?
        };
        let bert = BertModel::load(vb.clone(), &config).map_err(|e| format!("cannot load BERT weights: {e}"))?;
        let classifier = candle_nn::linear(config.hidden_size, labels.len(), vb.pp("classifier"))
            .map_err(|e| format!("cannot load the classifier head: {e}"))?;
        let window = config.max_position_embeddings.min(512);
        Ok(NerEngine { bert, classifier, tokenizer, labels, cls, sep, window, device })
    }

    /// Tokens of `text` (no special tokens), as windows count them.
    pub fn token_count(&self, text: &str) -> usize {
        self.tokenizer.encode(text, false).map(|e| e.len()).unwrap_or(0)
    }

    /// Raw logits `[tokens, labels]` for one window of ids ([CLS]/[SEP] included).
    pub fn logits(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let types = input.zeros_like()?;
        let mask = input.ones_like()?;
        let hidden = self.bert.forward(&input, &types, Some(&mask))?;
        self.classifier.forward(&hidden)?.squeeze(0)
    }

    /// Entities in `text`, with character offsets.
    pub fn entities(&self, text: &str) -> Result<(Vec<Entity>, usize), EngineError> {
        let internal = |e: String| {
            tracing::error!("ner: {e}");
            EngineError::Failed { code: ErrorCode::Internal, message: "the model failed while running this job".into() }
        };
        let encoding =
            self.tokenizer.encode(text, false).map_err(|e| EngineError::bad_input(format!("cannot tokenize: {e}")))?;
        let ids = encoding.get_ids();
        let offsets = encoding.get_offsets();
        let words = encoding.get_word_ids();
        let n = ids.len();
        let body = self.window - 2;
        let mut predictions: Vec<Option<TokenPrediction>> = vec![None; n];
        // Overlapping windows; each token takes its prediction from the window in
        // which it sits farthest from an edge, so context is never cut short and no
        // token is counted twice.
        for (start, end) in aggregate::windows(n, body, body / 4) {
            let mut window_ids = Vec::with_capacity(end - start + 2);
            window_ids.push(self.cls);
            window_ids.extend_from_slice(&ids[start..end]);
            window_ids.push(self.sep);
            let logits = self.logits(&window_ids).map_err(|e| internal(e.to_string()))?;
            let probs = candle_nn::ops::softmax(&logits, D::Minus1)
                .and_then(|p| p.to_vec2::<f32>())
                .map_err(|e| internal(e.to_string()))?;
            for i in start..end {
                let margin = (i - start).min(end - 1 - i);
                let row = &probs[i - start + 1];
                let (label, score) =
                    row.iter().enumerate().fold((0, f32::MIN), |best, (j, &p)| if p > best.1 { (j, p) } else { best });
                if predictions[i].as_ref().is_none_or(|p| margin > p.margin) {
                    predictions[i] = Some(TokenPrediction { label, score, margin });
                }
            }
        }
        let spans: Vec<WordSpan> = (0..n)
            .filter_map(|i| {
                let p = predictions[i].clone()?;
                Some(WordSpan {
                    word: words[i],
                    start: offsets[i].0,
                    end: offsets[i].1,
                    label: p.label,
                    score: p.score,
                })
            })
            .collect();
        Ok((aggregate::entities(text, &spans, &self.labels), n))
    }
}

/// A BERT WordPiece tokenizer from vocab.txt, lower-casing as config.json says.
fn wordpiece_from_vocab(vocab: &Path, config_text: &str) -> Result<Tokenizer, String> {
    use tokenizers::models::wordpiece::WordPiece;
    use tokenizers::normalizers::BertNormalizer;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    let lowercase = serde_json::from_str::<serde_json::Value>(config_text)
        .ok()
        .and_then(|v| v.get("do_lower_case").and_then(|b| b.as_bool()))
        .unwrap_or(true);
    let model = WordPiece::from_file(&vocab.to_string_lossy())
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| format!("{}: {e}", vocab.display()))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(BertNormalizer::new(true, true, Some(lowercase), lowercase)))
        .map_err(|e| format!("tokenizer: {e}"))?;
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    Ok(tokenizer)
}

impl Engine for NerEngine {
    fn run(&mut self, job: &Job, ctx: &JobContext) -> Result<Completed, EngineError> {
        let JobInput::Ner(input) = &job.input else {
            return Err(EngineError::bad_input(format!("an NER worker cannot run {} jobs", job.kind())));
        };
        if input.text.trim().is_empty() {
            return Err(EngineError::bad_input("the text is empty"));
        }
        let chars = input.text.chars().count();
        if chars > MAX_TEXT_CHARS {
            return Err(EngineError::Failed {
                code: ErrorCode::TooLarge,
                message: format!("the text is {chars} characters; the limit is {MAX_TEXT_CHARS}"),
            });
        }
        ctx.check_cancelled()?;
        let started = Instant::now();
        let (entities, tokens) = self.entities(&input.text)?;
        let secs = started.elapsed().as_secs_f64();
        let metrics = Metrics {
            prompt_tokens: tokens as u32,
            completion_tokens: 0,
            time_to_first_token_ms: None,
            prompt_tokens_per_s: (secs > 0.0).then(|| tokens as f64 / secs),
            decode_tokens_per_s: None,
            audio_seconds: None,
            wall_ms: secs * 1e3,
        };
        Ok(Completed { result: JobResult::Ner { entities }, metrics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{write_tiny_bert, TINY_BERT_POSITIONS};

    fn engine(forced_label: usize) -> (tempfile::TempDir, NerEngine) {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_bert(dir.path(), forced_label);
        let engine = NerEngine::load(dir.path()).unwrap();
        (dir, engine)
    }

    /// A text several windows long, with multi-piece and non-ASCII words.
    fn long_text() -> String {
        (0..12).map(|i| format!("Anna lives in Paris{i} ünd the cat sat")).collect::<Vec<_>>().join(". ")
    }

    #[test]
    fn every_chunk_is_one_entity_across_window_edges() {
        let (_dir, ner) = engine(1); // every piece B-PER: every word its own entity
        let text = long_text();
        let (entities, tokens) = ner.entities(&text).unwrap();
        assert!(tokens > 3 * TINY_BERT_POSITIONS, "the text spans several windows ({tokens} tokens)");
        // BERT splits "sat." into two words; both B-PER and glued together, they
        // make one entity, so entities are the whitespace-separated chunks.
        let words: Vec<&str> = text.split_whitespace().collect();
        let found: Vec<&str> = entities.iter().map(|e| e.text.as_str()).collect();
        assert_eq!(found, words, "no word lost or duplicated at a window edge");
        let chars: Vec<char> = text.chars().collect();
        for e in &entities {
            assert_eq!(e.label, "PER");
            assert_eq!(chars[e.start..e.end].iter().collect::<String>(), e.text, "character offsets");
            assert!(e.score > 0.99);
        }
    }

    #[test]
    fn inside_labels_merge_the_whole_text_into_one_entity() {
        let (_dir, ner) = engine(2); // every piece I-PER
        let text = long_text();
        let (entities, _) = ner.entities(&text).unwrap();
        assert_eq!(entities.len(), 1);
        assert_eq!(entities[0].text, text);
        assert_eq!((entities[0].start, entities[0].end), (0, text.chars().count()));
    }

    #[test]
    fn empty_and_oversize_texts_fail_clearly() {
        let (_dir, mut ner) = engine(0);
        let job = |text: String| {
            Job::new(
                "tiny",
                natter_shared::proto::Origin { frontend: "t".into(), user: "u".into(), conversation: None },
                JobInput::Ner(natter_shared::proto::NerInput { text }),
            )
        };
        let (tx, _rx) = tokio::sync::mpsc::channel(4);
        let ctx = JobContext::new(tx, Default::default());
        match ner.run(&job("  ".into()), &ctx) {
            Err(EngineError::Failed { code: ErrorCode::BadInput, .. }) => {}
            other => panic!("{other:?}"),
        }
        match ner.run(&job("a ".repeat(MAX_TEXT_CHARS)), &ctx) {
            Err(EngineError::Failed { code: ErrorCode::TooLarge, message }) => assert!(message.contains("limit")),
            other => panic!("{other:?}"),
        }
        let done = ner.run(&job("the cat".into()), &ctx).unwrap();
        assert!(matches!(done.result, JobResult::Ner { ref entities } if entities.is_empty()));
    }
}
