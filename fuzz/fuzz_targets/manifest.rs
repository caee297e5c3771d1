//! The manifest parser, and block matching over hostile manifests: any bytes give a manifest or
//! a typed error, never a panic; a parsed manifest re-encodes to the same bytes; and matching
//! it against local bytes never panics and only reports blocks whose bytes are really there.
#![no_main]
use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use udpferry::store::manifest::Manifest;
use udpferry::ObjectId;

fuzz_target!(|data: &[u8]| {
    // The id the client asked for is whatever the manifest names, when it names one.
    let id = data
        .get(4)
        .and_then(|&alg| {
            let len = ObjectId::digest_len(alg)?;
            ObjectId::from_parts(alg, data.get(5..5 + len)?)
        })
        .unwrap_or(ObjectId::Md5([0; 16]));
    let Ok(m) = Manifest::decode(data, &id) else {
        return;
    };
    assert_eq!(m.encode(), data);
    let local: Vec<u8> = data.iter().cycle().take(4096).copied().collect();
    let mut found = BTreeMap::new();
    m.find_blocks(&local, &mut found, 0);
    for (i, src) in found {
        let r = m.block_range(i);
        assert!(src.offset + (r.end - r.start) <= local.len() as u64);
    }
});
