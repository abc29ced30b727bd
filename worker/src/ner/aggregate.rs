//! From per-token labels to entities: windows over long inputs, and the "first"
//! aggregation (a word takes its first piece's label; B-/I- words merge).

use natter_shared::proto::Entity;

#[derive(Clone, Debug)]
pub struct TokenPrediction {
    pub label: usize,
    pub score: f32,
    /// Distance to the nearer edge of the window the prediction came from.
    pub margin: usize,
}

/// One token's prediction with its byte span in the text.
#[derive(Clone, Debug)]
pub struct WordSpan {
    pub word: Option<u32>,
    pub start: usize,
    pub end: usize,
    pub label: usize,
    pub score: f32,
}

/// `(start, end)` token ranges of at most `size` tokens, consecutive ones
/// overlapping by `overlap`, covering `0..n`.
pub fn windows(n: usize, size: usize, overlap: usize) -> Vec<(usize, usize)> {
    let size = size.max(1);
    let step = size.saturating_sub(overlap).max(1);
    let mut out = Vec::new();
    let mut start = 0;
    loop {
        let end = (start + size).min(n);
        out.push((start, end));
        if end >= n {
            return out;
        }
        start += step;
    }
}

fn split_label(label: &str) -> (Option<char>, &str) {
    match label.split_once('-') {
        Some((p, kind)) if p == "B" || p == "I" => (p.chars().next(), kind),
        _ => (None, label),
    }
}

/// Merges token predictions into entities. Offsets in `spans` are bytes; the
/// entities carry character offsets and the exact substring.
pub fn entities(text: &str, spans: &[WordSpan], labels: &[String]) -> Vec<Entity> {
    // Words: the first token's label and score, the union of the tokens' spans.
    struct Word {
        start: usize,
        end: usize,
        label: usize,
        score: f32,
    }
    let mut words: Vec<Word> = Vec::new();
    let mut last_word = None;
    for s in spans {
        if s.word.is_some() && s.word == last_word {
            if let Some(w) = words.last_mut() {
                w.end = w.end.max(s.end);
                continue;
            }
        }
        last_word = s.word;
        words.push(Word { start: s.start, end: s.end, label: s.label, score: s.score });
    }

    struct Open {
        kind: String,
        start: usize,
        end: usize,
        scores: Vec<f32>,
    }
    let mut out = Vec::new();
    let mut open: Option<Open> = None;
    let close = |o: Open, out: &mut Vec<Entity>| {
        let start = text[..o.start].chars().count();
        let substring = &text[o.start..o.end];
        out.push(Entity {
            label: o.kind,
            score: o.scores.iter().sum::<f32>() / o.scores.len() as f32,
            start,
            end: start + substring.chars().count(),
            text: substring.to_string(),
        });
    };
    for w in words {
        let (prefix, kind) = split_label(labels.get(w.label).map(String::as_str).unwrap_or("O"));
        if kind == "O" {
            if let Some(o) = open.take() {
                close(o, &mut out);
            }
            continue;
        }
        // I- continues an entity of its type; so does a B- word glued to it with
        // no space between, as BERT splits "a.b@c.org" into several words.
        let continues = open.as_ref().is_some_and(|o| o.kind == kind && (prefix == Some('I') || o.end == w.start));
        if continues {
            let o = open.as_mut().unwrap();
            o.end = w.end;
            o.scores.push(w.score);
        } else {
            if let Some(o) = open.take() {
                close(o, &mut out);
            }
            open = Some(Open { kind: kind.to_string(), start: w.start, end: w.end, scores: vec![w.score] });
        }
    }
    if let Some(o) = open.take() {
        close(o, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<String> {
        ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"].iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn windows_cover_everything_with_overlap() {
        assert_eq!(windows(5, 10, 2), [(0, 5)]);
        assert_eq!(windows(20, 10, 2), [(0, 10), (8, 18), (16, 20)]);
        assert_eq!(windows(0, 10, 2), [(0, 0)]);
    }

    #[test]
    fn pieces_merge_into_words_and_b_i_into_entities_with_char_offsets() {
        // "Zoë Ångström lives in São Paulo": pieces of one word share a word id.
        let text = "Zoë Ångström lives in São Paulo";
        let b = |s: &str| text.find(s).unwrap();
        let spans = vec![
            WordSpan { word: Some(0), start: b("Zoë"), end: b("Zoë") + "Zo".len(), label: 1, score: 0.9 },
            WordSpan { word: Some(0), start: b("ë"), end: b("ë") + "ë".len(), label: 0, score: 0.5 },
            WordSpan {
                word: Some(1),
                start: b("Ångström"),
                end: b("Ångström") + "Ångström".len(),
                label: 2,
                score: 0.7,
            },
            WordSpan { word: Some(2), start: b("lives"), end: b("lives") + 5, label: 0, score: 0.99 },
            WordSpan { word: Some(3), start: b("in"), end: b("in") + 2, label: 0, score: 0.99 },
            WordSpan { word: Some(4), start: b("São"), end: b("São") + "São".len(), label: 3, score: 0.8 },
            WordSpan { word: Some(5), start: b("Paulo"), end: b("Paulo") + 5, label: 4, score: 0.6 },
        ];
        let e = entities(text, &spans, &labels());
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].label.as_str(), e[0].text.as_str(), e[0].start, e[0].end), ("PER", "Zoë Ångström", 0, 12));
        assert!((e[0].score - 0.8).abs() < 1e-6);
        assert_eq!((e[1].label.as_str(), e[1].text.as_str(), e[1].start, e[1].end), ("LOC", "São Paulo", 22, 31));
        let chars: Vec<char> = text.chars().collect();
        assert_eq!(chars[e[1].start..e[1].end].iter().collect::<String>(), "São Paulo");
    }

    #[test]
    fn b_words_glued_together_are_one_entity() {
        let text = "x a.b@c.org y";
        let spans = vec![
            WordSpan { word: Some(0), start: 2, end: 3, label: 1, score: 1.0 },
            WordSpan { word: Some(1), start: 3, end: 4, label: 1, score: 1.0 },
            WordSpan { word: Some(2), start: 4, end: 11, label: 1, score: 1.0 },
            WordSpan { word: Some(3), start: 12, end: 13, label: 1, score: 1.0 },
        ];
        let e = entities(text, &spans, &labels());
        assert_eq!(e.iter().map(|e| e.text.as_str()).collect::<Vec<_>>(), ["a.b@c.org", "y"]);
    }

    #[test]
    fn an_i_after_another_type_starts_a_new_entity() {
        let text = "a b";
        let spans = vec![
            WordSpan { word: Some(0), start: 0, end: 1, label: 1, score: 1.0 },
            WordSpan { word: Some(1), start: 2, end: 3, label: 4, score: 1.0 },
        ];
        let e = entities(text, &spans, &labels());
        assert_eq!(e.iter().map(|e| e.label.as_str()).collect::<Vec<_>>(), ["PER", "LOC"]);
    }
}
