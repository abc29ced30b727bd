//! Multipart uploads (audio, images), shared by the endpoints that take a file:
//! the file is read whole, up to the configured limit, so an oversize upload is
//! refused with 413 before anything reaches NATS.

use super::error::ApiError;
use axum::extract::multipart::{Field, MultipartError};
use axum::http::StatusCode;
use natter_shared::proto::ErrorCode;

/// Room in a request body beyond the file itself, for the other form fields and
/// the multipart framing, so a file exactly at the limit is still accepted.
pub const FORM_OVERHEAD: usize = 64 * 1024;

/// A form that cannot be read, as the answer: 413 when the body went over the
/// route's limit, else 400.
pub fn form_error(e: MultipartError, max_upload: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(max_upload)
    } else {
        ApiError::bad_request(format!("cannot read the form: {}", e.body_text()))
    }
}

/// The file part's bytes, refused as soon as they pass `max_upload`.
pub async fn read_file(field: &mut Field<'_>, max_upload: usize) -> Result<Vec<u8>, ApiError> {
    let mut data = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(|e| form_error(e, max_upload))? {
        if data.len() + chunk.len() > max_upload {
            return Err(too_large(max_upload));
        }
        data.extend_from_slice(&chunk);
    }
    Ok(data)
}

pub fn too_large(limit: usize) -> ApiError {
    ApiError::from_job(
        ErrorCode::TooLarge,
        format!("the upload is larger than the limit of {limit} bytes ({:.1} MiB)", limit as f64 / 1048576.0),
    )
}

/// A part's declared content type without its parameters, lowercased.
pub fn declared_type(declared: Option<&str>) -> Option<String> {
    declared.map(|c| c.split(';').next().unwrap_or("").trim().to_ascii_lowercase()).filter(|c| !c.is_empty())
}

/// A file name's extension, lowercased; many clients send every file as
/// `application/octet-stream`, so this is the next best hint of its type.
pub fn extension(file_name: Option<&str>) -> Option<String> {
    file_name.and_then(|n| n.rsplit_once('.')).map(|(_, e)| e.to_ascii_lowercase())
}
