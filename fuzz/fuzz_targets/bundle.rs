//! The bundle listing parser: any bytes give a bundle or a typed error, never a panic; a parsed
//! bundle re-encodes to the same bytes (the listing is canonical, so its id is too), and every
//! path in it is a SafePath with no duplicate or directory conflict left.
#![no_main]
use libfuzzer_sys::fuzz_target;
use udpferry::store::bundle::Bundle;
use udpferry::store::SafePath;

fuzz_target!(|data: &[u8]| {
    if let Ok(bundle) = Bundle::decode(data) {
        assert_eq!(bundle.encode(), data);
        let mut total = 0u64;
        for pair in bundle.entries().windows(2) {
            assert!(pair[0].path < pair[1].path);
        }
        for e in bundle.entries() {
            assert!(SafePath::parse(e.path.as_str()).is_ok());
            total += e.size;
        }
        assert_eq!(total, bundle.total_bytes());
        // Building from the same entries gives the same bundle.
        assert_eq!(Bundle::build(bundle.entries().to_vec()).as_ref(), Ok(&bundle));
    }
});
