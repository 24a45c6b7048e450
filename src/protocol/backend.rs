//! Messages the proxy writes to clients, encoded with pgwire's well-kept encoders.
//! (Never decode peer bytes with pgwire: its decoders trust lengths. See DESIGN.md.)

use bytes::BytesMut;
use pgwire::messages::Message;
use pgwire::messages::response::{ErrorResponse, ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{
    Authentication, BackendKeyData, NegotiateProtocolVersion, ParameterStatus, SecretKey,
};

fn put(msg: impl Message, buf: &mut BytesMut) {
    // Encoding into a BytesMut cannot fail for these message types.
    let _ = msg.encode(buf);
}

/// Severity of an error the proxy raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The statement failed; the session goes on.
    Error,
    /// The connection is closed after this message.
    Fatal,
}

/// ErrorResponse with severity, SQLSTATE and message.
pub fn error(buf: &mut BytesMut, severity: Severity, code: &str, message: &str) {
    let sev = match severity {
        Severity::Error => "ERROR",
        Severity::Fatal => "FATAL",
    };
    let fields = vec![
        (b'S', sev.to_owned()),
        (b'V', sev.to_owned()),
        (b'C', code.to_owned()),
        (b'M', message.to_owned()),
    ];
    put(ErrorResponse::new(fields), buf);
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    let status = match status {
        b'T' => TransactionStatus::Transaction,
        b'E' => TransactionStatus::Error,
        _ => TransactionStatus::Idle,
    };
    put(ReadyForQuery::new(status), buf);
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    put(BackendKeyData::new(pid, SecretKey::I32(secret)), buf);
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    put(ParameterStatus::new(name.to_owned(), value.to_owned()), buf);
}

pub fn auth_ok(buf: &mut BytesMut) {
    put(Authentication::Ok, buf);
}

pub fn auth_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    put(Authentication::MD5Password(salt.to_vec()), buf);
}

pub fn auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    put(
        Authentication::SASL(mechanisms.iter().map(|m| m.to_string()).collect()),
        buf,
    );
}

pub fn auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    put(Authentication::SASLContinue(data.to_vec().into()), buf);
}

pub fn auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    put(Authentication::SASLFinal(data.to_vec().into()), buf);
}

/// Tells a client asking for protocol 3.`minor` (> 0) that we speak 3.0, and which `_pq_.`
/// options we do not know.
pub fn negotiate_protocol_version(buf: &mut BytesMut, unsupported: Vec<String>) {
    put(NegotiateProtocolVersion::new(0, unsupported), buf);
}
