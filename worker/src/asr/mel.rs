//! Whisper's log-mel spectrogram: 25 ms Hann windows every 10 ms, a Slaney-scale
//! mel filter bank computed here (librosa's formula, so no filter file ships with
//! the model), log10, clamped to 8 decades below the peak and scaled.

use rustfft::num_complex::Complex32;
use rustfft::FftPlanner;

pub const SAMPLE_RATE: usize = 16_000;
pub const N_FFT: usize = 400;
pub const HOP: usize = 160;
/// Mel frames in one 30-second window.
pub const WINDOW_FRAMES: usize = 3000;
pub const WINDOW_SAMPLES: usize = WINDOW_FRAMES * HOP;

fn hz_to_mel(hz: f64) -> f64 {
    let (f_sp, min_log_hz, min_log_mel, log_step) = (200.0 / 3.0, 1000.0, 15.0, (6.4f64).ln() / 27.0);
    if hz >= min_log_hz {
        min_log_mel + (hz / min_log_hz).ln() / log_step
    } else {
        hz / f_sp
    }
}

fn mel_to_hz(mel: f64) -> f64 {
    let (f_sp, min_log_hz, min_log_mel, log_step) = (200.0 / 3.0, 1000.0, 15.0, (6.4f64).ln() / 27.0);
    if mel >= min_log_mel {
        min_log_hz * ((mel - min_log_mel) * log_step).exp()
    } else {
        mel * f_sp
    }
}

/// Triangular filters with Slaney area normalisation, `[n_mels][N_FFT/2 + 1]`.
pub fn filter_bank(n_mels: usize) -> Vec<Vec<f32>> {
    let bins = N_FFT / 2 + 1;
    let fft_freqs: Vec<f64> = (0..bins).map(|i| i as f64 * SAMPLE_RATE as f64 / N_FFT as f64).collect();
    let (lo, hi) = (hz_to_mel(0.0), hz_to_mel(SAMPLE_RATE as f64 / 2.0));
    let mel_freqs: Vec<f64> =
        (0..n_mels + 2).map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (n_mels + 1) as f64)).collect();
    (0..n_mels)
        .map(|m| {
            let (left, center, right) = (mel_freqs[m], mel_freqs[m + 1], mel_freqs[m + 2]);
            let norm = 2.0 / (right - left);
            fft_freqs
                .iter()
                .map(|&f| {
                    let rising = (f - left) / (center - left);
                    let falling = (right - f) / (right - center);
                    (rising.min(falling).max(0.0) * norm) as f32
                })
                .collect()
        })
        .collect()
}

/// Computes log-mel frames of whole recordings; reuses its FFT plan and filters.
pub struct MelSpectrogram {
    n_mels: usize,
    filters: Vec<Vec<f32>>,
    window: Vec<f32>,
    fft: std::sync::Arc<dyn rustfft::Fft<f32>>,
}

impl MelSpectrogram {
    pub fn new(n_mels: usize) -> Self {
        let window = (0..N_FFT)
            .map(|i| (0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / N_FFT as f64).cos()) as f32)
            .collect();
        let fft = FftPlanner::new().plan_fft_forward(N_FFT);
        MelSpectrogram { n_mels, filters: filter_bank(n_mels), window, fft }
    }

    /// `[n_mels][frames]` (row-major), one frame per 10 ms of `samples`, followed
    /// by a window of silence so the last window always has its full length.
    /// Normalised over the whole recording, as Whisper was trained.
    pub fn compute(&self, samples: &[f32]) -> (Vec<f32>, usize) {
        let mut padded = samples.to_vec();
        padded.resize(samples.len() + WINDOW_SAMPLES, 0.0);
        let frames = padded.len() / HOP;
        // Centred frames: reflect-pad half a window at both ends.
        let half = N_FFT / 2;
        let at = |i: isize| -> f32 {
            let n = padded.len() as isize;
            let j = if i < 0 {
                -i
            } else if i >= n {
                2 * (n - 1) - i
            } else {
                i
            };
            padded[j.clamp(0, n - 1) as usize]
        };
        let bins = N_FFT / 2 + 1;
        let mut mel = vec![0f32; self.n_mels * frames];
        let mut buf = vec![Complex32::new(0.0, 0.0); N_FFT];
        let mut scratch = vec![Complex32::new(0.0, 0.0); self.fft.get_inplace_scratch_len()];
        let mut power = vec![0f32; bins];
        for frame in 0..frames {
            let start = (frame * HOP) as isize - half as isize;
            for (k, slot) in buf.iter_mut().enumerate() {
                *slot = Complex32::new(at(start + k as isize) * self.window[k], 0.0);
            }
            self.fft.process_with_scratch(&mut buf, &mut scratch);
            for (p, c) in power.iter_mut().zip(&buf[..bins]) {
                *p = c.norm_sqr();
            }
            for (m, filter) in self.filters.iter().enumerate() {
                let energy: f32 = filter.iter().zip(&power).map(|(w, p)| w * p).sum();
                mel[m * frames + frame] = energy.max(1e-10).log10();
            }
        }
        let peak = mel.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for v in mel.iter_mut() {
            *v = (v.max(peak - 8.0) + 4.0) / 4.0;
        }
        (mel, frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_librosa_slaney() {
        let bank = filter_bank(80);
        assert_eq!(bank.len(), 80);
        assert_eq!(bank[0].len(), 201);
        // librosa.filters.mel(sr=16000, n_fft=400, n_mels=80): first filter peaks at
        // bin 1 with weight 0.02486259, and bin 0 is zero.
        assert!((bank[0][1] - 0.024_862_59).abs() < 1e-6, "{}", bank[0][1]);
        assert_eq!(bank[0][0], 0.0);
        // Every filter has some response, and the top one reaches near Nyquist.
        assert!(bank.iter().all(|f| f.iter().any(|&w| w > 0.0)));
        assert!(bank[79][199] > 0.0);
    }

    #[test]
    fn a_tone_lights_up_the_matching_mel_band() {
        let samples: Vec<f32> =
            (0..SAMPLE_RATE).map(|i| (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 16000.0).sin()).collect();
        let mel = MelSpectrogram::new(80);
        let (frames, n) = mel.compute(&samples);
        assert_eq!(n, 100 + WINDOW_FRAMES);
        let mid = 50;
        let loudest = (0..80).max_by(|&a, &b| frames[a * n + mid].total_cmp(&frames[b * n + mid])).unwrap();
        let band_center =
            mel_to_hz(hz_to_mel(0.0) + (hz_to_mel(8000.0) - hz_to_mel(0.0)) * (loudest + 1) as f64 / 81.0);
        assert!((band_center - 1000.0).abs() < 60.0, "loudest band centred at {band_center} Hz");
    }
}
