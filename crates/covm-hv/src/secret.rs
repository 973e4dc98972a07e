//! Keys for encrypted disks, handed to QEMU and qemu-img as libvirt does: never as plain text on a
//! command line or over QMP. Each process gets a random 256-bit key of its own (a QEMU: a file in its
//! run directory, mode 0600, read at start; a qemu-img: its standard input), and a disk's passphrase
//! reaches it as a `secret` object encrypted with that key (AES-256-CBC, PKCS#7 padding, a random IV:
//! what QEMU's `keyid`/`iv` properties decrypt).

use std::path::Path;

use aes::cipher::{BlockEncryptMut, KeyIvInit, block_padding::Pkcs7};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rand::Rng;
use serde_json::json;

use crate::HvError;

/// Environment variables that may hold covm's secrets: never passed on to QEMU or qemu-img (a guest
/// that broke out into QEMU could read its environment).
pub const SECRET_ENV: &[&str] = &["COVM_MASTER_KEY", "COVM_OIDC_CLIENT_SECRET", "COVM_TOKEN", "COVM_PASSWORD"];

/// The id of a process's own key object in QEMU and qemu-img.
pub const PROCESS_KEY_ID: &str = "covm-master";

/// A disk's LUKS passphrase (base64 text of 32 random bytes). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct DiskKey(String);

impl DiskKey {
    pub fn new(passphrase: String) -> DiskKey {
        DiskKey(passphrase)
    }

    /// A new random passphrase.
    pub fn random() -> DiskKey {
        DiskKey(B64.encode(rand::rng().random::<[u8; 32]>()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for DiskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiskKey(<hidden>)")
    }
}

/// A process's own key, which encrypts the secrets it is given.
#[derive(Clone)]
pub struct ProcessKey([u8; 32]);

impl std::fmt::Debug for ProcessKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProcessKey(<hidden>)")
    }
}

impl ProcessKey {
    pub fn random() -> ProcessKey {
        ProcessKey(rand::rng().random())
    }

    pub fn base64(&self) -> String {
        B64.encode(self.0)
    }

    /// Writes the key (raw bytes) to `path`, mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), HvError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::remove_file(path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(HvError::os(format!("write {}", path.display())))?;
        f.write_all(&self.0).map_err(HvError::os(format!("write {}", path.display())))
    }

    pub fn load(path: &Path) -> Result<ProcessKey, HvError> {
        let b = std::fs::read(path).map_err(HvError::os(format!("read {}", path.display())))?;
        let k: [u8; 32] = b.try_into().map_err(|_| HvError::Io(format!("{} is not a 32-byte key", path.display())))?;
        Ok(ProcessKey(k))
    }

    /// `plaintext` encrypted for this process: (IV, ciphertext), both base64.
    pub fn encrypt(&self, plaintext: &[u8]) -> (String, String) {
        let iv: [u8; 16] = rand::rng().random();
        let ct =
            cbc::Encryptor::<aes::Aes256>::new(&self.0.into(), &iv.into()).encrypt_padded_vec_mut::<Pkcs7>(plaintext);
        (B64.encode(iv), B64.encode(ct))
    }

    /// The `object-add` arguments of a secret `id` holding `key`, encrypted for this process.
    pub fn qmp_secret(&self, id: &str, key: &DiskKey) -> serde_json::Value {
        let (iv, data) = self.encrypt(key.expose().as_bytes());
        json!({ "qom-type": "secret", "id": id, "data": data, "format": "base64", "keyid": PROCESS_KEY_ID, "iv": iv })
    }

    /// The same as a `--object` option of qemu-img.
    pub fn object_arg(&self, id: &str, key: &DiskKey) -> String {
        let (iv, data) = self.encrypt(key.expose().as_bytes());
        format!("secret,id={id},data={data},keyid={PROCESS_KEY_ID},iv={iv},format=base64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_padded_cbc_and_never_printed() {
        let k = ProcessKey::random();
        let (iv, ct) = k.encrypt(b"0123456789abcdef0123456789abcdef0123456789a=");
        assert_eq!(B64.decode(iv).unwrap().len(), 16);
        assert_eq!(B64.decode(ct).unwrap().len(), 48, "44 bytes padded to 48");
        let d = DiskKey::random();
        assert_eq!(format!("{d:?} {k:?}"), "DiskKey(<hidden>) ProcessKey(<hidden>)");
        assert!(!format!("{:?}", k.qmp_secret("s", &d)).contains(d.expose()));
    }
}
