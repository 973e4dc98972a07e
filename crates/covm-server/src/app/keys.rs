//! Keys of encrypted disks (LUKS in qcow2, AES-256-XTS).
//!
//! Each encrypted disk has a random passphrase of its own ([`covm_hv::secret::DiskKey`], 256 bits),
//! kept in the disk's record only wrapped (AES-256-GCM, the disk's id as associated data, so a
//! wrapped key moved to another disk does not open) by the master key. The master key is one of:
//!
//! - `DATA/master.key` (32 bytes, mode 0600, made at the first start), the default;
//! - `--master-key-file FILE` (the same form), for a key kept elsewhere;
//! - `COVM_MASTER_KEY` (base64), for deployments with a secret store.
//!
//! `POST /api/v1/keys/rotate` (`covm keys rotate`) wraps every disk key again under a new master key
//! without touching any image: the new key is written to `DATA/master.key.new` first, the disks'
//! records are rewrapped in one transaction, then the new file replaces the old one. Keys are found by
//! their id (the first 16 hex digits of their SHA-256), so a crash at any point leaves every disk
//! openable with the files that are there. A passphrase reaches QEMU and qemu-img only encrypted with
//! a per-process key (`covm_hv::secret`), never in a log, an event or an answer.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use covm_hv::secret::DiskKey;
use covm_types::{Error, ErrorCode};
use rand::Rng;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use uuid::Uuid;

/// A disk's wrapped key, as kept in its record (`spec.encryption`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    /// `luks`.
    pub format: String,
    /// The id of the master key that wrapped it.
    pub master: String,
    /// base64 of nonce (12 bytes) ‖ ciphertext ‖ tag.
    pub wrapped: String,
}

#[derive(Clone)]
struct MasterKey {
    id: String,
    key: [u8; 32],
}

impl MasterKey {
    fn new(key: [u8; 32]) -> MasterKey {
        MasterKey { id: hex::encode(&sha2::Sha256::digest(key)[..8]), key }
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.key).expect("a 32-byte key is an AES-256 key"))
    }
}

/// Where the master key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `DATA/master.key`, made at the first start; covm rotates it.
    DataDir(PathBuf),
    /// A file the operator gives (`--master-key-file`).
    File(PathBuf),
    /// `COVM_MASTER_KEY`.
    Env,
}

/// The master keys this process knows: the current one first, then any a rotation left behind.
pub struct KeyRing {
    source: KeySource,
    keys: RwLock<Vec<MasterKey>>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing").field("source", &self.source).field("current", &self.current_id()).finish()
    }
}

fn read_key(path: &Path) -> anyhow::Result<[u8; 32]> {
    use anyhow::Context;
    let b = std::fs::read(path).with_context(|| format!("could not read the master key {}", path.display()))?;
    b.try_into().map_err(|_| anyhow::anyhow!("{} is not a 32-byte master key", path.display()))
}

/// Makes renames in a directory durable.
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn write_key(path: &Path, key: &[u8; 32]) -> std::io::Result<()> {
    crate::files::write_atomic(path, key, 0o600)
}

impl KeyRing {
    /// The master key from `file`, else from `env` (base64), else `DATA/master.key` (made when
    /// missing), with the keys a rotation left in the data directory.
    pub fn load(data_dir: &Path, file: Option<&Path>, env: Option<&str>) -> anyhow::Result<KeyRing> {
        let (source, current) = match (file, env) {
            (Some(f), _) => (KeySource::File(f.to_owned()), read_key(f)?),
            (None, Some(e)) => {
                let b = B64.decode(e.trim()).map_err(|_| anyhow::anyhow!("COVM_MASTER_KEY is not base64"))?;
                let k: [u8; 32] = b.try_into().map_err(|_| anyhow::anyhow!("COVM_MASTER_KEY is not 32 bytes"))?;
                (KeySource::Env, k)
            }
            (None, None) => {
                let p = data_dir.join("master.key");
                let new = data_dir.join("master.key.new");
                if !p.exists() && new.exists() {
                    // A rotation stopped between its renames: its new key is the current one.
                    std::fs::rename(&new, &p)?;
                    sync_dir(data_dir);
                } else if !p.exists() {
                    write_key(&p, &rand::rng().random())?;
                    sync_dir(data_dir);
                    tracing::info!(file = %p.display(), "made the master key of encrypted disks (mode 0600)");
                }
                (KeySource::DataDir(p.clone()), read_key(&p)?)
            }
        };
        let mut keys = vec![MasterKey::new(current)];
        // A rotation that stopped half-way: both keys are needed until it is done again.
        for leftover in ["master.key.new", "master.key.old"] {
            let p = data_dir.join(leftover);
            if p.exists() {
                keys.push(MasterKey::new(read_key(&p)?));
            }
        }
        Ok(KeyRing { source, keys: RwLock::new(keys) })
    }

    pub fn current_id(&self) -> String {
        self.keys.read().unwrap_or_else(|p| p.into_inner())[0].id.clone()
    }

    /// Wraps a disk's passphrase under the current master key.
    pub fn wrap(&self, disk: Uuid, key: &DiskKey) -> WrappedKey {
        let master = self.keys.read().unwrap_or_else(|p| p.into_inner())[0].clone();
        Self::wrap_with(&master, disk, key)
    }

    fn wrap_with(master: &MasterKey, disk: Uuid, key: &DiskKey) -> WrappedKey {
        let nonce: [u8; 12] = rand::rng().random();
        let mut buf = key.expose().as_bytes().to_vec();
        master
            .aead()
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(disk.as_bytes()), &mut buf)
            .expect("sealing in memory does not fail");
        let mut out = nonce.to_vec();
        out.extend(buf);
        WrappedKey { format: "luks".into(), master: master.id.clone(), wrapped: B64.encode(out) }
    }

    /// A disk's passphrase, unwrapped with the master key that wrapped it.
    pub fn unwrap(&self, disk: Uuid, w: &WrappedKey) -> Result<DiskKey, Error> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let master = keys.iter().find(|k| k.id == w.master).ok_or_else(|| {
            Error::conflict(
                ErrorCode::KeyUnavailable,
                format!(
                    "the disk's key is wrapped by master key {}, which this server does not have (it has {})",
                    w.master, keys[0].id
                ),
            )
        })?;
        let bad = || Error::conflict(ErrorCode::KeyUnavailable, "the disk's wrapped key does not open");
        let raw = B64.decode(&w.wrapped).map_err(|_| bad())?;
        if raw.len() < 12 + 16 {
            return Err(bad());
        }
        let (nonce, rest) = raw.split_at(12);
        let mut buf = rest.to_vec();
        let nonce: [u8; 12] = nonce.try_into().map_err(|_| bad())?;
        let plain = master
            .aead()
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(disk.as_bytes()), &mut buf)
            .map_err(|_| bad())?;
        Ok(DiskKey::new(String::from_utf8(plain.to_vec()).map_err(|_| bad())?))
    }

    /// Rotation, first half: a new master key, kept in `DATA/master.key.new` (so that a crash from
    /// here on keeps every disk openable) and known to this ring. Only for covm's own key file.
    pub fn rotate_begin(&self, data_dir: &Path) -> Result<RotateNext, Error> {
        let KeySource::DataDir(_) = &self.source else {
            return Err(Error::conflict(
                ErrorCode::KeyUnavailable,
                "the master key is given to covm (--master-key-file or COVM_MASTER_KEY); covm rotates only its \
                 own DATA/master.key",
            ));
        };
        let new = data_dir.join("master.key.new");
        let key = if new.exists() {
            // A rotation that failed or stopped: go on with its key (disks may be wrapped under it).
            MasterKey::new(read_key(&new).map_err(|e| Error::internal(format!("{e:#}")))?)
        } else {
            let key = MasterKey::new(rand::rng().random());
            write_key(&new, &key.key)
                .map_err(|e| Error::internal(format!("could not write the new master key: {e}")))?;
            sync_dir(data_dir);
            key
        };
        // From now on new disks are wrapped under the new key.
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        keys.retain(|k| k.id != key.id);
        keys.insert(0, key.clone());
        Ok(RotateNext { key })
    }

    /// Wraps a disk's passphrase (under whatever key it is wrapped now) under the rotation's new key.
    pub fn rewrap(&self, next: &RotateNext, disk: Uuid, w: &WrappedKey) -> Result<WrappedKey, Error> {
        let k = self.unwrap(disk, w)?;
        Ok(Self::wrap_with(&next.key, disk, &k))
    }

    /// Rotation, second half (every record rewrapped): the new key becomes `DATA/master.key`; the one
    /// before it stays as `master.key.old` until the next rotation (a disk made while this one ran may
    /// still be wrapped under it; the next rotation rewraps it first).
    pub fn rotate_finish(&self, data_dir: &Path) -> Result<(), Error> {
        let (cur, new, old) =
            (data_dir.join("master.key"), data_dir.join("master.key.new"), data_dir.join("master.key.old"));
        let io = |e: std::io::Error| Error::internal(format!("could not put the new master key in place: {e}"));
        std::fs::rename(&cur, &old).map_err(io)?;
        std::fs::rename(&new, &cur).map_err(io)?;
        sync_dir(data_dir);
        Ok(())
    }

    /// Whether `w` is wrapped under the current master key.
    pub fn is_current(&self, w: &WrappedKey) -> bool {
        w.master == self.current_id()
    }
}

/// The new master key of a rotation in progress.
pub struct RotateNext {
    key: MasterKey,
}

impl RotateNext {
    pub fn id(&self) -> &str {
        &self.key.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_wrap_per_disk_and_survive_a_rotation_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let ring = KeyRing::load(dir.path(), None, None).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("master.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (d1, d2) = (Uuid::now_v7(), Uuid::now_v7());
        let k = DiskKey::random();
        let w = ring.wrap(d1, &k);
        assert!(!w.wrapped.contains(k.expose()));
        assert_eq!(ring.unwrap(d1, &w).unwrap(), k);
        assert!(ring.unwrap(d2, &w).is_err(), "bound to its disk");
        // A rotation stopped after the new key was written and the record rewrapped: a restart finds
        // both keys.
        let next = ring.rotate_begin(dir.path()).unwrap();
        let w2 = ring.rewrap(&next, d1, &w).unwrap();
        assert_ne!(w2.master, w.master);
        let again = KeyRing::load(dir.path(), None, None).unwrap();
        assert_eq!(again.unwrap(d1, &w2).unwrap(), k);
        assert_eq!(again.unwrap(d1, &w).unwrap(), k);
        assert!(ring.is_current(&w2) && !ring.is_current(&w), "new disks are wrapped under the new key at once");
        // A rotation that failed after its first step goes on with the same new key.
        let again_next = ring.rotate_begin(dir.path()).unwrap();
        assert_eq!(again_next.id(), next.id());
        ring.rotate_finish(dir.path()).unwrap();
        let after = KeyRing::load(dir.path(), None, None).unwrap();
        assert_eq!(after.unwrap(d1, &w2).unwrap(), k);
        assert_eq!(after.unwrap(d1, &w).unwrap(), k, "the key before stays until the next rotation");
        // The next rotation: the key two rotations back is gone.
        let n3 = after.rotate_begin(dir.path()).unwrap();
        let w3 = after.rewrap(&n3, d1, &w2).unwrap();
        after.rotate_finish(dir.path()).unwrap();
        let last = KeyRing::load(dir.path(), None, None).unwrap();
        assert_eq!(last.unwrap(d1, &w3).unwrap(), k);
        assert_eq!(last.unwrap(d1, &w).unwrap_err().code, ErrorCode::KeyUnavailable, "gone");
        // A stop between the renames of a rotation: master.key is missing, .new is promoted.
        let n4 = last.rotate_begin(dir.path()).unwrap();
        let w4 = last.rewrap(&n4, d1, &w3).unwrap();
        std::fs::rename(dir.path().join("master.key"), dir.path().join("master.key.old")).unwrap();
        let resumed = KeyRing::load(dir.path(), None, None).unwrap();
        assert_eq!(resumed.unwrap(d1, &w4).unwrap(), k);
        assert!(!dir.path().join("master.key.new").exists());
        // From the environment.
        let env = B64.encode([7u8; 32]);
        let e = KeyRing::load(dir.path(), None, Some(&env)).unwrap();
        assert!(e.rotate_begin(dir.path()).is_err(), "only covm's own key file rotates");
    }
}
