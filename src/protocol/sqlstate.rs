//! The SQLSTATEs the proxy raises itself, in one place.

pub const PROTOCOL_VIOLATION: &str = "08P01";
pub const INVALID_PASSWORD: &str = "28P01";
pub const INVALID_AUTHORIZATION: &str = "28000";
pub const UNKNOWN_DATABASE: &str = "3D000";
pub const TOO_MANY_CONNECTIONS: &str = "53300";
pub const ADMIN_SHUTDOWN: &str = "57P01";
pub const CANNOT_CONNECT_NOW: &str = "57P03";
pub const QUERY_CANCELED: &str = "57014";
pub const CONNECTION_FAILURE: &str = "08006";
pub const CONNECTION_EXCEPTION: &str = "08000";
pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
pub const INTERNAL_ERROR: &str = "XX000";
pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
pub const SYNTAX_ERROR: &str = "42601";
pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
pub const UNDEFINED_OBJECT: &str = "42704";
pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
pub const CONFIG_FILE_ERROR: &str = "F0000";
pub const INVALID_PARAMETER_VALUE: &str = "22023";
