//! The CA certificates origins (through interception) and `https://`
//! upstream proxies are checked against: the system's, read on the first
//! TLS handshake that needs them rather than at start.
//!
//! Reading and parsing the system's bundle (a few hundred PEM
//! certificates) was four fifths of the instructions `portcullis run --
//! true` spent, for a command that may never open a TLS connection through
//! us. [`SystemRoots`] is a [`ServerCertVerifier`] that builds rustls's own
//! WebPKI verifier once, when a server's certificate is first checked, and
//! hands every check to it: the checks are rustls's, unchanged. If no CA
//! can be loaded, every certificate is refused (fail closed), as an empty
//! root store refused them before.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Verifies servers against the system's CAs and `extra`, loaded on first
/// use.
#[derive(Debug)]
pub(crate) struct SystemRoots {
    extra: Vec<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
    verifier: OnceLock<Result<Arc<WebPkiServerVerifier>, rustls::Error>>,
}

impl SystemRoots {
    /// Trusts the system's CAs and `extra` (the operator's added CAs).
    pub(crate) fn new(
        extra: Vec<CertificateDer<'static>>,
        provider: Arc<CryptoProvider>,
    ) -> SystemRoots {
        SystemRoots {
            extra,
            provider,
            verifier: OnceLock::new(),
        }
    }

    fn verifier(&self) -> Result<&Arc<WebPkiServerVerifier>, rustls::Error> {
        self.verifier
            .get_or_init(|| self.load())
            .as_ref()
            .map_err(Clone::clone)
    }

    fn load(&self) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
        let (roots, ignored) = extra_and_system(self.extra.iter().cloned());
        if ignored > 0 {
            tracing::warn!(
                ignored,
                "some extra upstream CA certificates could not be used"
            );
        }
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|error| {
                tracing::warn!(%error, "no CA certificates to check TLS origins against: every one is refused");
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            })
    }
}

/// A root store of `extra` and then the system's CAs, and how many of
/// `extra` could not be used (what that means is the caller's to say).
pub(crate) fn extra_and_system(
    extra: impl IntoIterator<Item = CertificateDer<'static>>,
) -> (rustls::RootCertStore, usize) {
    let mut roots = rustls::RootCertStore::empty();
    let (_, ignored) = roots.add_parsable_certificates(extra);
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(%error, "while loading the system's CA certificates");
    }
    let (added, unusable) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(added, unusable, "system CA certificates");
    (roots, ignored)
}

impl ServerCertVerifier for SystemRoots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verifier()?.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    #[test]
    fn nothing_is_read_until_a_certificate_is_checked() {
        let roots = SystemRoots::new(Vec::new(), provider());
        assert!(roots.verifier.get().is_none());
        assert!(!roots.supported_verify_schemes().is_empty());
        assert!(roots.verifier.get().is_none());
    }

    #[test]
    fn a_certificate_no_ca_signed_is_refused() {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["origin.test".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let roots = SystemRoots::new(Vec::new(), provider());
        let name = ServerName::try_from("origin.test").unwrap();
        let refused = roots.verify_server_cert(cert.der(), &[], &name, &[], UnixTime::now());
        assert!(refused.is_err(), "{refused:?}");
        assert!(roots.verifier.get().is_some());
        // Trusted once it is one of the extra CAs.
        let trusted = SystemRoots::new(vec![cert.der().clone()], provider());
        let checked = trusted.verify_server_cert(cert.der(), &[], &name, &[], UnixTime::now());
        assert!(checked.is_ok(), "{checked:?}");
    }
}
