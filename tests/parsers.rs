//! Property tests of everything that parses bytes or text a peer or an operator controls: the
//! framer, the startup parser, SCRAM, the console's command reader, userlist.txt and the hba
//! file. Nothing may panic, whatever the input; well-formed input must come back exactly.

use floodgate::auth::hba::Hba;
use floodgate::auth::scram::{Exchange, Verifier};
use floodgate::protocol::frame::{Item, Scanner};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn startup_parser_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = floodgate::protocol::startup::parse(&body);
    }

    /// Messages cut into arbitrary chunks are framed exactly as they were sent, and garbage
    /// never panics the scanner.
    #[test]
    fn the_framer_recovers_messages_across_any_chunking(
        messages in proptest::collection::vec((b'A'..=b'z', proptest::collection::vec(any::<u8>(), 0..64)), 1..20),
        cuts in proptest::collection::vec(1usize..50, 1..40),
        garbage in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut wire = Vec::new();
        for (tag, body) in &messages {
            wire.push(*tag);
            wire.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
            wire.extend_from_slice(body);
        }
        let mut scanner = Scanner::new(1 << 20);
        let mut buf = Vec::new();
        let mut pos = 0;
        let mut seen = Vec::new();
        let mut fed = 0;
        let mut cut = cuts.iter().cycle();
        while fed < wire.len() || pos < buf.len() {
            if fed < wire.len() {
                let n = (*cut.next().unwrap()).min(wire.len() - fed);
                buf.extend_from_slice(&wire[fed..fed + n]);
                fed += n;
            }
            loop {
                match scanner.next(&buf, pos, |_, len| len).unwrap() {
                    Item::End => break,
                    Item::Body { to } => pos = to,
                    Item::Message { tag, start, end } => {
                        seen.push((tag, buf[start + 5..end].to_vec()));
                        pos = end;
                    }
                }
            }
            if fed == wire.len() {
                break;
            }
        }
        prop_assert_eq!(seen, messages);
        let mut scanner = Scanner::new(1024);
        let mut pos = 0;
        for _ in 0..garbage.len() + 1 {
            match scanner.next(&garbage, pos, |_, len| len) {
                Ok(Item::Message { end, .. }) => pos = end,
                Ok(Item::Body { to }) => pos = to,
                Ok(Item::End) | Err(_) => break,
            }
        }
    }

    #[test]
    fn scram_exchanges_never_panic(
        first in proptest::collection::vec(any::<u8>(), 0..256),
        last in proptest::collection::vec(any::<u8>(), 0..256),
        nonce in "[a-zA-Z0-9]{0,40}",
    ) {
        let verifier = || Verifier::impostor("someone", &[7; 32]);
        let _ = Exchange::start(verifier(), &first);
        let well_formed = format!("n,,n=someone,r={nonce}");
        if let Ok((exchange, _)) = Exchange::start(verifier(), well_formed.as_bytes()) {
            prop_assert!(exchange.finish(&last).is_err());
        }
    }

    #[test]
    fn console_commands_never_panic_and_keep_quoted_words(
        sql in "\\PC{0,80}",
        word in "[a-zA-Z0-9 _;=]{0,20}",
    ) {
        let _ = floodgate::admin::command_words(&sql);
        let quoted = format!("PAUSE \"{}\"", word.replace('"', "\"\""));
        let words = floodgate::admin::command_words(&quoted).unwrap();
        prop_assert_eq!(words, vec!["PAUSE".to_string(), word]);
    }

    #[test]
    fn userlists_round_trip(users in proptest::collection::vec(("[a-z\"]{1,10}", "[ -~]{0,20}"), 0..8)) {
        let text: String = users
            .iter()
            .map(|(u, p)| format!("\"{}\" \"{}\"\n", u.replace('"', "\"\""), p.replace('"', "\"\"")))
            .collect();
        let parsed = floodgate::auth::userlist::parse(&text).unwrap();
        prop_assert_eq!(parsed, users);
    }

    #[test]
    fn hba_files_never_panic(text in "\\PC{0,200}") {
        if let Ok(hba) = Hba::parse(&text) {
            let _ = hba.decide("10.1.2.3".parse().unwrap(), false, "app", "app");
        }
    }
}
