//! natter-shared: what every natter process agrees on.
//!
//! The wire protocol ([`proto`]), subject names ([`subjects`]), the JetStream
//! streams and consumers ([`jetstream`]), connecting to NATS ([`nats`]), the model catalog ([`catalog`]), config
//! loading ([`config`]), tracing setup ([`telemetry`]) and the shutdown signal
//! ([`shutdown`]). No ML and no bot code lives here, so front-ends and workers can
//! depend on it without pulling either in.

pub mod blob;
pub mod catalog;
pub mod config;
pub mod jetstream;
pub mod nats;
pub mod proto;
pub mod secret;
pub mod shutdown;
pub mod subjects;
pub mod telemetry;

#[cfg(feature = "testkit")]
pub mod testkit;
