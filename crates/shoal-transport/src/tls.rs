//! TLS 1.3 with RFC 7250 raw public keys: each side presents its Ed25519
//! public key (as a SubjectPublicKeyInfo) instead of an X.509 certificate and
//! proves it holds the secret half by signing the handshake. The custom
//! verifiers below accept exactly one key type (Ed25519), check the
//! handshake signature with the provider's algorithms, and compare the key
//! with the peer id the caller expects.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer,
    UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, PeerIncompatible,
    SignatureScheme,
};

use crate::identity::{PeerId, SecretKey};

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE {
/// SEQUENCE { OID 1.3.101.112 }, BIT STRING (32 bytes) }.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// DER prefix of an Ed25519 PKCS#8 v1 private key (RFC 8410): SEQUENCE {
/// INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING (32
/// bytes) } }.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The SubjectPublicKeyInfo DER of a peer id.
pub(crate) fn spki(id: &PeerId) -> Vec<u8> {
    let mut der = Vec::with_capacity(44);
    der.extend_from_slice(&ED25519_SPKI_PREFIX);
    der.extend_from_slice(id.as_bytes());
    der
}

/// The peer id in a raw public key "certificate": an Ed25519
/// SubjectPublicKeyInfo, and nothing else.
pub(crate) fn peer_id_from_spki(der: &[u8]) -> Result<PeerId, Error> {
    let key = der
        .strip_prefix(&ED25519_SPKI_PREFIX[..])
        .ok_or(Error::InvalidCertificate(CertificateError::BadEncoding))?;
    PeerId::from_bytes(key).map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))
}

/// The ring provider restricted to what shoal uses.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The raw public key and signing key that rustls presents for `secret`.
pub(crate) fn certified_key(
    provider: &CryptoProvider,
    secret: &SecretKey,
) -> Result<Arc<CertifiedKey>, Error> {
    let mut pkcs8 = Vec::with_capacity(48);
    pkcs8.extend_from_slice(&ED25519_PKCS8_PREFIX);
    pkcs8.extend_from_slice(secret.signing_key().as_bytes());
    let key = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8)))?;
    let cert = CertificateDer::from(spki(&secret.public()));
    Ok(Arc::new(CertifiedKey::new(vec![cert], key)))
}

/// A decision on whether a client with a valid key may connect.
pub type PeerFilter = Arc<dyn Fn(&PeerId) -> bool + Send + Sync>;

/// Verifies the server's key when dialing, and records the key it saw so a
/// mismatch can be reported with both ids.
#[derive(Debug)]
pub(crate) struct ServerVerifier {
    algorithms: WebPkiSupportedAlgorithms,
    expected: Option<PeerId>,
    seen: Arc<Mutex<Option<PeerId>>>,
}

impl ServerVerifier {
    pub(crate) fn new(
        provider: &CryptoProvider,
        expected: Option<PeerId>,
    ) -> (Self, Arc<Mutex<Option<PeerId>>>) {
        let seen = Arc::new(Mutex::new(None));
        let verifier = ServerVerifier {
            algorithms: provider.signature_verification_algorithms,
            expected,
            seen: seen.clone(),
        };
        (verifier, seen)
    }
}

fn check_single(intermediates: &[CertificateDer<'_>]) -> Result<(), Error> {
    if intermediates.is_empty() {
        Ok(())
    } else {
        Err(Error::InvalidCertificate(CertificateError::BadEncoding))
    }
}

/// Check a TLS 1.3 handshake signature, made with Ed25519, by the raw key
/// `spki`.
pub(crate) fn verify_signature(
    algorithms: &WebPkiSupportedAlgorithms,
    message: &[u8],
    spki: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(Error::PeerIncompatible(
            PeerIncompatible::NoSignatureSchemesInCommon,
        ));
    }
    // only Ed25519 keys get this far, but check before handing it to webpki
    peer_id_from_spki(spki)?;
    rustls::crypto::verify_tls13_signature_with_raw_key(
        message,
        &SubjectPublicKeyInfoDer::from(spki.as_ref()),
        dss,
        algorithms,
    )
}

fn tls12_refused() -> Result<HandshakeSignatureValid, Error> {
    Err(Error::PeerIncompatible(
        PeerIncompatible::Tls13RequiredForQuic,
    ))
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        check_single(intermediates)?;
        let id = peer_id_from_spki(end_entity)?;
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(id);
        }
        match self.expected {
            Some(expected) if expected != id => Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_signature(&self.algorithms, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// Verifies the client's key on incoming connections; client authentication
/// is mandatory, so the server always learns who dialed.
pub(crate) struct ClientVerifier {
    algorithms: WebPkiSupportedAlgorithms,
    filter: Option<PeerFilter>,
}

impl std::fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientVerifier")
            .field("filter", &self.filter.is_some())
            .finish_non_exhaustive()
    }
}

impl ClientVerifier {
    pub(crate) fn new(provider: &CryptoProvider, filter: Option<PeerFilter>) -> Self {
        ClientVerifier {
            algorithms: provider.signature_verification_algorithms,
            filter,
        }
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        check_single(intermediates)?;
        let id = peer_id_from_spki(end_entity)?;
        match &self.filter {
            Some(allow) if !allow(&id) => Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(ClientCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_signature(&self.algorithms, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// The rustls server configuration: TLS 1.3 only, our raw key, mandatory
/// client keys, ALPN `shoal/1`, no session tickets (every handshake proves
/// both keys afresh).
pub(crate) fn server_config(
    provider: Arc<CryptoProvider>,
    key: Arc<CertifiedKey>,
    filter: Option<PeerFilter>,
) -> Result<rustls::ServerConfig, Error> {
    let verifier = Arc::new(ClientVerifier::new(&provider, filter));
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(
            rustls::server::AlwaysResolvesServerRawPublicKeys::new(key),
        ));
    config.alpn_protocols = vec![shoal_proto::ALPN.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The rustls client configuration for one dial: the verifier carries the
/// peer id the caller expects.
pub(crate) fn client_config(
    provider: Arc<CryptoProvider>,
    key: Arc<CertifiedKey>,
    verifier: ServerVerifier,
) -> Result<rustls::ClientConfig, Error> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(
            rustls::client::AlwaysResolvesClientRawPublicKeys::new(key),
        ));
    config.alpn_protocols = vec![shoal_proto::ALPN.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_early_data = false;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Signer;
    use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};

    #[test]
    fn der_prefixes_match_the_standard_encoding() {
        let secret = SecretKey::generate();
        let spki_der = secret
            .signing_key()
            .verifying_key()
            .to_public_key_der()
            .unwrap();
        assert_eq!(spki_der.as_bytes(), spki(&secret.public()).as_slice());
        let pkcs8 = secret.signing_key().to_pkcs8_der().unwrap();
        // dalek writes PKCS#8 v2 (with the public key); the algorithm and
        // the seed's wrapping are the same as in our v1 prefix
        assert_eq!(&pkcs8.as_bytes()[5..16], &ED25519_PKCS8_PREFIX[5..]);
        assert_eq!(
            peer_id_from_spki(&spki_der.to_vec()).unwrap(),
            secret.public()
        );
        certified_key(&provider(), &secret).unwrap();
    }

    #[test]
    fn spki_must_be_an_ed25519_key() {
        let id = SecretKey::generate().public();
        let mut der = spki(&id);
        der[8] = 0x71; // another OID
        assert!(peer_id_from_spki(&der).is_err());
        assert!(peer_id_from_spki(&spki(&id)[..43]).is_err());
        assert!(peer_id_from_spki(b"garbage").is_err());
    }

    fn dss(scheme: SignatureScheme, sig: Vec<u8>) -> DigitallySignedStruct {
        // DigitallySignedStruct has no public constructor: decode it from
        // its wire form (u16 scheme, u16 length, signature).
        use rustls::internal::msgs::codec::{Codec, Reader};
        let mut wire = Vec::new();
        wire.extend_from_slice(&u16::from(scheme).to_be_bytes());
        wire.extend_from_slice(&(sig.len() as u16).to_be_bytes());
        wire.extend_from_slice(&sig);
        DigitallySignedStruct::read(&mut Reader::init(&wire)).unwrap()
    }

    #[test]
    fn signature_must_come_from_the_presented_key() {
        let algs = provider().signature_verification_algorithms;
        let alice = SecretKey::generate();
        let mallory = SecretKey::generate();
        let msg = b"handshake transcript";
        let good = dss(
            SignatureScheme::ED25519,
            alice.signing_key().sign(msg).to_bytes().to_vec(),
        );
        let forged = dss(
            SignatureScheme::ED25519,
            mallory.signing_key().sign(msg).to_bytes().to_vec(),
        );
        let alice_cert = CertificateDer::from(spki(&alice.public()));
        assert!(verify_signature(&algs, msg, &alice_cert, &good).is_ok());
        assert!(verify_signature(&algs, msg, &alice_cert, &forged).is_err());
        assert!(verify_signature(&algs, b"other", &alice_cert, &good).is_err());
        let wrong_scheme = dss(
            SignatureScheme::ECDSA_NISTP256_SHA256,
            alice.signing_key().sign(msg).to_bytes().to_vec(),
        );
        assert!(verify_signature(&algs, msg, &alice_cert, &wrong_scheme).is_err());
    }

    #[test]
    fn server_verifier_checks_the_expected_id() {
        let p = provider();
        let alice = SecretKey::generate().public();
        let bob = SecretKey::generate().public();
        let cert = CertificateDer::from(spki(&alice));
        let name = ServerName::try_from("shoal").unwrap();
        let now = UnixTime::now();

        let (v, seen) = ServerVerifier::new(&p, Some(bob));
        assert!(v.verify_server_cert(&cert, &[], &name, &[], now).is_err());
        assert_eq!(*seen.lock().unwrap(), Some(alice));

        let (v, _) = ServerVerifier::new(&p, Some(alice));
        assert!(v.verify_server_cert(&cert, &[], &name, &[], now).is_ok());
        assert!(
            v.verify_server_cert(&cert, std::slice::from_ref(&cert), &name, &[], now)
                .is_err()
        );

        let (v, seen) = ServerVerifier::new(&p, None);
        assert!(v.verify_server_cert(&cert, &[], &name, &[], now).is_ok());
        assert_eq!(*seen.lock().unwrap(), Some(alice));
    }

    #[test]
    fn client_verifier_applies_the_filter() {
        let p = provider();
        let alice = SecretKey::generate().public();
        let bob = SecretKey::generate().public();
        let only_alice: PeerFilter = Arc::new(move |id| *id == alice);
        let v = ClientVerifier::new(&p, Some(only_alice));
        let now = UnixTime::now();
        assert!(v.client_auth_mandatory());
        assert!(
            v.verify_client_cert(&CertificateDer::from(spki(&alice)), &[], now)
                .is_ok()
        );
        assert!(
            v.verify_client_cert(&CertificateDer::from(spki(&bob)), &[], now)
                .is_err()
        );
        assert!(
            v.verify_client_cert(&CertificateDer::from(b"junk".to_vec()), &[], now)
                .is_err()
        );
    }
}
