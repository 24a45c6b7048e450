#![no_main]
use floodgate::auth::scram::{Exchange, Verifier};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (first, last) = data.split_at(data.len() / 2);
    if let Ok((exchange, _)) = Exchange::start(Verifier::impostor("u", &[1; 32]), first) {
        let _ = exchange.finish(last);
    }
});
