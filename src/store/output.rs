//! Where a verified object may be written: the `-o` path of a download and every file a bundle
//! installs.
//!
//! An object is written next to its destination and renamed over it, so whatever node sits at
//! the destination is replaced. That is right for a regular file (an older map) and wrong for
//! everything else: renaming over `/dev/full`, a FIFO a game reads, a socket or a directory
//! destroys what is not ours. [`resolve_target`] decides, before anything is written, which path
//! the rename will replace:
//!
//! - nothing there: the path itself;
//! - a regular file: the path itself;
//! - a symbolic link: the link is followed (to its final target, through chains of links) and the
//!   file it points to is replaced, so the link stays a link; with `within`, a link is followed
//!   only to a target inside that directory (bundle files never escape their bundle);
//! - a directory, device, FIFO or socket: refused with [`StoreError::NotAFile`], the node untouched.

use std::fs::{self, FileType};
use std::io;
use std::path::{Path, PathBuf};

use super::StoreError;

/// Links followed before giving up (Linux's own limit for path resolution is 40).
const MAX_LINKS: usize = 40;

/// What kind of node `file_type` is, in words for an error message ("a directory", ...).
pub fn node_kind(file_type: &FileType) -> &'static str {
    if file_type.is_dir() {
        return "a directory";
    }
    if file_type.is_symlink() {
        return "a symbolic link";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_char_device() {
            return "a character device";
        }
        if file_type.is_block_device() {
            return "a block device";
        }
        if file_type.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if file_type.is_socket() {
            return "a socket";
        }
    }
    if file_type.is_file() {
        return "a regular file";
    }
    "not a regular file"
}

/// The path an object written to `dest` replaces: `dest` itself when nothing or a regular file
/// is there, the final target of a symbolic link at `dest` (which must itself be nothing or a
/// regular file). Anything else is refused with [`StoreError::NotAFile`] naming `dest` and what
/// it is. With `within`, a link whose target lies outside that directory is refused with
/// [`StoreError::LinkOutside`]. Call it before writing; write the temporary file in the
/// returned path's directory and rename it over the returned path.
pub fn resolve_target(dest: &Path, within: Option<&Path>) -> Result<PathBuf, StoreError> {
    let mut at = dest.to_path_buf();
    for _ in 0..=MAX_LINKS {
        let meta = match fs::symlink_metadata(&at) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return checked_within(dest, at, within)
            }
            Err(e) => return Err(StoreError::io("inspect", &at, e)),
        };
        let kind = meta.file_type();
        if kind.is_symlink() {
            let link = fs::read_link(&at).map_err(|e| StoreError::io("read link", &at, e))?;
            at = match at.parent() {
                Some(parent) if link.is_relative() => parent.join(link),
                _ => link,
            };
            continue;
        }
        if kind.is_file() {
            return checked_within(dest, at, within);
        }
        // Named as the caller gave it; through a link, the kind is its target's.
        return Err(StoreError::NotAFile {
            path: dest.to_path_buf(),
            kind: node_kind(&kind),
        });
    }
    Err(StoreError::io(
        "follow links from",
        dest,
        io::Error::other("too many levels of symbolic links"),
    ))
}

/// `target` when no link was followed (it is `dest`), or when it lies inside `within`.
fn checked_within(
    dest: &Path,
    target: PathBuf,
    within: Option<&Path>,
) -> Result<PathBuf, StoreError> {
    let Some(dir) = within else {
        return Ok(target);
    };
    if target == dest {
        return Ok(target);
    }
    // The target's directory must exist for the rename anyway; compare real paths.
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let inside = match (fs::canonicalize(parent), fs::canonicalize(dir)) {
        (Ok(p), Ok(d)) => p.starts_with(d),
        _ => false,
    };
    if inside {
        Ok(target)
    } else {
        Err(StoreError::LinkOutside {
            path: dest.to_path_buf(),
            target,
        })
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "udpferry-output-{name}-{}-{:x}",
            std::process::id(),
            crate::random::random_u64()
        ));
        fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn nothing_or_a_file_is_the_target_itself() {
        let dir = temp("plain");
        let path = dir.join("map");
        assert_eq!(resolve_target(&path, None).unwrap(), path);
        fs::write(&path, b"old").unwrap();
        assert_eq!(resolve_target(&path, None).unwrap(), path);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn links_are_followed_to_their_final_target() {
        let dir = temp("links");
        let real = dir.join("real");
        fs::write(&real, b"old").unwrap();
        std::os::unix::fs::symlink("real", dir.join("one")).unwrap();
        std::os::unix::fs::symlink(dir.join("one"), dir.join("two")).unwrap();
        assert_eq!(resolve_target(&dir.join("two"), None).unwrap(), real);
        // A dangling link: its target is created.
        std::os::unix::fs::symlink("new", dir.join("dangling")).unwrap();
        assert_eq!(
            resolve_target(&dir.join("dangling"), None).unwrap(),
            dir.join("new")
        );
        // A loop ends in an error, not a hang.
        std::os::unix::fs::symlink("loop_b", dir.join("loop_a")).unwrap();
        std::os::unix::fs::symlink("loop_a", dir.join("loop_b")).unwrap();
        assert!(resolve_target(&dir.join("loop_a"), None).is_err());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn directories_fifos_and_sockets_are_refused_by_name() {
        let dir = temp("nodes");
        let sub = dir.join("sub");
        fs::create_dir(&sub).unwrap();
        let sock = dir.join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        for (path, kind) in [(&sub, "a directory"), (&sock, "a socket")] {
            match resolve_target(path, None) {
                Err(StoreError::NotAFile { path: p, kind: k }) => {
                    assert_eq!((&p, k), (path, kind));
                }
                other => panic!("{} accepted: {other:?}", path.display()),
            }
        }
        // Through a link, too.
        std::os::unix::fs::symlink(&sub, dir.join("to_dir")).unwrap();
        assert!(matches!(
            resolve_target(&dir.join("to_dir"), None),
            Err(StoreError::NotAFile { .. })
        ));
        let dev = resolve_target(Path::new("/dev/null"), None);
        assert!(
            matches!(dev, Err(StoreError::NotAFile { kind, .. }) if kind == "a character device")
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn within_a_directory_links_may_not_leave_it() {
        let outside = temp("outside");
        let dir = temp("bundle");
        fs::write(outside.join("victim"), b"precious").unwrap();
        fs::write(dir.join("inner"), b"old").unwrap();
        std::os::unix::fs::symlink(outside.join("victim"), dir.join("escape")).unwrap();
        std::os::unix::fs::symlink("inner", dir.join("alias")).unwrap();
        assert!(matches!(
            resolve_target(&dir.join("escape"), Some(&dir)),
            Err(StoreError::LinkOutside { .. })
        ));
        assert_eq!(
            resolve_target(&dir.join("alias"), Some(&dir)).unwrap(),
            dir.join("inner")
        );
        fs::remove_dir_all(dir).unwrap();
        fs::remove_dir_all(outside).unwrap();
    }
}
