//! Names that are safe to put under a root directory: [`SafePath`].
//!
//! Every name the store turns into a file-system path goes through [`SafePath::parse`] first:
//! the cache's `<hex>`, `<hex>.part`, `<hex>.journal` and `<hex>.journal.tmp`, and each file the
//! [`ContentStore`](super::ContentStore) serves (its path relative to the served directory).
//! Names are checked, never normalised: `./a` and `a//b` are errors, not `a` and `a/b`. The
//! rules and the reasons for them are on [`SafePath`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A validated relative path: `/`-separated UTF-8 components that stay inside whatever root
/// they are joined to, on Linux, macOS and Windows alike, and name a plain file rather than a
/// device.
///
/// Get one from [`parse`](Self::parse) (or `str::parse`) for every name that came from outside
/// the program (a peer, a manifest, a journal, a directory listing) before it touches the file
/// system, then turn it into a path with [`join_to`](Self::join_to). It holds the name exactly
/// as given, and compares and sorts by that text.
///
/// # Rules
///
/// A name is `/`-separated UTF-8 components, relative to a root. It is rejected when it:
///
/// 1. is empty;
/// 2. is longer than [`MAX_LEN`](Self::MAX_LEN) (1024) bytes;
/// 3. contains a control character (below U+0020, or U+007F), NUL included;
/// 4. starts with a drive letter (`C:`, `c:foo`) or a UNC or device prefix (`\\server`,
///    `\\?\C:\x`, `//server`);
/// 5. is absolute (starts with `/` or `\`);
/// 6. contains a backslash anywhere (a separator on Windows);
/// 7. has more than [`MAX_COMPONENTS`](Self::MAX_COMPONENTS) (32) components;
/// 8. has an empty component (`a//b`, a trailing `/`);
/// 9. has a `.` component (`./a`, `a/./b`);
/// 10. has a `..` component (`..`, `a/../b`);
/// 11. has a component longer than [`MAX_COMPONENT_LEN`](Self::MAX_COMPONENT_LEN) (255) bytes;
/// 12. has a component with a character Windows forbids in names: `<>:"|?*` (`:` also opens
///     NTFS alternate data streams);
/// 13. has a component ending in `.` or space, which Windows strips, so that `a.` and `a` would
///     be one file there (`...` is rejected by this rule);
/// 14. has a component whose stem (the part before the first `.`, trailing spaces ignored) is a
///     Windows device name, in any case: `CON`, `PRN`, `AUX`, `NUL`, `CONIN$`, `CONOUT$`,
///     `CLOCK$`, `COM0`-`COM9`, `LPT0`-`LPT9`, and `COM`/`LPT` with `¹`, `²` or `³`. So `con`,
///     `CON.txt` and `com1.tar.gz` are rejected; `console.txt` and `com10` are accepted.
///
/// When a name breaks several rules, the [`NameError`] is the first broken rule in this list.
///
/// **Rejected, not normalised.** `a//b`, `./a`, `a/./b` and a trailing `/` could be tidied into
/// a valid name, but they are refused instead: a name is accepted exactly as written, so
/// [`as_str`](Self::as_str) gives back the input, two different accepted strings are two
/// different paths, and there is no normalisation step to get wrong. Whoever produces names
/// (a manifest writer, a directory walk) produces them in this one form.
///
/// # What it does not promise
///
/// - Containment is lexical. If the root itself holds a symbolic link (or a Windows junction),
///   a name through it can still reach outside; the code that creates the root's contents must
///   not create links from untrusted names.
/// - Two different names can be the same file on a case-insensitive file system (`Map.bsp` and
///   `map.bsp`) or one that normalises Unicode (macOS). A caller that needs names to be distinct
///   files must check that itself.
/// - Names the local user types (the CLI's `-o PATH`, `--cache DIR`, the directory given to
///   `serve`) are not `SafePath`s: the user may write anywhere they can write anyway. The type is
///   for names that come from the network or from stored state.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SafePath {
    /// The validated name, exactly as given to `parse`.
    text: String,
}

/// Why [`SafePath::parse`] refused a name: one variant per rule listed on [`SafePath`].
///
/// The messages do not repeat the name (it may hold control characters); log it yourself with
/// `{:?}` if you need it. The usual reaction is to refuse whatever carried the name (a manifest,
/// a request) rather than to repair it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty.
    #[error("the name is empty: give a relative path such as `maps/level1.bsp`")]
    Empty,
    /// The name is longer than [`SafePath::MAX_LEN`] bytes.
    #[error(
        "the name is {len} bytes long, more than the limit of {} bytes",
        SafePath::MAX_LEN
    )]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The name holds a control character (below U+0020, or U+007F), NUL included.
    #[error("the name contains the control character {ch:?}, which no file name may hold")]
    ControlCharacter {
        /// The first such character.
        ch: char,
    },
    /// The name starts with a drive letter (`C:`) or a UNC or device prefix (`\\server`,
    /// `\\?\`, `//server`).
    #[error("the name starts with a drive letter or network prefix: names must be relative to their root")]
    Prefix,
    /// The name starts with `/` or `\`.
    #[error(
        "the name is absolute (it starts with `/` or `\\`): names must be relative to their root"
    )]
    Absolute,
    /// The name holds a backslash, which Windows reads as a separator.
    #[error("the name contains a backslash: separate components with `/`")]
    Backslash,
    /// The name has more than [`SafePath::MAX_COMPONENTS`] components.
    #[error(
        "the name has {count} components, more than the limit of {}",
        SafePath::MAX_COMPONENTS
    )]
    TooManyComponents {
        /// How many it has.
        count: usize,
    },
    /// A component is empty (`a//b`, or a trailing `/`).
    #[error("the name has an empty component (two slashes in a row, or a slash at the end)")]
    EmptyComponent,
    /// A component is `.`.
    #[error("the name has a `.` component: write the path without it")]
    DotComponent,
    /// A component is `..`.
    #[error("the name has a `..` component, which would leave its directory")]
    Parent,
    /// A component is longer than [`SafePath::MAX_COMPONENT_LEN`] bytes.
    #[error(
        "a component of the name is {len} bytes long, more than the limit of {} bytes",
        SafePath::MAX_COMPONENT_LEN
    )]
    ComponentTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// A component holds one of `<>:"|?*`, which Windows forbids in file names.
    #[error("the name contains {ch:?}, which Windows does not allow in file names")]
    ForbiddenCharacter {
        /// The first such character.
        ch: char,
    },
    /// A component ends in `.` or a space, which Windows strips from file names.
    #[error("a component of the name ends in a dot or a space, which Windows strips")]
    TrailingDotOrSpace,
    /// A component's stem is a Windows device name (`CON`, `nul.txt`, `com1.tar.gz`, ...).
    #[error("a component of the name is a Windows device name (such as CON, NUL, COM1 or LPT1, with or without an extension)")]
    ReservedName,
}

/// Characters Windows forbids in file names (besides control characters and separators).
const WINDOWS_FORBIDDEN: &[char] = &['<', '>', ':', '"', '|', '?', '*'];

/// Device names without a number, upper case.
const DEVICES: &[&str] = &["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", "CLOCK$"];

impl SafePath {
    /// Longest accepted name, in bytes.
    pub const MAX_LEN: usize = 1024;
    /// Longest accepted component, in bytes (the limit of most file systems).
    pub const MAX_COMPONENT_LEN: usize = 255;
    /// Most components an accepted name may have.
    pub const MAX_COMPONENTS: usize = 32;

    /// Checks `name` against every rule listed on [`SafePath`] and keeps it if it passes.
    ///
    /// Call it on each name before it reaches the file system; on `Ok`, build the path with
    /// [`join_to`](Self::join_to). On `Err`, refuse the name (and usually whatever carried it).
    /// Nothing is normalised: `./a` and `a//b` are errors, not `a` and `a/b`. Never panics, and
    /// takes time linear in the name's length.
    pub fn parse(name: &str) -> Result<SafePath, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > Self::MAX_LEN {
            return Err(NameError::TooLong { len: name.len() });
        }
        if let Some(ch) = name.chars().find(|&c| c < ' ' || c == '\u{7f}') {
            return Err(NameError::ControlCharacter { ch });
        }
        let bytes = name.as_bytes();
        let is_slash = |b: u8| b == b'/' || b == b'\\';
        let unc = bytes.len() >= 2 && is_slash(bytes[0]) && is_slash(bytes[1]);
        let drive = bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':';
        if unc || drive {
            return Err(NameError::Prefix);
        }
        if is_slash(bytes[0]) {
            return Err(NameError::Absolute);
        }
        if name.contains('\\') {
            return Err(NameError::Backslash);
        }
        let count = name.split('/').count();
        if count > Self::MAX_COMPONENTS {
            return Err(NameError::TooManyComponents { count });
        }
        name.split('/').try_for_each(check_component)?;
        Ok(SafePath {
            text: name.to_owned(),
        })
    }

    /// The name as given to [`parse`](Self::parse), components separated by `/`. Use it where
    /// the name is stored or sent (a manifest, a log line).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The components in order: at least one, each non-empty, none containing `/`.
    pub fn components(&self) -> impl Iterator<Item = &str> + '_ {
        self.text.split('/')
    }

    /// The file this name stands for under `root`: `root` joined with each component in turn.
    /// Call it at the moment the file is opened or created; the result is `root` followed by
    /// only normal components, so it is inside `root` as far as the path's text goes (see [`SafePath`] on links).
    pub fn join_to(&self, root: &Path) -> PathBuf {
        let mut path = root.to_path_buf();
        for component in self.components() {
            path.push(component);
        }
        path
    }

    /// The name as a relative path with the platform's separator (`join_to` an empty root), for
    /// APIs that want a [`Path`] relative to some root.
    pub fn to_path_buf(&self) -> PathBuf {
        self.join_to(Path::new(""))
    }
}

/// Rules 8 to 14 for one component.
fn check_component(c: &str) -> Result<(), NameError> {
    match c {
        "" => return Err(NameError::EmptyComponent),
        "." => return Err(NameError::DotComponent),
        ".." => return Err(NameError::Parent),
        _ => {}
    }
    if c.len() > SafePath::MAX_COMPONENT_LEN {
        return Err(NameError::ComponentTooLong { len: c.len() });
    }
    if let Some(ch) = c.chars().find(|ch| WINDOWS_FORBIDDEN.contains(ch)) {
        return Err(NameError::ForbiddenCharacter { ch });
    }
    if c.ends_with('.') || c.ends_with(' ') {
        return Err(NameError::TrailingDotOrSpace);
    }
    if is_windows_device(c) {
        return Err(NameError::ReservedName);
    }
    Ok(())
}

/// True when Windows would open a device for `component`: its stem (before the first `.`,
/// trailing spaces dropped) is a device name, ignoring ASCII case.
fn is_windows_device(component: &str) -> bool {
    let stem = component.split('.').next().unwrap_or(component);
    let stem = stem.trim_end_matches(' ');
    if DEVICES.iter().any(|d| stem.eq_ignore_ascii_case(d)) {
        return true;
    }
    // COM and LPT followed by exactly one digit, ASCII or superscript one to three.
    let (Some(prefix), Some(number)) = (stem.get(..3), stem.get(3..)) else {
        return false;
    };
    let numbered = prefix.eq_ignore_ascii_case("COM") || prefix.eq_ignore_ascii_case("LPT");
    let mut chars = number.chars();
    let digit = matches!(chars.next(), Some('0'..='9' | '¹' | '²' | '³'));
    numbered && digit && chars.next().is_none()
}

impl fmt::Display for SafePath {
    /// Writes the name as given, with `/` separators.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for SafePath {
    type Err = NameError;

    /// Same as [`SafePath::parse`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SafePath::parse(s)
    }
}

impl AsRef<str> for SafePath {
    fn as_ref(&self) -> &str {
        &self.text
    }
}
