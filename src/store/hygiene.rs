//! Cache upkeep: what the cache holds ([`Cache::entries`]), removing what no download will use
//! ([`Cache::clean`]), and re-hashing the finished objects ([`Cache::verify_all`]). Each returns
//! a report whose `Display` is what `udpferry cache list|clean|verify` prints
//! (docs/ARCHITECTURE.md sections 6.9 and 8).
//!
//! Only names the cache itself makes (`<hex>` and `<hex>.<suffix>`, lowercase hex of 32 or 64
//! digits) are listed or touched: any other file in the directory is left alone, so a `--cache`
//! pointed at the wrong folder removes nothing of the user's.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, Metadata};
use std::io;
use std::time::{Duration, SystemTime};

use super::cache::{JOURNAL, JOURNAL_TMP, LOCK, OBJECT, PART, VERIFIED};
use super::journal::{self, UNKNOWN_SIZE};
use super::{id_of_file, lock, Cache, StoreError};
use crate::id::ObjectId;

/// How long [`Cache::clean`] keeps a partial download that nothing touched, unless told
/// otherwise: a week (`udpferry cache clean` without `--older-than`).
pub const CLEAN_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The suffixes after `<hex>`, the finished object's (empty) last: it matches every name.
const SUFFIXES: [&str; 6] = [JOURNAL_TMP, JOURNAL, VERIFIED, PART, LOCK, OBJECT];

/// The object and suffix of a file name the cache makes, or `None` for any other name.
fn parse_name(name: &str) -> Option<(ObjectId, &'static str)> {
    SUFFIXES.iter().find_map(|&suffix| {
        let hex = name.strip_suffix(suffix)?;
        let algorithm = match hex.len() {
            32 => "md5",
            64 => "sha256",
            _ => return None,
        };
        if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        Some((format!("{algorithm}:{hex}").parse().ok()?, suffix))
    })
}

/// The files the cache holds for one object.
#[derive(Default)]
struct Files {
    object: Option<Metadata>,
    part: Option<Metadata>,
    journal: Option<Metadata>,
    tmp: Option<Metadata>,
    verified: Option<Metadata>,
    lock: Option<Metadata>,
}

impl Files {
    /// How long the partial download has not been written: the age of the newer of its
    /// `.part` and its journal.
    fn untouched_for(&self, now: SystemTime) -> Duration {
        [&self.part, &self.journal]
            .into_iter()
            .flatten()
            .map(|m| age_of(m, now))
            .min()
            .unwrap_or_default()
    }

    fn slot(&mut self, suffix: &str) -> &mut Option<Metadata> {
        match suffix {
            PART => &mut self.part,
            JOURNAL => &mut self.journal,
            JOURNAL_TMP => &mut self.tmp,
            VERIFIED => &mut self.verified,
            LOCK => &mut self.lock,
            _ => &mut self.object,
        }
    }

    /// Only the finished object (and its stamp): nothing for `clean` to look at.
    fn only_finished(&self) -> bool {
        self.object.is_some()
            && self.part.is_none()
            && self.journal.is_none()
            && self.tmp.is_none()
            && self.lock.is_none()
    }
}

/// Time since `meta`'s modification (zero for a time in the future or none at all).
fn age_of(meta: &Metadata, now: SystemTime) -> Duration {
    meta.modified()
        .ok()
        .and_then(|m| now.duration_since(m).ok())
        .unwrap_or_default()
}

/// `45s`, `12m`, `5h`, `3d`: the largest unit that fits at least once.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

impl Cache {
    /// Every file the cache made, grouped by object, in the order of the objects' hex names.
    fn scan(&self) -> Result<BTreeMap<String, (ObjectId, Files)>, StoreError> {
        let root = self.root();
        let read = |e| StoreError::io("read cache directory", root, e);
        let mut found: BTreeMap<String, (ObjectId, Files)> = BTreeMap::new();
        for item in fs::read_dir(root).map_err(read)? {
            let item = item.map_err(read)?;
            let name = item.file_name();
            let Some((id, suffix)) = name.to_str().and_then(parse_name) else {
                continue;
            };
            // A file removed since the directory was read is simply not there.
            let Ok(meta) = fs::symlink_metadata(item.path()) else {
                continue;
            };
            let (_, files) = found
                .entry(id.to_hex())
                .or_insert_with(|| (id, Files::default()));
            *files.slot(suffix) = Some(meta);
        }
        Ok(found)
    }

    /// The files of `id` as they are now.
    fn files_of(&self, id: &ObjectId) -> Files {
        let mut files = Files::default();
        for suffix in SUFFIXES {
            *files.slot(suffix) = fs::symlink_metadata(self.entry(id, suffix)).ok();
        }
        files
    }

    /// Bytes the journal of `id`'s partial download vouches for, and the object's size if it
    /// records one; nothing when the journal is missing or would not be trusted by
    /// [`begin`](Self::begin).
    fn progress_of(&self, id: &ObjectId, part_len: u64) -> (u64, Option<u64>) {
        let Ok(bytes) = fs::read(self.entry(id, JOURNAL)) else {
            return (0, None);
        };
        match journal::decode(&bytes) {
            Ok((jid, size, ranges))
                if jid == *id && ranges.iter().next_back().is_none_or(|r| r.end <= part_len) =>
            {
                (ranges.covered(), (size != UNKNOWN_SIZE).then_some(size))
            }
            _ => (0, None),
        }
    }

    /// What the cache holds: finished objects, partial downloads (with the bytes their
    /// journals vouch for) and stray files that [`clean`](Self::clean) would remove, with sizes
    /// and ages. Reads only; takes no lock.
    pub fn entries(&self) -> Result<CacheListing, StoreError> {
        let now = SystemTime::now();
        let mut entries = Vec::new();
        for (hex, (id, files)) in self.scan()? {
            let stray = |suffix: &str, meta: &Metadata, what| CacheEntry::Stray {
                name: format!("{hex}{suffix}"),
                bytes: meta.len(),
                age: age_of(meta, now),
                what,
            };
            match &files.object {
                Some(m) if m.is_file() => entries.push(CacheEntry::Complete {
                    id,
                    size: m.len(),
                    age: age_of(m, now),
                }),
                Some(m) => entries.push(stray(OBJECT, m, "not a regular file (left alone)")),
                None => {}
            }
            let in_use = files.lock.is_some() && lock::is_held(&self.entry(&id, LOCK));
            match &files.part {
                Some(part) => {
                    let (held, total) = self.progress_of(&id, part.len());
                    let touched = files.untouched_for(now);
                    entries.push(CacheEntry::Partial {
                        id,
                        held,
                        total,
                        on_disk: part.len(),
                        age: touched,
                        in_use,
                    });
                }
                None => {
                    if let Some(m) = &files.journal {
                        entries.push(stray(JOURNAL, m, "journal without a partial download"));
                    }
                }
            }
            if !in_use {
                if let Some(m) = &files.tmp {
                    entries.push(stray(JOURNAL_TMP, m, "unfinished journal update"));
                }
                if let Some(m) = &files.lock {
                    entries.push(stray(LOCK, m, "lock file of a download that ended"));
                }
            }
            if let (Some(m), None) = (&files.verified, &files.object) {
                entries.push(stray(VERIFIED, m, "stamp of an entry that is gone"));
            }
        }
        Ok(CacheListing { entries })
    }

    /// Removes what no download will use: partial downloads nothing touched (their file or
    /// journal) for `max_age` or longer ([`CLEAN_AGE`] is a sensible default), partial
    /// downloads that hold no bytes at all, journals without a partial download, unfinished
    /// journal updates (`<hex>.journal.tmp`), stamps of entries that are gone, and lock files
    /// left by downloads that ended. Finished objects are never removed here (see
    /// [`verify_all`](Self::verify_all) for damaged ones), nor is anything of an object whose
    /// download is running (its lock is held), nor any file whose name the cache did not make.
    pub fn clean(&self, max_age: Duration) -> Result<CleanReport, StoreError> {
        let mut report = CleanReport {
            removed: Vec::new(),
            kept: 0,
            in_use: 0,
            max_age,
        };
        for (_, (id, seen)) in self.scan()? {
            if seen.only_finished() {
                continue;
            }
            let Some(held) = self.try_lock(&id)? else {
                report.in_use += 1;
                continue;
            };
            let files = self.files_of(&id);
            let now = SystemTime::now();
            let mut remove = |suffix: &str, why: &dyn Fn() -> String| -> Result<(), StoreError> {
                let path = self.entry(&id, suffix);
                let Ok(meta) = fs::symlink_metadata(&path) else {
                    return Ok(());
                };
                if !meta.is_file() {
                    return Ok(());
                }
                match fs::remove_file(&path) {
                    Ok(()) => {
                        report.removed.push(Removed {
                            name: format!("{}{suffix}", id.to_hex()),
                            bytes: meta.len(),
                            why: why(),
                        });
                        Ok(())
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(StoreError::io("remove", &path, e)),
                }
            };
            let tmp_why = || "unfinished journal update".to_string();
            match files.part.as_ref().filter(|m| m.is_file()) {
                Some(part) => {
                    let touched = files.untouched_for(now);
                    let why = if part.len() == 0 {
                        Some("partial download that holds nothing".to_string())
                    } else if touched >= max_age {
                        Some(format!("partial download untouched for {}", human(touched)))
                    } else {
                        None
                    };
                    if let Some(why) = why {
                        remove(PART, &|| why.clone())?;
                        remove(JOURNAL, &|| "journal of a removed partial download".to_string())?;
                    } else {
                        report.kept += 1;
                    }
                    remove(JOURNAL_TMP, &tmp_why)?;
                }
                None => {
                    remove(JOURNAL, &|| "journal without a partial download".to_string())?;
                    remove(JOURNAL_TMP, &tmp_why)?;
                }
            }
            if files.object.is_none() {
                remove(VERIFIED, &|| "stamp of an entry that is gone".to_string())?;
            }
            // The lock file was there before this call took it: a download that ended left it.
            // Released, the lock removes it (on Unix).
            drop(held);
            if seen.lock.is_some() && cfg!(unix) {
                report.removed.push(Removed {
                    name: format!("{}{LOCK}", id.to_hex()),
                    bytes: 0,
                    why: "lock file of a download that ended".to_string(),
                });
            }
        }
        Ok(report)
    }

    /// Re-hashes every finished object, however recently its stamp was checked (a change below
    /// the file system, such as bit rot, moves no stamp; see [`lookup`](Self::lookup)). An
    /// object whose bytes still hash to its name gets a fresh `<hex>.verified` record. One that
    /// does not, or cannot be read, is set aside as a partial download exactly as a download
    /// does when it meets a damaged entry ([`set_aside_damaged`](Self::set_aside_damaged)): it
    /// is never served again, and the next download of it keeps the blocks that still match
    /// the object's manifest; [`clean`](Self::clean) removes it after `max_age` if none comes.
    /// Objects whose download is running are skipped. Partial downloads are not checked (their
    /// journals vouch for them, and the object's digest checks them at the end).
    pub fn verify_all(&self) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport {
            good: 0,
            good_bytes: 0,
            damaged: Vec::new(),
            in_use: 0,
        };
        for (_, (id, files)) in self.scan()? {
            let Some(object) = &files.object else {
                continue;
            };
            let Some(held) = self.try_lock(&id)? else {
                report.in_use += 1;
                continue;
            };
            let path = self.path_of(&id);
            let problem = if object.is_file() {
                let hashed = File::open(&path).and_then(|file| {
                    let len = file.metadata()?.len();
                    let actual = id_of_file(&file, len, &id)?;
                    Ok((file, len, actual))
                });
                match hashed {
                    Ok((file, len, actual)) if actual == id => {
                        self.record_verified(&id, &file, &path);
                        report.good += 1;
                        report.good_bytes += len;
                        None
                    }
                    Ok((_, _, actual)) => Some(format!("its bytes hash to {actual}")),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                    Err(e) => Some(format!("it cannot be read: {e}")),
                }
            } else {
                Some(format!("it is {}", super::node_kind(&object.file_type())))
            };
            if let Some(problem) = problem {
                let left_alone = self.set_aside_damaged(&id).err().map(|e| e.to_string());
                report.damaged.push(DamagedEntry {
                    id,
                    problem,
                    left_alone,
                });
            }
            drop(held);
        }
        Ok(report)
    }
}

/// One line of [`Cache::entries`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheEntry {
    /// A finished object (`<hex>`). Whether it is still intact is for
    /// [`Cache::lookup`] or [`Cache::verify_all`] to say.
    Complete {
        /// The object.
        id: ObjectId,
        /// Its size.
        size: u64,
        /// Time since its file was modified.
        age: Duration,
    },
    /// A partial download (`<hex>.part`).
    Partial {
        /// The object.
        id: ObjectId,
        /// Bytes its journal vouches for: what the next download resumes from.
        held: u64,
        /// The object's size, when the journal records it.
        total: Option<u64>,
        /// Size of the partial file.
        on_disk: u64,
        /// Time since the partial file or its journal was last written.
        age: Duration,
        /// A running download holds its lock.
        in_use: bool,
    },
    /// A file no download will use, which [`Cache::clean`] removes (unless it is not a
    /// regular file: that is left alone).
    Stray {
        /// Its file name in the cache directory.
        name: String,
        /// Its size.
        bytes: u64,
        /// Time since it was modified.
        age: Duration,
        /// What it is, in words.
        what: &'static str,
    },
}

/// `complete <id> <bytes> bytes, <age> old`, `partial <id> <held>/<total or ?> bytes, <age>
/// old[, in use]` or `stray <name> <bytes> bytes, <age> old: <what>`.
impl fmt::Display for CacheEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheEntry::Complete { id, size, age } => {
                write!(f, "complete {id} {size} bytes, {} old", human(*age))
            }
            CacheEntry::Partial {
                id,
                held,
                total,
                age,
                in_use,
                ..
            } => {
                let total = total.map_or("?".to_string(), |t| t.to_string());
                write!(f, "partial {id} {held}/{total} bytes, {} old", human(*age))?;
                if *in_use {
                    f.write_str(", in use")?;
                }
                Ok(())
            }
            CacheEntry::Stray {
                name,
                bytes,
                age,
                what,
            } => write!(f, "stray {name} {bytes} bytes, {} old: {what}", human(*age)),
        }
    }
}

/// What [`Cache::entries`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CacheListing {
    /// One per finished object, partial download and stray file, in the order of the objects'
    /// hex names.
    pub entries: Vec<CacheEntry>,
}

/// One line per entry, then `<n> complete (<bytes> bytes), <n> partial (<bytes> bytes on
/// disk), <n> stray (<bytes> bytes)`.
impl fmt::Display for CacheListing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (mut complete, mut partial, mut stray) = ((0, 0), (0, 0), (0, 0));
        for e in &self.entries {
            writeln!(f, "{e}")?;
            let (count, bytes) = match e {
                CacheEntry::Complete { size, .. } => (&mut complete, size),
                CacheEntry::Partial { on_disk, .. } => (&mut partial, on_disk),
                CacheEntry::Stray { bytes, .. } => (&mut stray, bytes),
            };
            count.0 += 1;
            count.1 += bytes;
        }
        write!(
            f,
            "{} complete ({} bytes), {} partial ({} bytes on disk), {} stray ({} bytes)",
            complete.0, complete.1, partial.0, partial.1, stray.0, stray.1
        )
    }
}

/// A file [`Cache::clean`] removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// Its file name in the cache directory.
    pub name: String,
    /// Its size.
    pub bytes: u64,
    /// Why it went, in words.
    pub why: String,
}

/// What [`Cache::clean`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CleanReport {
    /// The files removed.
    pub removed: Vec<Removed>,
    /// Partial downloads kept: touched within `max_age`.
    pub kept: usize,
    /// Objects skipped because a running download holds their lock.
    pub in_use: usize,
    /// The age the call was given.
    pub max_age: Duration,
}

/// `removed <name> (<bytes> bytes): <why>` per file, then `removed <n> files (<bytes> bytes);
/// kept <n> partial downloads touched within <age>[; skipped <n> in use]`.
impl fmt::Display for CleanReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.removed {
            writeln!(f, "removed {} ({} bytes): {}", r.name, r.bytes, r.why)?;
        }
        let bytes: u64 = self.removed.iter().map(|r| r.bytes).sum();
        write!(
            f,
            "removed {} files ({bytes} bytes); kept {} partial downloads touched within {}",
            self.removed.len(),
            self.kept,
            human(self.max_age)
        )?;
        if self.in_use > 0 {
            write!(f, "; skipped {} in use", self.in_use)?;
        }
        Ok(())
    }
}

/// A finished object [`Cache::verify_all`] found damaged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedEntry {
    /// The object.
    pub id: ObjectId,
    /// What is wrong, in words.
    pub problem: String,
    /// Why it could not be set aside (it is not a regular file, say); `None` when it was.
    pub left_alone: Option<String>,
}

/// What [`Cache::verify_all`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Finished objects that still hash to their names.
    pub good: usize,
    /// Their bytes.
    pub good_bytes: u64,
    /// Finished objects that do not, each set aside (or left alone, and why).
    pub damaged: Vec<DamagedEntry>,
    /// Objects skipped because a running download holds their lock.
    pub in_use: usize,
}

/// `damaged <id>: <problem>; set aside as <hex>.part for the next download to repair` (or `;
/// left in place: <why>`) per damaged object, then `verified <n> complete entries (<bytes>
/// bytes): <n> good, <n> damaged[, <n> skipped in use]`.
impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.damaged {
            write!(f, "damaged {}: {}; ", d.id, d.problem)?;
            match &d.left_alone {
                None => writeln!(
                    f,
                    "set aside as {}{PART} for the next download to repair",
                    d.id.to_hex()
                )?,
                Some(why) => writeln!(f, "left in place: {why}")?,
            }
        }
        write!(
            f,
            "verified {} complete entries ({} bytes): {} good, {} damaged",
            self.good + self.damaged.len(),
            self.good_bytes,
            self.good,
            self.damaged.len()
        )?;
        if self.in_use > 0 {
            write!(f, ", {} skipped in use", self.in_use)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_the_cache_makes_are_recognised() {
        let md5 = ObjectId::md5_of(b"map");
        let sha = ObjectId::sha256_of(b"map");
        for suffix in SUFFIXES {
            let name = format!("{}{suffix}", md5.to_hex());
            assert_eq!(parse_name(&name), Some((md5, suffix)), "{name}");
            let name = format!("{}{suffix}", sha.to_hex());
            assert_eq!(parse_name(&name), Some((sha, suffix)), "{name}");
        }
        let upper = md5.to_hex().to_uppercase();
        for other in [
            "notes.txt",
            upper.as_str(),
            &format!("{}.bak", md5.to_hex()),
            &format!("{}.part", &md5.to_hex()[1..]),
            &format!("x{}", md5.to_hex()),
        ] {
            assert_eq!(parse_name(other), None, "{other}");
        }
    }

    #[test]
    fn ages_print_in_the_largest_unit_that_fits() {
        let s = Duration::from_secs;
        assert_eq!(human(s(0)), "0s");
        assert_eq!(human(s(59)), "59s");
        assert_eq!(human(s(60)), "1m");
        assert_eq!(human(s(3599)), "59m");
        assert_eq!(human(s(7200)), "2h");
        assert_eq!(human(CLEAN_AGE), "7d");
    }
}
