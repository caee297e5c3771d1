//! What identifies one version of a file without reading it: the server's index and the
//! client's cache both decide "unchanged since it was hashed" by it.

use std::fs::Metadata;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A file modified this close to the moment it was hashed may change again without its timestamps
/// moving (file systems keep coarse clocks), so it is re-hashed when next needed.
pub(crate) const RACY_WINDOW: Duration = Duration::from_secs(3);

/// Size, modification time, and on Unix the status-change time and inode of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    size: u64,
    /// Nanoseconds since the Unix epoch (0 where the platform has no mtime).
    mtime_ns: u128,
    /// Status-change time: moves on every write, even when the mtime is set back.
    #[cfg(unix)]
    ctime: (i64, i64),
    /// A file replaced by another (a rename over it) has another inode.
    #[cfg(unix)]
    ino: u64,
}

impl Stamp {
    pub(crate) fn of(meta: &Metadata) -> Self {
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt;
        Stamp {
            size: meta.len(),
            mtime_ns: meta
                .modified()
                .ok()
                .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos()),
            #[cfg(unix)]
            ctime: (meta.ctime(), meta.ctime_nsec()),
            #[cfg(unix)]
            ino: meta.ino(),
        }
    }

    /// The file's size when stamped.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// True when the file may still change within its timestamps' resolution.
    pub(crate) fn is_racy(&self) -> bool {
        let modified = UNIX_EPOCH + Duration::from_nanos(self.mtime_ns.min(u64::MAX.into()) as u64);
        SystemTime::now()
            .duration_since(modified)
            .map_or(true, |age| age < RACY_WINDOW)
    }

    /// One line of text, for the cache's `<id>.verified` files: read back by
    /// [`decode`](Self::decode).
    pub(crate) fn encode(&self) -> String {
        #[cfg(unix)]
        let extra = format!(" ctime={}.{} ino={}", self.ctime.0, self.ctime.1, self.ino);
        #[cfg(not(unix))]
        let extra = String::new();
        format!(
            "udpferry-verified v1 size={} mtime_ns={}{extra}\n",
            self.size, self.mtime_ns
        )
    }

    /// The stamp [`encode`](Self::encode) wrote, or `None` for anything else (a damaged stamp
    /// file only costs a re-hash).
    pub(crate) fn decode(text: &str) -> Option<Self> {
        let mut words = text.strip_suffix('\n')?.split(' ');
        if words.next()? != "udpferry-verified" || words.next()? != "v1" {
            return None;
        }
        let mut field = |name: &str| words.next()?.strip_prefix(name)?.strip_prefix('=');
        let size = field("size")?.parse().ok()?;
        let mtime_ns = field("mtime_ns")?.parse().ok()?;
        #[cfg(unix)]
        let (ctime, ino) = {
            let (s, ns) = field("ctime")?.split_once('.')?;
            (
                (s.parse().ok()?, ns.parse().ok()?),
                field("ino")?.parse().ok()?,
            )
        };
        if words.next().is_some() {
            return None;
        }
        Some(Stamp {
            size,
            mtime_ns,
            #[cfg(unix)]
            ctime,
            #[cfg(unix)]
            ino,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_reads_back_and_garbage_does_not() {
        let meta = std::fs::metadata(std::env::current_exe().unwrap()).unwrap();
        let stamp = Stamp::of(&meta);
        assert_eq!(Stamp::decode(&stamp.encode()), Some(stamp));
        let text = stamp.encode();
        for bad in [
            "",
            "udpferry-verified v1\n",
            &text[..text.len() - 1],
            &text.replace("size=", "size=x"),
            &format!("{} extra\n", text.trim_end()),
        ] {
            assert_eq!(Stamp::decode(bad), None, "{bad:?}");
        }
    }
}
