//! The resume journal parser: any bytes give a journal or a typed error, never a panic, and a
//! parsed journal re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use udpferry::store::journal;

fuzz_target!(|data: &[u8]| {
    if let Ok((id, size, ranges)) = journal::decode(data) {
        assert_eq!(journal::encode(&id, size, &ranges), data);
    }
});
