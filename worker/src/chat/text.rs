//! Turning sampled tokens into text deltas: UTF-8-safe incremental detokenizing
//! and stop-string matching.

use super::tokenizer::GgufTokenizer;

/// Emits text only once it is complete UTF-8: a multi-byte character split over
/// several byte tokens appears when its last byte arrives, never as U+FFFD.
pub struct Detokenizer {
    tokens: Vec<u32>,
    /// Start of the window decoded for context (keeps the tokenizer's spacing).
    prefix_start: usize,
    /// Tokens before this are already emitted.
    emitted_upto: usize,
}

impl Detokenizer {
    pub fn new() -> Self {
        Detokenizer { tokens: Vec::new(), prefix_start: 0, emitted_upto: 0 }
    }

    pub fn push(&mut self, tokenizer: &GgufTokenizer, token: u32) -> Result<String, String> {
        self.tokens.push(token);
        let prefix = tokenizer.decode(&self.tokens[self.prefix_start..self.emitted_upto])?;
        let full = tokenizer.decode(&self.tokens[self.prefix_start..])?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') || !full.is_char_boundary(prefix.len()) {
            return Ok(String::new());
        }
        let delta = full[prefix.len()..].to_string();
        self.prefix_start = self.emitted_upto;
        self.emitted_upto = self.tokens.len();
        Ok(delta)
    }
}

/// Holds back text that might be the start of a stop string, and cuts the output
/// where one appears.
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

pub enum StopScan {
    /// Safe to emit; generation goes on.
    Continue(String),
    /// A stop string was found: emit this and stop.
    Stop(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher { stops, pending: String::new() }
    }

    pub fn push(&mut self, delta: &str) -> StopScan {
        self.pending.push_str(delta);
        let first_stop = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min();
        if let Some(at) = first_stop {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return StopScan::Stop(out);
        }
        let hold = self.stops.iter().map(|s| longest_suffix_prefix(&self.pending, s)).max().unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopScan::Continue(out)
    }

    /// Whatever was held back, once generation ended for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`,
/// counted on a char boundary.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && stop.as_bytes().starts_with(&text.as_bytes()[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for d in deltas {
            match m.push(d) {
                StopScan::Continue(s) => out.push_str(&s),
                StopScan::Stop(s) => {
                    out.push_str(&s);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_string_split_across_deltas_is_cut() {
        assert_eq!(run(&["END"], &["hello E", "N", "D more"]), ("hello ".into(), true));
    }

    #[test]
    fn held_back_text_is_released_when_it_is_not_a_stop() {
        assert_eq!(run(&["END"], &["hello E", "x"]), ("hello Ex".into(), false));
        assert_eq!(run(&["END"], &["tail E"]), ("tail E".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins_and_unicode_is_safe() {
        assert_eq!(run(&["ß!", "\n\n"], &["añ", "o\n", "\nß!"]), ("año".into(), true));
    }
}
