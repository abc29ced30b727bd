//! Turns the audio files people send into 16 kHz mono samples.
//!
//! Containers and most codecs come from symphonia (WAV, MP3, FLAC, AAC/M4A,
//! Vorbis, Ogg, Matroska/WebM, MP4). Opus, which Telegram and Discord voice
//! notes and browser recordings use, is decoded by libopus. Every rate is brought
//! to 16 kHz with a windowed-sinc polyphase resampler.

use std::io::Cursor;
use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{CodecParameters, DecoderOptions, CODEC_TYPE_NULL, CODEC_TYPE_OPUS};
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::{FormatOptions, Packet};
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

pub const TARGET_RATE: u32 = 16_000;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AudioError {
    #[error("the file is empty")]
    Empty,
    #[error("not a supported audio file (WAV, MP3, FLAC, OGG/Opus, WebM, M4A/AAC): {0}")]
    NotAudio(String),
    #[error("the audio is damaged: {0}")]
    Corrupt(String),
    #[error("the file contains no sound")]
    NoSamples,
    #[error("the audio is longer than the limit of {limit_s:.0} s")]
    TooLong { limit_s: f64 },
}

/// Decoded, mixed-down, resampled audio.
pub struct Audio {
    pub samples: Vec<f32>,
    /// What the file was, for logs (`opus 48000 Hz 2 ch`).
    pub source: String,
}

impl Audio {
    pub fn seconds(&self) -> f64 {
        self.samples.len() as f64 / TARGET_RATE as f64
    }
}

/// Decodes `bytes` (its MIME type, when known, helps pick the container) into
/// 16 kHz mono, refusing audio longer than `max_seconds`.
pub fn decode(bytes: &[u8], content_type: Option<&str>, max_seconds: f64) -> Result<Audio, AudioError> {
    if bytes.is_empty() {
        return Err(AudioError::Empty);
    }
    let stream = MediaSourceStream::new(Box::new(Cursor::new(bytes.to_vec())), Default::default());
    let mut hint = Hint::new();
    if let Some(mime) = content_type.filter(|m| !m.is_empty() && *m != "application/octet-stream") {
        hint.mime_type(mime);
    }
    let probed = symphonia::default::get_probe()
        .format(&hint, stream, &FormatOptions::default(), &MetadataOptions::default())
        .map_err(|e| AudioError::NotAudio(e.to_string()))?;
    let mut format = probed.format;
    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or_else(|| AudioError::NotAudio("the file has no audio track".into()))?;
    let track_id = track.id;
    let params = track.codec_params.clone();
    let mut decoder = PacketDecoder::new(&params)?;
    let rate = decoder.rate;
    let max_source_samples = (max_seconds * rate as f64) as usize;

    let mut mono = Vec::new();
    let (mut good, mut bad) = (0usize, 0usize);
    loop {
        let packet = match format.next_packet() {
            Ok(packet) => packet,
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(SymphoniaError::ResetRequired) => break,
            // A damaged tail after good audio still yields what came before it.
            Err(e) if good > 0 => {
                tracing::debug!("stopping at a damaged packet: {e}");
                break;
            }
            Err(e) => return Err(AudioError::Corrupt(e.to_string())),
        };
        if packet.track_id() != track_id {
            continue;
        }
        match decoder.decode(&packet, &mut mono) {
            Ok(()) => good += 1,
            Err(e) => {
                bad += 1;
                tracing::debug!("skipping an undecodable packet: {e}");
            }
        }
        if mono.len() > max_source_samples {
            return Err(AudioError::TooLong { limit_s: max_seconds });
        }
    }
    if good == 0 {
        return Err(if bad > 0 {
            AudioError::Corrupt("no packet could be decoded".into())
        } else {
            AudioError::NoSamples
        });
    }
    // Opus streams start with encoder delay ("pre-skip") that is not audio.
    let skip = (decoder.skip as usize).min(mono.len());
    mono.drain(..skip);
    if mono.is_empty() {
        return Err(AudioError::NoSamples);
    }
    let source = format!("{} {} Hz {} ch", decoder.name, rate, decoder.channels);
    Ok(Audio { samples: resample(&mono, rate, TARGET_RATE), source })
}

/// One track's codec: symphonia's, or libopus for Opus.
struct PacketDecoder {
    inner: Inner,
    rate: u32,
    channels: usize,
    skip: u32,
    name: &'static str,
}

enum Inner {
    Symphonia(Box<dyn symphonia::core::codecs::Decoder>, Option<SampleBuffer<f32>>),
    Opus(opus::Decoder, Vec<f32>),
}

impl PacketDecoder {
    fn new(params: &CodecParameters) -> Result<Self, AudioError> {
        if params.codec == CODEC_TYPE_OPUS {
            // OpusHead: channel count at byte 9, pre-skip (48 kHz samples) at 10..12.
            let head = params.extra_data.as_deref().filter(|h| h.len() >= 12 && h.starts_with(b"OpusHead"));
            let channels = head.map(|h| h[9] as usize).or(params.channels.map(|c| c.count())).unwrap_or(1);
            let skip = params.delay.or(head.map(|h| u16::from_le_bytes([h[10], h[11]]) as u32)).unwrap_or(0);
            let layout = match channels {
                1 => opus::Channels::Mono,
                2 => opus::Channels::Stereo,
                n => return Err(AudioError::NotAudio(format!("Opus with {n} channels"))),
            };
            let decoder = opus::Decoder::new(48_000, layout).map_err(|e| AudioError::Corrupt(e.to_string()))?;
            // The longest Opus packet is 120 ms.
            let buf = vec![0f32; 5760 * channels];
            return Ok(PacketDecoder { inner: Inner::Opus(decoder, buf), rate: 48_000, channels, skip, name: "opus" });
        }
        let rate = params.sample_rate.ok_or_else(|| AudioError::NotAudio("the track has no sample rate".into()))?;
        let decoder = symphonia::default::get_codecs()
            .make(params, &DecoderOptions::default())
            .map_err(|e| AudioError::NotAudio(e.to_string()))?;
        let channels = params.channels.map(|c| c.count()).unwrap_or(1);
        let name = symphonia::default::get_codecs().get_codec(params.codec).map(|d| d.short_name).unwrap_or("audio");
        Ok(PacketDecoder { inner: Inner::Symphonia(decoder, None), rate, channels, skip: 0, name })
    }

    /// Decodes one packet and appends its samples, averaged over channels.
    fn decode(&mut self, packet: &Packet, mono: &mut Vec<f32>) -> Result<(), String> {
        match &mut self.inner {
            Inner::Opus(decoder, buf) => {
                let frames = decoder.decode_float(&packet.data, buf, false).map_err(|e| e.to_string())?;
                mix_down(&buf[..frames * self.channels], self.channels, mono);
            }
            Inner::Symphonia(decoder, buf) => {
                let decoded = decoder.decode(packet).map_err(|e| e.to_string())?;
                let spec = *decoded.spec();
                let needed = decoded.capacity() as u64;
                if buf.as_ref().is_none_or(|b| b.capacity() < needed as usize) {
                    *buf = Some(SampleBuffer::new(needed, spec));
                }
                let buf = buf.as_mut().expect("just set");
                buf.copy_interleaved_ref(decoded);
                self.channels = spec.channels.count();
                mix_down(buf.samples(), self.channels, mono);
            }
        }
        Ok(())
    }
}

fn mix_down(interleaved: &[f32], channels: usize, mono: &mut Vec<f32>) {
    if channels <= 1 {
        mono.extend_from_slice(interleaved);
    } else {
        let scale = 1.0 / channels as f32;
        mono.extend(interleaved.chunks_exact(channels).map(|frame| frame.iter().sum::<f32>() * scale));
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Band-limited resampling by a rational factor: each output sample is a
/// Blackman-windowed sinc interpolation of the input, low-passed below the lower
/// of the two Nyquist rates so downsampling does not alias. The filter taps are
/// tabulated once per phase (there are `to / gcd(from, to)` phases).
pub fn resample(input: &[f32], from: u32, to: u32) -> Vec<f32> {
    if from == to || input.is_empty() {
        return input.to_vec();
    }
    let g = gcd(from as u64, to as u64);
    let (up, down) = (to as u64 / g, from as u64 / g);
    // Cutoff as a fraction of the input Nyquist, with a little room for the
    // transition band.
    let cutoff = (to as f64 / from as f64).min(1.0) * 0.94;
    let half = (12.0 / cutoff).ceil() as i64;
    let taps = 2 * half as usize;
    let phases = up as usize;
    let sinc =
        |x: f64| if x.abs() < 1e-12 { 1.0 } else { (std::f64::consts::PI * x).sin() / (std::f64::consts::PI * x) };
    let blackman = |x: f64| {
        // x in [-1, 1]
        let t = (x + 1.0) / 2.0;
        0.42 - 0.5 * (2.0 * std::f64::consts::PI * t).cos() + 0.08 * (4.0 * std::f64::consts::PI * t).cos()
    };
    let table: Vec<f32> = (0..phases)
        .flat_map(|phase| {
            let frac = phase as f64 / up as f64;
            (0..taps).map(move |k| {
                // Distance from the output position to input sample (base - half + 1 + k).
                let x = frac - (k as f64 - half as f64 + 1.0);
                if x.abs() >= half as f64 {
                    0.0
                } else {
                    (cutoff * sinc(cutoff * x) * blackman(x / half as f64)) as f32
                }
            })
        })
        .collect();
    let out_len = (input.len() as u64 * up / down) as usize;
    let mut out = Vec::with_capacity(out_len);
    for n in 0..out_len as u64 {
        let pos = n * down;
        let base = (pos / up) as i64;
        let phase = (pos % up) as usize;
        let weights = &table[phase * taps..(phase + 1) * taps];
        let first = base - half + 1;
        let mut acc = 0f32;
        if first >= 0 && first + taps as i64 <= input.len() as i64 {
            let window = &input[first as usize..first as usize + taps];
            acc = window.iter().zip(weights).map(|(s, w)| s * w).sum();
        } else {
            for (k, w) in weights.iter().enumerate() {
                let i = first + k as i64;
                if i >= 0 && (i as usize) < input.len() {
                    acc += input[i as usize] * w;
                }
            }
        }
        out.push(acc);
    }
    out
}

/// A 16-bit PCM WAV file, for tests.
#[cfg(test)]
pub(crate) fn wav(samples: &[i16], rate: u32, channels: u16) -> Vec<u8> {
    let data_len = (samples.len() * 2) as u32;
    let mut out = Vec::new();
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&channels.to_le_bytes());
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * channels as u32 * 2).to_le_bytes());
    out.extend_from_slice(&(channels * 2).to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(freq: f32, rate: u32, seconds: f32) -> Vec<f32> {
        (0..(rate as f32 * seconds) as usize)
            .map(|i| (2.0 * std::f32::consts::PI * freq * i as f32 / rate as f32).sin() * 0.5)
            .collect()
    }

    fn rms(x: &[f32]) -> f32 {
        (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt()
    }

    #[test]
    fn resampling_keeps_a_tone_in_band_and_removes_one_above_nyquist() {
        for from in [44_100, 48_000, 22_050, 8_000] {
            let kept = resample(&tone(440.0, from, 1.0), from, TARGET_RATE);
            assert_eq!(kept.len(), TARGET_RATE as usize);
            let middle = &kept[2000..14_000];
            assert!((rms(middle) - 0.5 / 2f32.sqrt()).abs() < 0.01, "{from} Hz: 440 Hz tone rms {}", rms(middle));
            // The resampled tone matches a tone generated at 16 kHz.
            let reference = tone(440.0, TARGET_RATE, 1.0);
            let err: f32 = middle.iter().zip(&reference[2000..14_000]).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(err < 0.02, "{from} Hz: max error {err}");
        }
        // 12 kHz cannot exist at 16 kHz; a nearest-sample resampler would alias it to 4 kHz.
        let removed = resample(&tone(12_000.0, 48_000, 1.0), 48_000, TARGET_RATE);
        assert!(rms(&removed[2000..14_000]) < 0.01, "aliasing: rms {}", rms(&removed[2000..14_000]));
    }

    #[test]
    fn decodes_a_stereo_wav_to_16k_mono() {
        let stereo: Vec<i16> = tone(300.0, 44_100, 2.0).iter().flat_map(|&s| [(s * 32767.0) as i16, 0]).collect();
        let audio = decode(&wav(&stereo, 44_100, 2), Some("audio/wav"), 60.0).unwrap();
        assert!((audio.seconds() - 2.0).abs() < 0.01);
        // One silent channel halves the amplitude of the mix.
        assert!((rms(&audio.samples[4000..28_000]) - 0.25 / 2f32.sqrt()).abs() < 0.01);
    }

    #[test]
    fn refuses_bad_input_clearly() {
        assert_eq!(decode(&[], None, 60.0).err(), Some(AudioError::Empty));
        assert!(matches!(decode(b"%PDF-1.7 not audio at all", None, 60.0), Err(AudioError::NotAudio(_))));
        let long: Vec<i16> = vec![0; 16_000 * 5];
        assert!(matches!(decode(&wav(&long, 16_000, 1), None, 2.0), Err(AudioError::TooLong { .. })));
        let mut truncated = wav(&long, 16_000, 1);
        truncated.truncate(30);
        assert!(decode(&truncated, None, 60.0).is_err());
    }
}
