//! API keys: `Authorization: Bearer <key>`, as OpenAI clients send it.
//!
//! Each key names a user, and that user owns the jobs made with it: the
//! request's own `user` field cannot speak for someone else. With no keys
//! configured the API is open, as on a laptop, and callers are "anonymous"
//! unless they name themselves. Keys are kept only as SHA-256 digests and
//! compared in constant time, so neither memory dumps nor timing give one away.

use super::error::ApiError;
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use natter_shared::secret::Secret;
use sha2::{Digest, Sha256};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("API key entry {0} is not `user:key`")]
    Malformed(usize),
    #[error("API key entry {0} has an empty user or key")]
    Empty(usize),
}

/// The configured keys, each with the user it names.
#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Arc<Vec<([u8; 32], String)>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let users: Vec<&str> = self.keys.iter().map(|(_, user)| user.as_str()).collect();
        f.debug_struct("ApiKeys").field("users", &users).finish()
    }
}

impl ApiKeys {
    /// Reads `user:key` entries (NATTER_API_KEYS or `[http] api_keys`).
    pub fn parse(entries: &[Secret]) -> Result<ApiKeys, KeyError> {
        let mut keys = Vec::new();
        for (i, entry) in entries.iter().enumerate().filter(|(_, e)| !e.is_empty()) {
            let (user, key) = entry.expose().trim().split_once(':').ok_or(KeyError::Malformed(i + 1))?;
            let (user, key) = (user.trim(), key.trim());
            if user.is_empty() || key.is_empty() {
                return Err(KeyError::Empty(i + 1));
            }
            keys.push((digest(key), user.to_string()));
        }
        Ok(ApiKeys { keys: Arc::new(keys) })
    }

    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// The user a presented key names, if any key matches.
    fn user_of(&self, presented: &str) -> Option<&str> {
        let presented = digest(presented);
        // Every entry is compared in full, whichever matches.
        let mut found = None;
        for (key, user) in self.keys.iter() {
            let differing = key.iter().zip(presented.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if differing == 0 {
                found = Some(user.as_str());
            }
        }
        found
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Who is calling: the key's user, or `None` on an open API.
#[derive(Clone, Debug)]
pub struct Caller(pub Option<String>);

impl Caller {
    /// The user a job is made for: the key's, else the name the request gave.
    pub fn user(&self, requested: Option<String>) -> String {
        match &self.0 {
            Some(user) => user.clone(),
            None => requested.filter(|u| !u.trim().is_empty()).unwrap_or_else(|| "anonymous".into()),
        }
    }
}

/// Refuses requests without a valid key (when keys are configured) with
/// OpenAI's 401, and tells the handlers who called.
pub async fn require_key(State(keys): State<ApiKeys>, mut request: Request, next: Next) -> Result<Response, ApiError> {
    if keys.is_open() {
        request.extensions_mut().insert(Caller(None));
        return Ok(next.run(request).await);
    }
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let Some(presented) = presented.filter(|p| !p.is_empty()) else {
        return Err(ApiError::unauthorized(
            "You didn't provide an API key. Send it in an Authorization header as `Bearer YOUR_KEY`.",
        ));
    };
    let Some(user) = keys.user_of(presented) else {
        return Err(ApiError::unauthorized("Incorrect API key provided."));
    };
    let caller = Caller(Some(user.to_string()));
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_users_and_reject_bad_entries() {
        let keys = ApiKeys::parse(&[Secret::new("alice:sk-a1"), Secret::new(" bob : sk-b2 ")]).unwrap();
        assert_eq!(keys.user_of("sk-a1"), Some("alice"));
        assert_eq!(keys.user_of("sk-b2"), Some("bob"));
        assert_eq!(keys.user_of("sk-a"), None);
        assert!(matches!(ApiKeys::parse(&[Secret::new("nokey")]), Err(KeyError::Malformed(1))));
        assert!(matches!(ApiKeys::parse(&[Secret::new("a:x"), Secret::new(":x")]), Err(KeyError::Empty(2))));
        assert!(ApiKeys::parse(&[]).unwrap().is_open());
        let shown = format!("{keys:?}");
        assert!(!shown.contains("sk-a1") && shown.contains("alice"), "{shown}");
    }

    #[test]
    fn a_keyed_caller_cannot_name_another_user() {
        assert_eq!(Caller(Some("alice".into())).user(Some("bob".into())), "alice");
        assert_eq!(Caller(None).user(Some("bob".into())), "bob");
        assert_eq!(Caller(None).user(None), "anonymous");
    }
}
