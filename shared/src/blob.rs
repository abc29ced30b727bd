//! Moving binary job inputs (photos, voice notes) between front-ends and workers.
//!
//! NATS caps a message at its max payload (1 MiB by default), and a job carries
//! its input inline as base64, so anything above [`INLINE_BLOB_LIMIT`] goes into
//! the JetStream object store and the job carries a [`BlobRef`] with the size and
//! SHA-256, which the worker checks before it trusts the bytes.

use crate::jetstream::BLOB_BUCKET;
use crate::proto::{Blob, BlobRef, INLINE_BLOB_LIMIT};
use async_nats::jetstream::object_store::ObjectStore;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("the file is {size} bytes; the limit is {limit}")]
    TooLarge { size: u64, limit: u64 },
    #[error("the file is empty")]
    Empty,
    #[error("cannot store the file: {0}")]
    Store(String),
    #[error("the stored file is gone (it expires with its job): {0}")]
    Missing(String),
    #[error("the stored file arrived damaged ({0})")]
    Damaged(String),
}

/// Wraps `data` for a job: inline when small, otherwise stored in the bucket
/// under its content hash (so a retried upload stores nothing twice).
pub async fn put(store: &ObjectStore, data: Vec<u8>, content_type: &str) -> Result<Blob, BlobError> {
    if data.is_empty() {
        return Err(BlobError::Empty);
    }
    if data.len() <= INLINE_BLOB_LIMIT {
        return Ok(Blob::Inline { content_type: content_type.into(), data });
    }
    let sha256 = hex::encode(Sha256::digest(&data));
    let size = data.len() as u64;
    let mut reader = std::io::Cursor::new(data);
    store.put(sha256.as_str(), &mut reader).await.map_err(|e| BlobError::Store(e.to_string()))?;
    Ok(Blob::Stored(BlobRef {
        bucket: BLOB_BUCKET.into(),
        name: sha256.clone(),
        size,
        sha256,
        content_type: content_type.into(),
    }))
}

/// The bytes and content type of `blob`, refusing anything above `limit` before
/// reading it.
pub async fn get(store: &ObjectStore, blob: Blob, limit: u64) -> Result<(Vec<u8>, String), BlobError> {
    match blob {
        Blob::Inline { content_type, data } => {
            if data.len() as u64 > limit {
                return Err(BlobError::TooLarge { size: data.len() as u64, limit });
            }
            Ok((data, content_type))
        }
        Blob::Stored(blob_ref) => {
            if blob_ref.size > limit {
                return Err(BlobError::TooLarge { size: blob_ref.size, limit });
            }
            let mut object = store.get(&blob_ref.name).await.map_err(|e| BlobError::Missing(e.to_string()))?;
            let mut data = Vec::with_capacity(blob_ref.size as usize);
            // Read one byte past the declared size so a lying reference is caught.
            (&mut object)
                .take(blob_ref.size + 1)
                .read_to_end(&mut data)
                .await
                .map_err(|e| BlobError::Missing(e.to_string()))?;
            if data.len() as u64 != blob_ref.size {
                return Err(BlobError::Damaged(format!("{} bytes, expected {}", data.len(), blob_ref.size)));
            }
            if hex::encode(Sha256::digest(&data)) != blob_ref.sha256 {
                return Err(BlobError::Damaged("checksum mismatch".into()));
            }
            Ok((data, blob_ref.content_type))
        }
    }
}
