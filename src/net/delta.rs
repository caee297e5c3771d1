//! Delta downloads for [`Client::fetch`](super::Client::fetch): fetch the object's manifest,
//! copy every block found in local files into the partial download, and let the normal fetch
//! (a resume) bring the rest.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::engine::{lost, Engine, Expect, Job, Outcome, Sink, Verify};
use super::FetchError;
use crate::core::{ChunkSink, RangeSet, TransferError};
use crate::id::ObjectId;
use crate::store::manifest::{manifest_id, Manifest, Src};
use crate::store::{self, PartialFile};

/// Largest manifest accepted (a 4 GiB object's is under 1 MiB; 1 TiB's about 12 MiB).
pub(super) const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// Why no manifest came back from [`fetch_manifest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum NoManifest {
    /// The server has none (an older server, or it does not have the object).
    Refused,
    /// It did not arrive within the limit.
    TimedOut,
    /// It arrived but failed its check (altered on its way, or forged): worth asking again.
    /// The bytes that arrived, for a vote between copies ([`vote`]).
    Damaged(Vec<u8>),
}

/// Bytes that at least two of `copies` agree on at every position, from copies of one object
/// that each arrived with a few altered datagrams (at random places, so two copies are
/// practically never altered alike): the original, when no position was altered in all but
/// one copy. `None` when the copies differ in length or some position has no agreeing pair.
pub(super) fn vote(copies: &[Vec<u8>]) -> Option<Vec<u8>> {
    let first = copies.first()?;
    if copies.len() < 2 || copies.iter().any(|c| c.len() != first.len()) {
        return None;
    }
    (0..first.len())
        .map(|i| {
            copies.iter().enumerate().find_map(|(a, copy)| {
                let v = copy[i];
                copies[a + 1..].iter().any(|c| c[i] == v).then_some(v)
            })
        })
        .collect()
}

/// The job that fetches the manifest of `object` from `server` into memory. Its id is derived,
/// not its digest, so the caller checks the bytes (`Manifest::decode`).
pub(super) fn manifest_job(server: SocketAddr, object: ObjectId) -> Job {
    Job {
        server,
        id: manifest_id(&object),
        have: RangeSet::new(),
        sink: Sink::Memory(Vec::new()),
        expect: Expect::AtMost(MAX_MANIFEST_BYTES),
        verify: Verify::ByCaller,
    }
}

/// Fetches and checks the manifest of `object` through `engine`, for at most `limit`.
/// Without one, the caller fetches the whole object.
pub(super) fn fetch_manifest(
    engine: &mut Engine<'_>,
    server: SocketAddr,
    object: ObjectId,
    limit: Duration,
) -> Result<Result<Manifest, NoManifest>, FetchError> {
    let ended = engine.run(manifest_job(server, object), Some(limit), &mut |_| {})?;
    let Sink::Memory(bytes) = ended.sink else {
        return Err(lost());
    };
    Ok(match ended.outcome {
        Outcome::Completed { .. } => {
            Manifest::decode(&bytes, &object).map_err(|_| NoManifest::Damaged(bytes))
        }
        Outcome::Failed(TransferError::DigestMismatch { .. }) => Err(NoManifest::Damaged(bytes)),
        Outcome::Failed(err) if err.is_silence() => Err(NoManifest::TimedOut),
        _ => Err(NoManifest::Refused),
    })
}

/// Copies into `partial` every full block of `manifest` found in the files `bases`, skipping
/// bytes the partial already holds, and records them (a checkpoint follows). Returns the bytes
/// copied. A base that cannot be read is skipped. Bases are scanned as streams (about 1 MiB
/// held at a time) and blocks read back from them by offset, so a base of any size fits.
pub(super) fn reuse_blocks(
    manifest: &Manifest,
    bases: &[PathBuf],
    partial: &mut PartialFile,
) -> Result<u64, FetchError> {
    partial.set_size(manifest.size);
    let mut found: BTreeMap<usize, Src> = BTreeMap::new();
    let mut files = Vec::new();
    for path in bases {
        let Ok(file) = File::open(path) else {
            continue;
        };
        let mut scan = found.clone();
        if manifest
            .find_blocks_in(&file, &mut scan, files.len())
            .is_ok()
        {
            found = scan;
            files.push(file);
        }
    }
    let mut copied = 0;
    let mut buf = vec![0u8; manifest.block_size as usize];
    for (i, src) in found {
        let range = manifest.block_range(i);
        if partial.received().contains_range(range.clone()) {
            continue;
        }
        let bytes = &mut buf[..(range.end - range.start) as usize];
        let Some(file) = files.get(src.file) else {
            continue;
        };
        // A base that changed since it was scanned: the block is fetched instead.
        if store::read_exact_at(file, bytes, src.offset).is_err()
            || !manifest.block_matches(i, bytes)
        {
            continue;
        }
        partial.write_at(range.start, bytes)?;
        copied += bytes.len() as u64;
    }
    partial.checkpoint()?;
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::vote;

    #[test]
    fn three_copies_altered_in_different_places_vote_back_the_original() {
        let original: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut copies = vec![original.clone(), original.clone(), original.clone()];
        copies[0][10] ^= 1;
        copies[0][4000..4100].fill(0);
        copies[1][11] ^= 2;
        copies[2][4200] ^= 0x80;
        assert!(vote(&copies) == Some(original.clone()));
        // Two copies agree everywhere but where one was altered: the third decides.
        assert!(
            vote(&copies[1..]).is_none(),
            "two copies that differ cannot vote"
        );
        // Altered alike in every copy but one: no agreeing pair at that byte.
        let mut lost = copies.clone();
        lost[1][77] ^= 1;
        lost[2][77] ^= 2;
        lost[0][77] ^= 4;
        assert!(vote(&lost).is_none());
        // Copies of other lengths do not vote.
        copies[2].push(0);
        assert!(vote(&copies).is_none());
    }
}
