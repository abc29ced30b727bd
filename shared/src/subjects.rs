//! NATS subject names. Every process builds subjects through these functions so a
//! rename happens in one place.

use crate::proto::JobKind;
use uuid::Uuid;

/// Prefix of every job subject: `natter.job.<kind>.<model>`.
pub const JOBS_ALL: &str = "natter.job.>";
/// `natter.events.<job_id>`.
pub const EVENTS_ALL: &str = "natter.events.>";
/// `natter.cancel.<job_id>`.
pub const CANCEL_ALL: &str = "natter.cancel.>";
/// The NATS service name every worker registers under.
pub const WORKER_SERVICE: &str = "natter-worker";

pub fn job(kind: JobKind, model: &str) -> String {
    format!("natter.job.{kind}.{model}")
}

pub fn events(job_id: Uuid) -> String {
    format!("natter.events.{job_id}")
}

pub fn cancel(job_id: Uuid) -> String {
    format!("natter.cancel.{job_id}")
}

/// Model ids become one subject token, so they may not contain NATS wildcards,
/// separators or whitespace.
pub fn valid_model_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_built_from_parts() {
        assert_eq!(job(JobKind::Chat, "smollm2-135m"), "natter.job.chat.smollm2-135m");
        let id = Uuid::nil();
        assert_eq!(events(id), format!("natter.events.{id}"));
        assert_eq!(cancel(id), format!("natter.cancel.{id}"));
    }

    #[test]
    fn model_ids_are_single_tokens() {
        assert!(valid_model_id("smollm2-135m-instruct"));
        for bad in ["", "a.b", "a*", "a>", "a b", "ü"] {
            assert!(!valid_model_id(bad), "{bad}");
        }
    }
}
