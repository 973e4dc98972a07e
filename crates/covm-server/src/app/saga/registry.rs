//! Every kind of saga covm runs, in one place: recovery after a crash dispatches on it, and a new saga
//! is added here (beside its module) or a crash leaves it `stuck`.
//!
//! Keeping the list out of the engine (`saga.rs`) keeps the engine free of the sagas that use it.

use covm_store::SagaRecord;
use covm_types::Error;

use super::Saga;
use super::clone::CloneSaga;
use super::disk::{CreateSaga, DeleteSaga, ResizeSaga};
use super::plug::{AttachSaga, DetachSaga, MoveSaga};
use super::snapshot::{SnapshotCreateSaga, SnapshotDeleteSaga, SnapshotRevertSaga};
use crate::app::App;
use crate::app::refs::CONFIG_DISKS_LOCK;

/// The kinds of saga, as logged.
pub const KINDS: &[&str] = &[
    AttachSaga::KIND,
    DetachSaga::KIND,
    MoveSaga::KIND,
    CreateSaga::KIND,
    CloneSaga::KIND,
    DeleteSaga::KIND,
    ResizeSaga::KIND,
    SnapshotCreateSaga::KIND,
    SnapshotDeleteSaga::KIND,
    SnapshotRevertSaga::KIND,
    CONFIG_DISKS_LOCK,
];

impl App {
    /// Finishes or undoes one saga a crash interrupted, by its kind.
    pub(crate) async fn saga_recover_any(&self, rec: SagaRecord) -> Result<(), Error> {
        match rec.kind.as_str() {
            // Stopped while checking its rules (or a lock-only saga): nothing was done.
            _ if rec.data.is_null() => self.saga_recover::<AttachSaga>(rec).await,
            AttachSaga::KIND => self.saga_recover::<AttachSaga>(rec).await,
            DetachSaga::KIND => self.saga_recover::<DetachSaga>(rec).await,
            MoveSaga::KIND => self.saga_recover::<MoveSaga>(rec).await,
            CreateSaga::KIND => self.saga_recover::<CreateSaga>(rec).await,
            CloneSaga::KIND => self.saga_recover::<CloneSaga>(rec).await,
            DeleteSaga::KIND => self.saga_recover::<DeleteSaga>(rec).await,
            ResizeSaga::KIND => self.saga_recover::<ResizeSaga>(rec).await,
            SnapshotCreateSaga::KIND => self.saga_recover::<SnapshotCreateSaga>(rec).await,
            SnapshotDeleteSaga::KIND => self.saga_recover::<SnapshotDeleteSaga>(rec).await,
            SnapshotRevertSaga::KIND => self.saga_recover::<SnapshotRevertSaga>(rec).await,
            other => Err(Error::internal(format!("unknown saga kind {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_distinct() {
        let mut k = KINDS.to_vec();
        k.sort_unstable();
        k.dedup();
        assert_eq!(k.len(), KINDS.len());
    }
}
