//! Choosing the next token from a row of logits, in place and without tensors.
//!
//! Each sequence has its own generator seeded from its job, so what it samples
//! never depends on the other sequences sharing its forward passes. Top-p looks
//! at the few hundred most likely tokens first and sorts the whole vocabulary
//! only when they fall short of `p`, which keeps a 150k-token vocabulary cheap.

use natter_shared::proto::SamplingParams;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Candidates ranked before falling back to a full sort for top-p.
const TOP_P_FIRST: usize = 256;

pub struct Sampler {
    rng: StdRng,
    temperature: f32,
    top_k: Option<usize>,
    top_p: Option<f32>,
    repeat_penalty: f32,
    repeat_last_n: usize,
    seen: Vec<u32>,
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Sampler {
        Sampler {
            rng: StdRng::seed_from_u64(params.seed),
            temperature: params.temperature as f32,
            top_k: params.top_k.filter(|&k| k > 0),
            top_p: params.top_p.map(|p| p as f32).filter(|&p| p < 1.0),
            repeat_penalty: params.repeat_penalty,
            repeat_last_n: params.repeat_last_n,
            seen: Vec::new(),
            candidates: Vec::new(),
        }
    }

    /// Brings the sampler to where it was after `sampled` tokens: each token
    /// drawn at a positive temperature takes one number from the generator
    /// (greedy ones take none), so a resumed answer goes on as it would have.
    pub fn skip(&mut self, sampled: usize) {
        if self.temperature > 0.0 {
            for _ in 0..sampled {
                self.rng.random::<f32>();
            }
        }
    }

    /// Picks the next token; `history` is the sequence so far (prompt and answer).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        if self.repeat_penalty != 1.0 {
            self.seen.clear();
            self.seen.extend_from_slice(&history[history.len().saturating_sub(self.repeat_last_n)..]);
            self.seen.sort_unstable();
            self.seen.dedup();
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l >= 0.0 { *l / self.repeat_penalty } else { *l * self.repeat_penalty };
                }
            }
        }
        if self.temperature <= 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
        let inv_t = 1.0 / self.temperature;
        for l in logits.iter_mut() {
            *l = (*l - max) * inv_t;
        }
        super::native::exp_in_place(logits);
        let total: f32 = logits.iter().sum();

        let c = &mut self.candidates;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, p)| (i as u32, p / total)));
        let by_prob = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if let Some(k) = self.top_k {
            if k < c.len() {
                c.select_nth_unstable_by(k - 1, by_prob);
                c.truncate(k);
            }
        }
        if let Some(p) = self.top_p {
            let first = TOP_P_FIRST.min(c.len());
            if first < c.len() {
                c.select_nth_unstable_by(first - 1, by_prob);
            }
            c[..first].sort_unstable_by(by_prob);
            if c[..first].iter().map(|x| x.1).sum::<f32>() < p {
                c.sort_unstable_by(by_prob);
            }
            let mut mass = 0.0;
            let mut keep = c.len();
            for (i, (_, prob)) in c.iter().enumerate() {
                mass += prob;
                if mass >= p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep.max(1));
        }
        let mass: f32 = c.iter().map(|x| x.1).sum();
        let mut u = self.rng.random::<f32>() * mass;
        for &(id, prob) in c.iter() {
            if u < prob {
                return id;
            }
            u -= prob;
        }
        c.last().map(|x| x.0).unwrap_or(0)
    }
}

/// The index of the largest logit; the first one on ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64, top_k: Option<usize>, top_p: Option<f64>, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, repeat_penalty: 1.0, seed, ..Default::default() }
    }

    fn logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<f32>() * 8.0).collect()
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut l = vec![0.0, 3.0, 1.0, 3.0];
        assert_eq!(Sampler::new(&params(0.0, None, None, 0)).sample(&mut l, &[]), 1);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus_and_top_k_only_the_best_k() {
        let base = logits(5000, 3);
        let mut ranked: Vec<(usize, f32)> = base.iter().copied().enumerate().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        // With a low p only the very best few tokens can come out.
        let exp: Vec<f32> = base.iter().map(|l| (l - ranked[0].1).exp()).collect();
        let total: f32 = exp.iter().sum();
        let mut mass = 0.0;
        let nucleus: Vec<usize> = ranked
            .iter()
            .take_while(|(i, _)| {
                let before = mass;
                mass += exp[*i] / total;
                before < 0.05
            })
            .map(|(i, _)| *i)
            .collect();
        let mut top_p = Sampler::new(&params(1.0, None, Some(0.05), 9));
        let mut top_k = Sampler::new(&params(1.0, Some(3), None, 9));
        for _ in 0..300 {
            let t = top_p.sample(&mut base.clone(), &[]) as usize;
            assert!(nucleus.contains(&t), "{t} is outside the nucleus {nucleus:?}");
            let t = top_k.sample(&mut base.clone(), &[]) as usize;
            assert!(ranked[..3].iter().any(|(i, _)| *i == t));
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens() {
        let draw = |seed| {
            let mut s = Sampler::new(&params(1.0, None, Some(0.95), seed));
            (0..50).map(|i| s.sample(&mut logits(1000, i), &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn the_repeat_penalty_lowers_recent_tokens() {
        let mut s = Sampler::new(&SamplingParams { repeat_penalty: 2.0, ..params(0.0, None, None, 0) });
        let mut l = vec![1.0, 1.5, 0.2];
        assert_eq!(s.sample(&mut l, &[1]), 0);
    }
}
