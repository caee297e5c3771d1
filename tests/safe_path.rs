//! `SafePath`: every rule with names it accepts and names it rejects, and a property over
//! hostile strings: an accepted name never resolves outside its root, lexically and (on Unix) on
//! a real file system.
//!
//! proptest prints the failing name; choose another run with `PROPTEST_RNG_SEED=<n>`, and more
//! cases with `PROPTEST_CASES=<n>`.

use std::ffi::OsStr;
use std::fs;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use udpferry::store::{ContentStore, NameError, SafePath};
use udpferry::ObjectId;

fn rejects(name: &str, expected: NameError) {
    assert_eq!(SafePath::parse(name), Err(expected), "for {name:?}");
}

fn accepts(name: &str) -> SafePath {
    let safe = SafePath::parse(name).unwrap_or_else(|e| panic!("{name:?} rejected: {e}"));
    assert_eq!(
        safe.as_str(),
        name,
        "accepted names are kept exactly as given"
    );
    safe
}

#[test]
fn ordinary_names_are_accepted_as_given() {
    for name in [
        "a",
        "level1.bsp",
        "maps/de_dust2/level1.bsp",
        "карта/уровень1.bsp",
        "地图/关卡.map",
        "🗺️ maps/x",
        ".hidden",
        "maps/.cache/x",
        "a..b",
        "..a",
        "a.b.c",
        " leading space",
        "inner space.txt",
        "~",
        "~user/file",
        "$HOME",
        "%APPDATA%",
        "a-b_c+d=e,f;g'h[i]j{k}l!m@n#o^p&q(r)s`t",
    ] {
        accepts(name);
    }
}

#[test]
fn empty_is_rejected() {
    rejects("", NameError::Empty);
}

#[test]
fn parent_components_are_rejected() {
    for name in [
        "..",
        "../x",
        "a/../b",
        "a/..",
        "a/b/../../..",
        "x/../../etc/passwd",
    ] {
        rejects(name, NameError::Parent);
    }
}

#[test]
fn dot_and_empty_components_are_rejected_not_normalised() {
    for name in [".", "./a", "a/./b", "a/."] {
        rejects(name, NameError::DotComponent);
    }
    for name in ["a//b", "a/", "a/b/", "a///b"] {
        rejects(name, NameError::EmptyComponent);
    }
}

#[test]
fn trailing_dots_and_spaces_are_rejected() {
    for name in [
        "...",
        "....",
        "a.",
        "a ",
        "maps./x",
        "maps /x",
        "x/level1.bsp.",
        "a. ",
    ] {
        rejects(name, NameError::TrailingDotOrSpace);
    }
}

#[test]
fn absolute_names_are_rejected() {
    for name in ["/etc/passwd", "/", "/a", "\\", "\\Windows\\System32"] {
        rejects(name, NameError::Absolute);
    }
}

#[test]
fn drive_letters_unc_and_device_prefixes_are_rejected() {
    for name in [
        "C:",
        "c:",
        "C:foo",
        "c:foo",
        "C:\\Windows",
        "C:/Windows",
        "z:x/y",
        "\\\\server\\share",
        "\\\\?\\C:\\x",
        "\\\\.\\CON",
        "//server/share",
        "\\/x",
        "/\\x",
    ] {
        rejects(name, NameError::Prefix);
    }
}

#[test]
fn backslashes_are_rejected() {
    for name in ["a\\b", "a/b\\c", "a\\", "maps\\..\\..\\x"] {
        rejects(name, NameError::Backslash);
    }
}

#[test]
fn control_characters_are_rejected() {
    for (name, ch) in [
        ("a\0b", '\0'),
        ("\0", '\0'),
        ("a\nb", '\n'),
        ("a\rb", '\r'),
        ("a\tb", '\t'),
        ("\u{1b}[31m", '\u{1b}'),
        ("a\u{1f}", '\u{1f}'),
        ("a\u{7f}", '\u{7f}'),
        ("../\0", '\0'),
    ] {
        rejects(name, NameError::ControlCharacter { ch });
    }
}

#[test]
fn characters_windows_forbids_are_rejected() {
    for ch in ['<', '>', ':', '"', '|', '?', '*'] {
        rejects(
            &format!("maps/a{ch}b"),
            NameError::ForbiddenCharacter { ch },
        );
        rejects(&format!("{ch}"), NameError::ForbiddenCharacter { ch });
    }
    // A colon that is not a drive letter's is still refused (NTFS alternate data streams).
    rejects("1:x", NameError::ForbiddenCharacter { ch: ':' });
    rejects("é:x", NameError::ForbiddenCharacter { ch: ':' });
    rejects("map.bsp:$DATA", NameError::ForbiddenCharacter { ch: ':' });
    rejects("ab:", NameError::ForbiddenCharacter { ch: ':' });
}

#[test]
fn windows_device_names_are_rejected_in_any_component_case_and_extension() {
    for name in [
        "con",
        "CON",
        "Con",
        "CON.txt",
        "con.tar.gz",
        "com1.tar.gz",
        "COM9",
        "com0",
        "lpt9",
        "LPT1.log",
        "lpt0",
        "nul",
        "NUL.map",
        "aux",
        "prn.bsp",
        "conin$",
        "CONOUT$.x",
        "clock$",
        "COM¹",
        "com².txt",
        "LPT³",
        "CON .txt",
        "nul   .x",
        "maps/con",
        "maps/aux/level1.bsp",
        "a/b/c/lpt3.x.y",
    ] {
        rejects(name, NameError::ReservedName);
    }
}

#[test]
fn names_that_only_resemble_devices_are_accepted() {
    for name in [
        "console",
        "console.txt",
        "com",
        "com10",
        "COM⁴",
        "lpt",
        "lpt1x",
        "com1x.txt",
        "auxiliary.map",
        "nul_",
        "_con",
        "xcon.txt",
        "a.con",
        "maps/prn2",
        " con",
    ] {
        accepts(name);
    }
}

#[test]
fn lengths_are_limited_in_bytes() {
    let max = "x".repeat(SafePath::MAX_COMPONENT_LEN);
    accepts(&max);
    accepts(&format!("a/{max}/b"));
    let long = "x".repeat(SafePath::MAX_COMPONENT_LEN + 1);
    rejects(&long, NameError::ComponentTooLong { len: 256 });
    rejects(
        &format!("a/{long}"),
        NameError::ComponentTooLong { len: 256 },
    );
    // Bytes, not characters: 127 Cyrillic letters are 254 bytes, 128 are 256.
    accepts(&"я".repeat(127));
    rejects(&"я".repeat(128), NameError::ComponentTooLong { len: 256 });

    // 5 components of 204 bytes and 4 slashes: exactly 1024 bytes.
    let part = "y".repeat(204);
    let exact = [part.as_str(); 5].join("/");
    assert_eq!(exact.len(), SafePath::MAX_LEN);
    accepts(&exact);
    let over = format!("z{exact}");
    rejects(&over, NameError::TooLong { len: 1025 });
    rejects(&"/".repeat(5000), NameError::TooLong { len: 5000 });
}

#[test]
fn components_are_limited_in_number() {
    let at_limit = ["d"; SafePath::MAX_COMPONENTS].join("/");
    assert_eq!(accepts(&at_limit).components().count(), 32);
    let over = ["d"; SafePath::MAX_COMPONENTS + 1].join("/");
    rejects(&over, NameError::TooManyComponents { count: 33 });
}

#[test]
fn the_first_broken_rule_in_the_documented_order_is_reported() {
    rejects("/../con", NameError::Absolute);
    rejects("C:/../con", NameError::Prefix);
    rejects("a\0/..", NameError::ControlCharacter { ch: '\0' });
    rejects("../con", NameError::Parent);
    rejects("con./x", NameError::TrailingDotOrSpace);
    rejects("a:/con", NameError::Prefix);
    rejects("ab:/con", NameError::ForbiddenCharacter { ch: ':' });
}

#[test]
fn accessors_agree_with_the_name() {
    let safe: SafePath = "maps/карта/level1.bsp".parse().unwrap();
    assert_eq!(safe.as_str(), "maps/карта/level1.bsp");
    assert_eq!(safe.to_string(), "maps/карта/level1.bsp");
    assert_eq!(
        safe.components().collect::<Vec<_>>(),
        ["maps", "карта", "level1.bsp"]
    );
    assert_eq!(
        safe.join_to(Path::new("/srv/root")),
        Path::new("/srv/root")
            .join("maps")
            .join("карта")
            .join("level1.bsp")
    );
    assert_eq!(
        safe.to_path_buf(),
        Path::new("maps").join("карта").join("level1.bsp")
    );
    assert_eq!(
        "a\\b".parse::<SafePath>(),
        Err(NameError::Backslash),
        "FromStr is parse"
    );
    let (a, b) = (accepts("a/b"), accepts("a/c"));
    assert!(a < b);
    assert_ne!(accepts("Map.bsp"), accepts("map.bsp"));
}

#[test]
fn error_messages_never_echo_control_characters() {
    for name in ["\u{1b}[2J", "a\0b", "x\r\ny"] {
        let message = SafePath::parse(name).unwrap_err().to_string();
        assert!(
            !message.chars().any(char::is_control),
            "message {message:?} for {name:?}"
        );
    }
}

/// The content store serves only files whose relative path is a `SafePath`; the others are
/// skipped without an error.
#[cfg(unix)]
#[test]
fn content_store_skips_files_whose_relative_path_is_not_a_safe_path() {
    use std::os::unix::ffi::OsStrExt;
    let dir = CaseDir::new();
    let put = |rel: &Path, bytes: &[u8]| {
        let path = dir.0.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, bytes).unwrap();
    };
    let deepest = format!("{}f32", "d/".repeat(31));
    let too_deep = format!("{}f33", "d/".repeat(32));
    put(Path::new("maps/ok.bsp"), b"ok");
    put(Path::new(&deepest), b"32 components");
    put(Path::new(&too_deep), b"33 components");
    put(Path::new("maps/con.txt"), b"a device name");
    put(
        Path::new("aux/inner.map"),
        b"under a device-named directory",
    );
    put(Path::new("trailing."), b"a trailing dot");
    put(Path::new("stream:x"), b"a colon");
    put(Path::new("back\\slash"), b"a backslash");
    put(Path::new("ctl\u{1b}"), b"a control character");
    put(
        Path::new(OsStr::from_bytes(b"latin1-\xe9.map")),
        b"not UTF-8",
    );
    let store = ContentStore::open(&dir.0).unwrap();
    let listed: Vec<&Path> = store.objects().map(|o| o.path.as_path()).collect();
    assert_eq!(listed, [Path::new(&deepest), Path::new("maps/ok.bsp")]);
    assert!(store.get(&ObjectId::md5_of(b"ok")).is_some());
    for skipped in [
        &b"33 components"[..],
        b"a device name",
        b"not UTF-8",
        b"a colon",
    ] {
        assert!(store.get(&ObjectId::md5_of(skipped)).is_none());
    }
}

// ---- The containment property -----------------------------------------------------------

/// Pieces hostile names are made of: separators of both platforms, dots, drive and stream
/// colons, device names, NUL and other controls, tildes, trailing spaces, multi-byte letters.
const PIECES: &[&str] = &[
    ".", "..", "...", "/", "//", "\\", "\\\\", ":", "C:", "c", "a", "Z", "x", "\0", "\n", "~", " ",
    "con", "NUL", "com1", "LPT¹", ".txt", "?", "*", "<", "|", "\"", "é", "я", "🗺", "$", "%",
];

/// Pieces that make good components, so that a fair share of the generated names is accepted
/// and the property is exercised, not just the rejections.
const TAME: &[&str] = &[
    "a", "b", "maps", "x", ".", "..", "con", "com10", "é", "я", "~", " ", "-", "_", ".bsp", "1",
];

fn hostile_name() -> impl Strategy<Value = String> {
    let free = prop::collection::vec(prop::sample::select(PIECES), 0..24).prop_map(|v| v.concat());
    let component =
        prop::collection::vec(prop::sample::select(TAME), 1..5).prop_map(|v| v.concat());
    let structured = prop::collection::vec(component, 1..6).prop_map(|v| v.join("/"));
    prop_oneof![free, structured]
}

/// What Windows would open as a device (an independent restatement of the rule, for the check).
fn windows_device(component: &str) -> bool {
    let stem = component.split('.').next().unwrap().trim_end_matches(' ');
    let upper = stem.to_ascii_uppercase();
    let mut devices: Vec<String> = ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", "CLOCK$"]
        .map(String::from)
        .to_vec();
    for prefix in ["COM", "LPT"] {
        for digit in "0123456789¹²³".chars() {
            devices.push(format!("{prefix}{digit}"));
        }
    }
    devices.contains(&upper)
}

/// The lexical property: `root` joined with the name is `root` followed by exactly the name's
/// components, each one normal, none of which Windows would read as a separator, prefix,
/// stream, parent, stripped name or device either.
fn check_lexically_inside(root: &Path, safe: &SafePath) -> Result<(), TestCaseError> {
    let joined = safe.join_to(root);
    let root_parts: Vec<Component> = root.components().collect();
    let parts: Vec<Component> = joined.components().collect();
    prop_assert!(
        parts.starts_with(&root_parts),
        "{joined:?} does not start with {root:?}"
    );
    let rest = &parts[root_parts.len()..];
    let names: Vec<&str> = safe.components().collect();
    prop_assert_eq!(
        rest.len(),
        names.len(),
        "components dropped or split: {:?}",
        joined
    );
    for (part, name) in rest.iter().zip(&names) {
        prop_assert_eq!(*part, Component::Normal(OsStr::new(name)));
        prop_assert!(!name.is_empty() && *name != "." && *name != "..");
        prop_assert!(!name.contains(['/', '\\', ':', '\0']), "{:?}", name);
        prop_assert!(!name.ends_with(['.', ' ']), "{:?}", name);
        prop_assert!(!windows_device(name), "{:?}", name);
    }
    Ok(())
}

/// A fresh directory per case, removed on drop.
struct CaseDir(PathBuf);

impl CaseDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("udpferry-safe-path-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        CaseDir(dir)
    }
}

impl Drop for CaseDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The file-system property: creating the file (and its parent directories) under a fresh root
/// puts it exactly where the lexical path says, inside the canonical root. A name the OS refuses
/// is skipped; an accepted name that lands elsewhere fails. The root sits four levels down in
/// the case's directory, so a broken parser's short escapes are still cleaned up.
fn check_created_inside(safe: &SafePath) -> Result<bool, TestCaseError> {
    let dir = CaseDir::new();
    let nested = dir.0.join("r1/r2/r3/root");
    fs::create_dir_all(&nested).unwrap();
    let root = fs::canonicalize(&nested).unwrap();
    let path = safe.join_to(&root);
    let created = path
        .parent()
        .map_or(Ok(()), fs::create_dir_all)
        .and_then(|()| fs::File::create(&path));
    if created.is_err() {
        return Ok(false);
    }
    let real = fs::canonicalize(&path).unwrap();
    prop_assert!(real.starts_with(&root), "{safe} escaped to {real:?}");
    prop_assert_eq!(real, path, "{} resolved elsewhere", safe);
    Ok(true)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn accepted_names_never_resolve_outside_their_root(name in hostile_name()) {
        let Ok(safe) = SafePath::parse(&name) else { return Ok(()) };
        prop_assert_eq!(safe.as_str(), name.as_str());
        for root in ["/srv/udpferry", "relative/root", "", "C:\\cache", "/"] {
            check_lexically_inside(Path::new(root), &safe)?;
        }
        if cfg!(unix) {
            check_created_inside(&safe)?;
        }
    }

    #[test]
    fn parse_never_panics_on_any_string(name in any::<String>()) {
        if let Ok(safe) = SafePath::parse(&name) {
            check_lexically_inside(Path::new("/srv/udpferry"), &safe)?;
        }
    }
}

/// Guards the property above against vacuity: the generator must produce accepted names (that
/// the file system also creates) as well as rejected ones.
#[test]
fn the_hostile_generator_yields_both_accepted_and_rejected_names() {
    let mut runner = TestRunner::deterministic();
    let strategy = hostile_name();
    let (mut accepted, mut created) = (0, 0);
    let cases = 500;
    for _ in 0..cases {
        let name = strategy.new_tree(&mut runner).unwrap().current();
        if let Ok(safe) = SafePath::parse(&name) {
            accepted += 1;
            check_lexically_inside(Path::new("/srv/udpferry"), &safe).unwrap();
            if cfg!(unix) && check_created_inside(&safe).unwrap() {
                created += 1;
            }
        }
    }
    assert!(
        accepted >= cases / 10 && accepted <= cases * 9 / 10,
        "{accepted} of {cases} accepted"
    );
    if cfg!(unix) {
        assert_eq!(created, accepted, "the OS refused names SafePath accepted");
    }
}
