//! The local certificate authority that signs interception leaves.
//!
//! Created on first need (ECDSA P-256) in a directory of its own: `ca.pem`
//! (the certificate, to trust) and `ca-key.pem` (the key, mode 0600). The
//! key is written to a temporary file with mode 0600 and renamed into place,
//! under an exclusive lock on `ca.lock`, so two processes starting together
//! end with one CA. A key that is a symlink, or readable by group or others,
//! is refused with a message saying how to fix it.
//!
//! The CA's subject is fixed (`CN=portcullis local CA, O=portcullis`), so
//! the issuer of a leaf is rebuilt from the key alone; key identifiers are
//! derived from the public key, so the leaf's Authority Key Identifier
//! matches the CA's Subject Key Identifier.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use portcullis_middleware::{Host, Target};

/// The certificate file's name in the CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The key file's name in the CA directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";
const LOCK_FILE: &str = "ca.lock";

/// How long a leaf certificate is valid (days, not decades: clients that
/// check validity periods accept it, and a leaked leaf expires).
pub(crate) const LEAF_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long the CA is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Why the CA could not be loaded or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A file could not be read, written or locked.
    #[error("portcullis: cannot use the CA in {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The key file is unsafe to use.
    #[error("portcullis: refusing the CA key {path}: {problem}; {fix}")]
    UnsafeKey {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
        /// What to do.
        fix: String,
    },
    /// A file holds something that is not a certificate or key we made.
    #[error("portcullis: the CA in {path} is unreadable: {message}; remove the directory's ca.pem and ca-key.pem to make a new CA")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Generating or signing failed.
    #[error("portcullis: cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The local CA: its certificate and the means to sign leaves.
pub struct CertificateAuthority {
    directory: PathBuf,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("directory", &self.directory)
            .finish_non_exhaustive()
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "portcullis local CA");
    name.push(DnType::OrganizationName, "portcullis");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl CertificateAuthority {
    /// Loads the CA from `directory`, creating the directory (mode 0700) and
    /// the CA when there is none.
    pub fn load_or_create(directory: &Path) -> Result<CertificateAuthority, CaError> {
        fs::create_dir_all(directory).map_err(io_error(directory))?;
        let lock_path = directory.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_error(&lock_path))?;
        // Held until this function returns: one process creates, the others
        // wait and then load what it made.
        let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).map_err(
            |(_, errno)| CaError::Io {
                path: lock_path.clone(),
                source: std::io::Error::from(errno),
            },
        )?;
        let key_path = directory.join(CA_KEY_FILE);
        let cert_path = directory.join(CA_CERT_FILE);
        match fs::symlink_metadata(&key_path) {
            Ok(_) => Self::load(directory, &key_path, &cert_path),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                Self::create(directory, &key_path, &cert_path)
            }
            Err(error) => Err(io_error(&key_path)(error)),
        }
    }

    fn load(
        directory: &Path,
        key_path: &Path,
        cert_path: &Path,
    ) -> Result<CertificateAuthority, CaError> {
        let metadata = fs::symlink_metadata(key_path).map_err(io_error(key_path))?;
        if metadata.file_type().is_symlink() {
            return Err(CaError::UnsafeKey {
                path: key_path.to_owned(),
                problem: "it is a symbolic link".into(),
                fix: "replace the link with the key file itself".into(),
            });
        }
        if metadata.mode() & 0o077 != 0 {
            return Err(CaError::UnsafeKey {
                path: key_path.to_owned(),
                problem: format!(
                    "its mode is {:o}: others can read it",
                    metadata.mode() & 0o777
                ),
                fix: format!("run chmod 600 {}", key_path.display()),
            });
        }
        if metadata.uid() != nix::unistd::geteuid().as_raw() {
            return Err(CaError::UnsafeKey {
                path: key_path.to_owned(),
                problem: "it belongs to another user".into(),
                fix: "use a CA directory of your own ([mitm] ca_dir)".into(),
            });
        }
        let key_pem = fs::read_to_string(key_path).map_err(io_error(key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Invalid {
            path: key_path.to_owned(),
            message: e.to_string(),
        })?;
        let cert_pem = fs::read_to_string(cert_path).map_err(io_error(cert_path))?;
        let cert_der = pem::parse(&cert_pem)
            .ok()
            .filter(|p| p.tag() == "CERTIFICATE")
            .map(|p| CertificateDer::from(p.into_contents()))
            .ok_or_else(|| CaError::Invalid {
                path: cert_path.to_owned(),
                message: "not a PEM certificate".into(),
            })?;
        Ok(CertificateAuthority {
            directory: directory.to_owned(),
            cert_pem,
            cert_der,
            issuer: Issuer::new(ca_params(), key),
        })
    }

    fn create(
        directory: &Path,
        key_path: &Path,
        cert_path: &Path,
    ) -> Result<CertificateAuthority, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = ca_params();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + CA_VALIDITY;
        let cert = params.self_signed(&key)?;
        // The certificate first (a key without its certificate would be
        // loaded next time and fail); each file appears whole, by rename.
        write_atomically(cert_path, cert.pem().as_bytes(), 0o644)?;
        write_atomically(key_path, key.serialize_pem().as_bytes(), 0o600)?;
        tracing::info!(path = %cert_path.display(), "created the local CA for HTTPS interception");
        Ok(CertificateAuthority {
            directory: directory.to_owned(),
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(ca_params(), key),
        })
    }

    /// The CA certificate's path (what clients must trust).
    pub fn cert_path(&self) -> PathBuf {
        self.directory.join(CA_CERT_FILE)
    }

    /// The directory holding the CA.
    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a leaf for `target`: a DNS name (SAN and CN) or an IP address
    /// (IP SAN), with Authority and Subject Key Identifiers, digitalSignature
    /// key usage, serverAuth extended key usage, and [`LEAF_VALIDITY`]. The
    /// chain is the leaf then the CA.
    pub(crate) fn issue(
        &self,
        target: &Target,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let name = match target {
            Target::Host { host, .. } => host,
            Target::Unix(_) => {
                return Err(CaError::Invalid {
                    path: PathBuf::new(),
                    message: "a unix socket has no certificate".into(),
                })
            }
        };
        let mut params = CertificateParams::default();
        let common_name = match name {
            Host::Name(name) => {
                params
                    .subject_alt_names
                    .push(SanType::DnsName(name.clone().try_into()?));
                name.clone()
            }
            Host::Ip(ip) => {
                params.subject_alt_names.push(SanType::IpAddress(*ip));
                ip_text(*ip)
            }
        };
        let mut distinguished = DistinguishedName::new();
        distinguished.push(DnType::CommonName, common_name);
        params.distinguished_name = distinguished;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + LEAF_VALIDITY;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let leaf = params.signed_by(&key, &self.issuer)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![leaf.der().clone(), self.cert_der.clone()], key))
    }
}

fn ip_text(ip: IpAddr) -> String {
    ip.to_string()
}

/// Writes `bytes` to `path` whole: a temporary file with `mode` in the same
/// directory, synced, then renamed over `path`.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let directory = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = directory.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temporary)
        .map_err(io_error(&temporary))?;
    // The mode given at creation is filtered by the umask; set it exactly.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_error(&temporary))?;
    file.write_all(bytes).map_err(io_error(&temporary))?;
    file.sync_all().map_err(io_error(&temporary))?;
    fs::rename(&temporary, path).map_err(io_error(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_reused_and_unsafe_keys_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let key_path = dir.path().join(CA_KEY_FILE);
        let mode = fs::metadata(&key_path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = CertificateAuthority::load_or_create(dir.path()).unwrap();
        assert_eq!(ca.cert_pem(), again.cert_pem(), "an existing CA is reused");

        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).unwrap();
        let error = CertificateAuthority::load_or_create(dir.path()).unwrap_err();
        assert!(
            error.to_string().contains("chmod 600"),
            "the message says how to fix it: {error}"
        );
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).unwrap();

        let elsewhere = tempfile::tempdir().unwrap();
        let moved = elsewhere.path().join("key.pem");
        fs::rename(&key_path, &moved).unwrap();
        std::os::unix::fs::symlink(&moved, &key_path).unwrap();
        let error = CertificateAuthority::load_or_create(dir.path()).unwrap_err();
        assert!(error.to_string().contains("symbolic link"), "{error}");
    }

    #[test]
    fn leaves_carry_names_or_addresses_and_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
        for authority in ["api.example.com:443", "[::1]:8443", "127.0.0.1:443"] {
            let target = Target::parse_authority(authority, None).unwrap();
            let (chain, _key) = ca.issue(&target).unwrap();
            assert_eq!(chain.len(), 2, "leaf then CA");
            assert_eq!(chain[1], ca.cert_der);
        }
    }
}
