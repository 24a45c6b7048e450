//! Floodgate: a transaction-pooling PostgreSQL proxy.
pub mod pgcluster;
