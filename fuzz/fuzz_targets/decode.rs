//! Any bytes: decode must return Ok or a typed error, never panic; what decodes re-encodes to the
//! same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = udpferry::is_udpferry_datagram(data);
    if let Ok(d) = udpferry::wire::decode(data) {
        let mut buf = vec![0u8; data.len()];
        // Varints may be longer than needed on the wire, so only the length can shrink.
        let n = d.encode(&mut buf).expect("a decoded datagram re-encodes");
        assert!(n <= data.len());
        assert_eq!(udpferry::wire::decode(&buf[..n]).as_ref(), Ok(&d));
    }
});
