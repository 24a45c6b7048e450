#![no_main]
use floodgate::protocol::frame::{Item, Scanner};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut scanner = Scanner::new(1 << 16);
    let mut pos = 0;
    for _ in 0..=data.len() {
        match scanner.next(data, pos, |tag, len| if tag == b'Z' { len } else { 0 }) {
            Ok(Item::Message { end, .. }) => pos = end,
            Ok(Item::Body { to }) => pos = to,
            Ok(Item::End) | Err(_) => break,
        }
    }
});
