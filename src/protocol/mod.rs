//! The PostgreSQL v3 wire protocol: only what the proxy must read or write.

pub mod backend;
pub mod frame;
pub mod pipeline;
pub mod prepared;
pub mod sql;
pub mod sqlstate;
pub mod startup;
