//! The group-commit writer both backends share: one thread takes write batches and audited
//! reads from a queue, groups whatever is waiting (up to [`MAX_GROUP`]), and hands each
//! group to the backend's [`Sequencer`], which runs it in one database transaction — the
//! transaction dialect (savepoints, sequence numbers, retries, reconnects) stays per backend.
//! Callers block until their own job's reply comes back, which is sent only after the group
//! committed (or failed as a whole).
//!
//! INVARIANT: every job handed to a sequencer gets exactly one reply.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;

use crate::{AuditedRead, Committed, Payload, StoreError, WriteBatch};

/// Most jobs committed in one transaction.
pub(crate) const MAX_GROUP: usize = 512;
/// Jobs that may wait in the queue before callers block on sending.
const QUEUE: usize = 4096;

/// Work for the writer: a write batch, or an audited read, with where to send its result.
pub(crate) enum Job {
    Batch(WriteBatch, SyncSender<Result<Committed, StoreError>>),
    Read(AuditedRead, SyncSender<Result<Payload, StoreError>>),
}

impl Job {
    /// Replies with an error (the job's work is dropped).
    pub(crate) fn fail(self, e: StoreError) {
        match self {
            Job::Batch(_, tx) => {
                let _ = tx.send(Err(e));
            }
            Job::Read(_, tx) => {
                let _ = tx.send(Err(e));
            }
        }
    }
}

/// A job's result, waiting for its group's commit before it is sent.
pub(crate) enum Done {
    Batch(
        SyncSender<Result<Committed, StoreError>>,
        Result<Committed, StoreError>,
    ),
    Read(
        SyncSender<Result<Payload, StoreError>>,
        Result<Payload, StoreError>,
    ),
}

impl Done {
    /// The group committed: sends the job's own result.
    pub(crate) fn send(self) {
        match self {
            Done::Batch(tx, r) => {
                let _ = tx.send(r);
            }
            Done::Read(tx, r) => {
                let _ = tx.send(r);
            }
        }
    }
    /// The group did not commit: nothing of the job was written.
    pub(crate) fn fail(self, e: StoreError) {
        match self {
            Done::Batch(tx, _) => {
                let _ = tx.send(Err(e));
            }
            Done::Read(tx, _) => {
                let _ = tx.send(Err(e));
            }
        }
    }
}

/// Fails every job of a group with the error `e()` makes.
pub(crate) fn fail_all(group: Vec<Job>, e: impl Fn() -> StoreError) {
    for j in group {
        j.fail(e());
    }
}

/// A backend's way of committing one group in one transaction.
pub(crate) trait Sequencer: Send + 'static {
    /// Runs `group` in one transaction and replies to every job in it.
    fn commit_group(&mut self, group: Vec<Job>);
}

/// The writer thread and the queue to it.
pub(crate) struct Writer {
    queue: Mutex<Option<SyncSender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Writer {
    /// Starts the writer thread `name` over `sequencer`.
    pub(crate) fn start(name: &str, sequencer: impl Sequencer) -> Result<Self, StoreError> {
        let (tx, rx) = sync_channel::<Job>(QUEUE);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(sequencer, rx))
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        Ok(Writer {
            queue: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    fn send(&self, job: Job) -> Result<(), StoreError> {
        let queue = self.queue.lock().ok().and_then(|w| w.clone());
        let queue = queue.ok_or_else(|| StoreError::Unavailable("store is closed".into()))?;
        queue
            .send(job)
            .map_err(|_| StoreError::Unavailable("writer stopped".into()))
    }

    /// Commits `batch` (grouped with whatever else is waiting) and waits for the outcome.
    pub(crate) fn commit(&self, batch: WriteBatch) -> Result<Committed, StoreError> {
        let (tx, rx) = sync_channel(1);
        self.send(Job::Batch(batch, tx))?;
        rx.recv()
            .map_err(|_| StoreError::Unavailable("writer stopped".into()))?
    }

    /// Runs `read` inside a group's transaction, with its audit entries, and waits.
    pub(crate) fn audited(&self, read: AuditedRead) -> Result<Payload, StoreError> {
        let (tx, rx) = sync_channel(1);
        self.send(Job::Read(read, tx))?;
        rx.recv()
            .map_err(|_| StoreError::Unavailable("writer stopped".into()))?
    }

    /// Stops the writer after draining queued jobs.
    pub(crate) fn close(&self) {
        if let Ok(mut q) = self.queue.lock() {
            q.take();
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

fn run(mut sequencer: impl Sequencer, rx: Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => group.push(j),
                Err(_) => break,
            }
        }
        sequencer.commit_group(group);
    }
}
