#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(hba) = floodgate::auth::hba::Hba::parse(text) {
            let _ = hba.decide("10.0.0.1".parse().unwrap(), false, "db", "user");
        }
        let _ = floodgate::auth::userlist::parse(text);
    }
});
