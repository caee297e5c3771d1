//! The id's digest (MD5 or SHA-256) on a thread of its own, for receivers whose driving thread
//! is the bottleneck.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::core::PrefixHasher;
use crate::id::IdHasher;
use crate::id::ObjectId;

/// Bytes gathered before a hand-over to the thread.
const BATCH_BYTES: usize = 256 << 10;
/// Batches queued for the thread at most; `update` waits beyond that, so memory stays bounded
/// (about 1.3 MiB) and the digest is at most that far behind.
const QUEUED_BATCHES: usize = 4;

/// A [`PrefixHasher`] that computes the object's digest (MD5 or SHA-256) on a thread of its
/// own.
///
/// Receiving, copying and acknowledging take about a third of a receiving thread's time on
/// loopback and MD5 the rest; with this hasher the two run on two cores. Bytes are copied into
/// 256 KiB batches (a copy costs a few percent of hashing them) and at most four batches wait.
/// [`net::Client::fetch`](super::Client::fetch) uses it; a game that drives its own
/// [`Endpoint`](crate::core::Endpoint) can pass one to
/// [`Endpoint::set_hasher`](crate::core::Endpoint::set_hasher) right after `fetch`.
#[derive(Debug)]
pub struct HashThread {
    batch: Vec<u8>,
    batches: Option<SyncSender<Vec<u8>>>,
    /// Emptied batches coming back for reuse.
    spare: Receiver<Vec<u8>>,
    thread: Option<JoinHandle<io::Result<ObjectId>>>,
}

impl HashThread {
    /// Starts an MD5 thread. It ends when [`finish`](PrefixHasher::finish) is called or the
    /// hasher is dropped.
    pub fn new() -> io::Result<Self> {
        Self::start(IdHasher::default())
    }

    /// Starts a thread that computes an id of `id`'s algorithm: use it for a download of `id`.
    pub fn for_id(id: &ObjectId) -> io::Result<Self> {
        Self::start(id.hasher())
    }

    fn start(mut hasher: IdHasher) -> io::Result<Self> {
        let (batches, todo) = sync_channel::<Vec<u8>>(QUEUED_BATCHES);
        let (give_back, spare) = sync_channel::<Vec<u8>>(QUEUED_BATCHES + 1);
        let thread = std::thread::Builder::new()
            .name("udpferry-hash".into())
            .spawn(move || {
                for mut batch in todo {
                    hasher.update(&batch);
                    batch.clear();
                    let _ = give_back.try_send(batch);
                }
                Ok(hasher.finish())
            })?;
        Ok(HashThread {
            batch: Vec::with_capacity(BATCH_BYTES),
            batches: Some(batches),
            spare,
            thread: Some(thread),
        })
    }

    /// The digest of a download of `id` on a thread of its own, or on the calling thread when
    /// no thread can start.
    pub(crate) fn or_inline(id: &ObjectId) -> Box<dyn PrefixHasher> {
        match Self::for_id(id) {
            Ok(thread) => Box::new(thread),
            Err(_) => Box::new(crate::core::InlineHasher::for_id(id)),
        }
    }

    fn hand_over(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let next = self
            .spare
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(BATCH_BYTES));
        let full = std::mem::replace(&mut self.batch, next);
        if let Some(batches) = &self.batches {
            if batches.send(full).is_err() {
                // The thread is gone; `finish` reports it.
                self.batches = None;
            }
        }
    }
}

impl PrefixHasher for HashThread {
    fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = BATCH_BYTES - self.batch.len();
            let (now, later) = bytes.split_at(room.min(bytes.len()));
            self.batch.extend_from_slice(now);
            bytes = later;
            if self.batch.len() >= BATCH_BYTES {
                self.hand_over();
            }
        }
    }

    fn finish(&mut self) -> io::Result<ObjectId> {
        self.hand_over();
        let lost = self.batches.take().is_none();
        let digest = self
            .thread
            .take()
            .ok_or_else(|| io::Error::other("hash thread already finished"))?
            .join()
            .map_err(|_| io::Error::other("hash thread panicked"))??;
        if lost {
            return Err(io::Error::other("hash thread stopped early"));
        }
        Ok(digest)
    }
}

/// Byte ranges of a file a [`FileHashThread`] may have queued.
const QUEUED_RANGES: usize = 8;

/// The id's digest of a file's bytes, read and hashed on a thread of its own, range after
/// range in order: for a download whose receive thread must not spend time reading its bytes
/// back (the multi-source download, whose pieces arrive out of order). The caller makes sure
/// each range is written before handing it over (`PartialFile::write_out`).
#[derive(Debug)]
pub(crate) struct FileHashThread {
    ranges: Option<SyncSender<std::ops::Range<u64>>>,
    queued: Arc<AtomicUsize>,
    thread: Option<JoinHandle<io::Result<ObjectId>>>,
}

impl FileHashThread {
    /// Starts a thread that computes an id of `id`'s algorithm over the ranges of `file`
    /// handed to [`hash`](Self::hash).
    pub(crate) fn start(file: File, id: &ObjectId) -> io::Result<Self> {
        let (ranges, todo) = sync_channel::<std::ops::Range<u64>>(QUEUED_RANGES);
        let queued = Arc::new(AtomicUsize::new(0));
        let done = queued.clone();
        let mut hasher = id.hasher();
        let thread = std::thread::Builder::new()
            .name("udpferry-hash".into())
            .spawn(move || {
                let mut buf = vec![0u8; BATCH_BYTES];
                for range in todo {
                    let mut at = range.start;
                    while at < range.end {
                        let n = (range.end - at).min(BATCH_BYTES as u64) as usize;
                        crate::store::read_exact_at(&file, &mut buf[..n], at)?;
                        hasher.update(&buf[..n]);
                        at += n as u64;
                    }
                    done.fetch_sub(1, Ordering::Relaxed);
                }
                Ok(hasher.finish())
            })?;
        Ok(FileHashThread {
            ranges: Some(ranges),
            queued,
            thread: Some(thread),
        })
    }

    /// Whether [`hash`](Self::hash) would wait for the thread.
    pub(crate) fn is_full(&self) -> bool {
        self.queued.load(Ordering::Relaxed) >= QUEUED_RANGES
    }

    /// Hands over the next `range` of the object (written to the file already).
    pub(crate) fn hash(&mut self, range: std::ops::Range<u64>) {
        if let Some(ranges) = &self.ranges {
            self.queued.fetch_add(1, Ordering::Relaxed);
            if ranges.send(range).is_err() {
                // The thread stopped (a read failed); `finish` reports why.
                self.ranges = None;
            }
        }
    }

    /// The id of every range handed over, once the thread has read and hashed them all.
    pub(crate) fn finish(&mut self) -> io::Result<ObjectId> {
        self.ranges = None;
        self.thread
            .take()
            .ok_or_else(|| io::Error::other("hash thread already finished"))?
            .join()
            .map_err(|_| io::Error::other("hash thread panicked"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_md5_on_the_calling_thread_for_any_split() {
        let data: Vec<u8> = (0..1_000_003u32).map(|i| (i * 7 + i / 255) as u8).collect();
        for piece in [
            1usize,
            1168,
            4096,
            BATCH_BYTES,
            BATCH_BYTES + 1,
            3 * BATCH_BYTES,
        ] {
            let mut threaded = HashThread::new().unwrap();
            let mut inline = crate::core::InlineHasher::for_id(&ObjectId::md5_of(b""));
            for chunk in data.chunks(piece) {
                threaded.update(chunk);
                inline.update(chunk);
            }
            assert_eq!(
                threaded.finish().unwrap(),
                inline.finish().unwrap(),
                "pieces of {piece}"
            );
        }
        assert_eq!(
            HashThread::new().unwrap().finish().unwrap(),
            ObjectId::md5_of(b""),
            "empty object"
        );
        let sha = ObjectId::sha256_of(&data);
        let mut threaded = HashThread::for_id(&sha).unwrap();
        for chunk in data.chunks(1168) {
            threaded.update(chunk);
        }
        assert_eq!(threaded.finish().unwrap(), sha);
    }

    #[test]
    fn the_file_thread_hashes_the_ranges_it_is_given_in_order() {
        let data: Vec<u8> = (0..700_001u32).map(|i| (i * 13 + i / 7) as u8).collect();
        let path = std::env::temp_dir().join(format!(
            "udpferry-file-hash-{}-{}",
            std::process::id(),
            crate::random::random_u64()
        ));
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        let mut thread = FileHashThread::start(file, &ObjectId::md5_of(b"")).unwrap();
        // Ranges of every length, a batch and more included, never more than the queue holds.
        let mut at = 0u64;
        for len in [1u64, 1166, BATCH_BYTES as u64, BATCH_BYTES as u64 + 3, 0] {
            while thread.is_full() {
                std::thread::yield_now();
            }
            thread.hash(at..at + len);
            at += len;
        }
        thread.hash(at..data.len() as u64);
        assert_eq!(thread.finish().unwrap(), ObjectId::md5_of(&data));
        // A range past the end fails the digest instead of inventing bytes.
        let mut short =
            FileHashThread::start(File::open(&path).unwrap(), &ObjectId::md5_of(b"")).unwrap();
        short.hash(0..data.len() as u64 + 1);
        assert!(short.finish().is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
