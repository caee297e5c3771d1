//! The name parser (`store::SafePath`): any bytes give a name or a typed error, never a panic,
//! and an accepted name joined to a root is that root followed by exactly its components, each
//! one normal, none of which Windows would read as a separator, drive, stream, parent or
//! stripped name either.
#![no_main]
use std::ffi::OsStr;
use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use udpferry::store::SafePath;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(safe) = SafePath::parse(&text) else {
        return;
    };
    assert_eq!(safe.as_str(), text, "accepted names are kept as given");
    assert_eq!(safe.to_string(), text);
    assert_eq!(SafePath::parse(safe.as_str()).as_ref(), Ok(&safe));
    assert!(text.len() <= SafePath::MAX_LEN);

    let names: Vec<&str> = safe.components().collect();
    assert!(!names.is_empty() && names.len() <= SafePath::MAX_COMPONENTS);
    for name in &names {
        assert!(!name.is_empty() && name.len() <= SafePath::MAX_COMPONENT_LEN);
        assert!(*name != "." && *name != "..", "{name:?}");
        assert!(!name.contains(['/', '\\', ':']), "{name:?}");
        assert!(!name.chars().any(|c| c < ' ' || c == '\u{7f}'), "{name:?}");
        assert!(!name.ends_with(['.', ' ']), "{name:?}");
    }

    for root in ["/srv/udpferry", "relative/root", ""] {
        let root = Path::new(root);
        let joined = safe.join_to(root);
        let root_parts: Vec<Component> = root.components().collect();
        let parts: Vec<Component> = joined.components().collect();
        assert!(parts.starts_with(&root_parts), "{joined:?} left {root:?}");
        let rest = &parts[root_parts.len()..];
        assert_eq!(
            rest.len(),
            names.len(),
            "components dropped or split: {joined:?}"
        );
        for (part, name) in rest.iter().zip(&names) {
            assert_eq!(*part, Component::Normal(OsStr::new(name)));
        }
    }
});
