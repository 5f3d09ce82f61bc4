//! TLS for the management session: a self-signed certificate made from the node key, and
//! verifiers that accept a peer only if its certificate carries a pinned Ed25519 key.
//!
//! Names, chains and validity dates are not used: the identity is the key (as in
//! WireGuard), and possession of it is proven by the TLS 1.3 CertificateVerify signature,
//! which is checked with rustls' own verification. A peer presenting any other key is
//! refused, counted and logged with the key it presented.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{Identity, NodeId, PublicKey};

/// ALPN protocol of the management session.
pub const ALPN: &[u8] = b"detour-mgmt/1";

/// Handshakes refused because of an unknown key (shared with status output).
#[derive(Default, Debug)]
pub struct RefusedKeys {
    inner: Mutex<(u64, Option<String>)>,
    /// Node IDs of refused keys not yet handed to the overlay ([`RefusedKeys::take_recent`]).
    recent: Mutex<Vec<NodeId>>,
}

/// Refused node IDs kept for [`RefusedKeys::take_recent`] at most (a flood of handshakes
/// with made-up keys cannot grow it).
pub const RECENT_REFUSED: usize = 64;

impl RefusedKeys {
    fn record(&self, key: &str, node: Option<NodeId>) {
        let mut g = self.inner.lock().expect("refused-keys lock");
        g.0 += 1;
        g.1 = Some(key.to_string());
        drop(g);
        if let Some(id) = node {
            let mut r = self.recent.lock().expect("refused-keys lock");
            if r.len() < RECENT_REFUSED && !r.contains(&id) {
                r.push(id);
            }
        }
    }
    /// (count, last key presented).
    pub fn snapshot(&self) -> (u64, Option<String>) {
        self.inner.lock().expect("refused-keys lock").clone()
    }
    /// The node IDs refused since the last call (at most [`RECENT_REFUSED`]): nodes that
    /// dialled this one before their record reached it.
    pub fn take_recent(&self) -> Vec<NodeId> {
        std::mem::take(&mut *self.recent.lock().expect("refused-keys lock"))
    }
}

/// The public key in a certificate, if it is an Ed25519 key.
pub fn cert_key(cert: &CertificateDer<'_>) -> Option<PublicKey> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    PublicKey::from_spki_der(ee.subject_public_key_info().as_ref())
}

fn describe(cert: &CertificateDer<'_>) -> String {
    match cert_key(cert) {
        Some(k) => format!("{k} (node id {})", k.node_id()),
        None => "a non-Ed25519 or malformed certificate".to_string(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Node keys are Ed25519; nothing else is offered or accepted.
const SCHEMES: [SignatureScheme; 1] = [SignatureScheme::ED25519];
/// Sessions are TLS 1.3 only.
const TLS12_REFUSED: rustls::Error = rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered);

/// The keys the management endpoint accepts from dialling nodes: the configured peers'
/// and those of the nodes in the directory (members admitted by other members).
#[derive(Debug, Default)]
pub struct AllowedKeys(RwLock<HashSet<PublicKey>>);

impl AllowedKeys {
    /// A set of keys.
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> AllowedKeys {
        AllowedKeys(RwLock::new(keys.into_iter().collect()))
    }

    /// Admits a key.
    pub fn insert(&self, k: PublicKey) {
        self.0.write().expect("allowed keys").insert(k);
    }

    /// Withdraws a key.
    pub fn remove(&self, k: &PublicKey) {
        self.0.write().expect("allowed keys").remove(k);
    }

    /// Whether a key is admitted.
    pub fn contains(&self, k: &PublicKey) -> bool {
        self.0.read().expect("allowed keys").contains(k)
    }
}

#[derive(Debug)]
struct Pinned {
    allowed: Arc<AllowedKeys>,
    algs: WebPkiSupportedAlgorithms,
    refused: Arc<RefusedKeys>,
    role: &'static str,
}

impl Pinned {
    fn tls13(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        match cert_key(cert) {
            Some(k) if self.allowed.contains(&k) => Ok(()),
            _ => {
                let who = describe(cert);
                tracing::warn!("refused management {} presenting key {who}: neither a configured peer nor a node in the directory", self.role);
                // A dialler this node does not know yet: the overlay asks for its record.
                let dialler = if self.role == "client" { cert_key(cert).map(|k| k.node_id()) } else { None };
                self.refused.record(&who, dialler);
                Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
            }
        }
    }
}

#[derive(Debug)]
struct PinnedServer(Pinned);

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.check(end_entity).map(|_| ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(&self, _: &[u8], _: &CertificateDer<'_>, _: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(TLS12_REFUSED)
    }
    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

#[derive(Debug)]
struct PinnedClient(Pinned);

impl ClientCertVerifier for PinnedClient {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(&self, end_entity: &CertificateDer<'_>, _intermediates: &[CertificateDer<'_>], _now: UnixTime) -> Result<ClientCertVerified, rustls::Error> {
        self.0.check(end_entity).map(|_| ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(&self, _: &[u8], _: &CertificateDer<'_>, _: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(TLS12_REFUSED)
    }
    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

/// This node's certificate and key, made once at start.
pub struct NodeCert {
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

impl NodeCert {
    /// Makes a self-signed certificate for the node key.
    ///
    /// # Errors
    /// If rcgen cannot encode the certificate.
    pub fn new(identity: &Identity) -> Result<NodeCert> {
        let der = identity.pkcs8_der();
        let pkcs8 = PrivatePkcs8KeyDer::from(der.clone());
        let kp = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519).context("loading the node key into rcgen")?;
        let mut params = rcgen::CertificateParams::new(vec!["detour".to_string()]).context("certificate parameters")?;
        params.distinguished_name.push(rcgen::DnType::CommonName, identity.node_id().to_string());
        let cert = params.self_signed(&kp).context("self-signing the node certificate")?;
        Ok(NodeCert { cert: cert.der().clone(), key: der })
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()))
    }
}

/// Server side: accepts the keys in `allowed` (which may change while it runs).
///
/// # Errors
/// rustls configuration errors.
pub fn server_config(node: &NodeCert, allowed: Arc<AllowedKeys>, refused: Arc<RefusedKeys>) -> Result<rustls::ServerConfig> {
    let p = provider();
    let verifier = PinnedClient(Pinned { allowed, algs: p.signature_verification_algorithms, refused, role: "client" });
    let mut cfg = rustls::ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(vec![node.cert.clone()], node.key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// Client side for dialling one peer: accepts only that peer's key.
///
/// # Errors
/// rustls configuration errors.
pub fn client_config(node: &NodeCert, peer: PublicKey, refused: Arc<RefusedKeys>) -> Result<rustls::ClientConfig> {
    let p = provider();
    let verifier = PinnedServer(Pinned { allowed: Arc::new(AllowedKeys::new([peer])), algs: p.signature_verification_algorithms, refused, role: "server" });
    let mut cfg = rustls::ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(vec![node.cert.clone()], node.key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_carries_the_node_key() {
        let id = Identity::from_seed([4; 32]);
        let c = NodeCert::new(&id).unwrap();
        assert_eq!(cert_key(&c.cert), Some(id.public_key()));
    }

    #[test]
    fn only_pinned_keys_pass_and_refusals_are_recorded() {
        let good = Identity::from_seed([1; 32]);
        let bad = Identity::from_seed([2; 32]);
        let refused = Arc::new(RefusedKeys::default());
        let p = provider();
        let v = Pinned { allowed: Arc::new(AllowedKeys::new([good.public_key()])), algs: p.signature_verification_algorithms, refused: refused.clone(), role: "client" };
        assert!(v.check(&NodeCert::new(&good).unwrap().cert).is_ok());
        assert!(v.check(&NodeCert::new(&bad).unwrap().cert).is_err());
        assert!(v.check(&CertificateDer::from(vec![0u8; 10])).is_err());
        let (n, last) = refused.snapshot();
        assert_eq!(n, 2);
        assert_eq!(last.as_deref(), Some("a non-Ed25519 or malformed certificate"));
    }
}
