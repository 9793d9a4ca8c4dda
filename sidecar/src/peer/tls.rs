//! Mutual TLS between the sidecars of a fleet (rustls with the ring provider). With
//! `peers.tls_cert_file`, `peers.tls_key_file` and `peers.tls_ca_file` set, the peer API accepts
//! only TLS connections whose client certificate the fleet's CA signed, and this sidecar presents
//! its own certificate to its peers and trusts only that CA. The bearer token is checked too.

use std::path::Path;
use std::sync::Arc;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::PeersConfig;

/// The TLS settings of a fleet, loaded from `peers.tls_*`.
#[derive(Clone)]
pub struct Tls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    client: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls(..)")
    }
}

// NOTE: rustls 0.23.48 deprecates its ring provider because it lacks post-quantum key exchange.
// The aws-lc-rs provider has it but needs cmake and a long C build; peers use ring until then.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path, setting: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let read: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path).map_err(|error| format!("cannot read {setting} {}: {error}", path.display()))?.collect();
    let certificates = read.map_err(|error| format!("invalid PEM certificate in {setting} {}: {error}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!("{setting} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", path.display()));
    }
    Ok(certificates)
}

impl Tls {
    /// Loads the certificates and key named by `peers.tls_*`; None when TLS is off.
    pub fn load(config: &PeersConfig) -> Result<Option<Tls>, String> {
        let (Some(cert_file), Some(key_file), Some(ca_file)) = (&config.tls_cert_file, &config.tls_key_file, &config.tls_ca_file) else {
            return Ok(None);
        };
        let chain = certificates(cert_file, "peers.tls_cert_file")?;
        let key = PrivateKeyDer::from_pem_file(key_file).map_err(|error| format!("cannot read a PEM private key from peers.tls_key_file {}: {error}", key_file.display()))?;
        let mut roots = RootCertStore::empty();
        for certificate in certificates(ca_file, "peers.tls_ca_file")? {
            roots.add(certificate).map_err(|error| format!("invalid CA certificate in peers.tls_ca_file {}: {error}", ca_file.display()))?;
        }
        let roots = Arc::new(roots);

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|error| format!("cannot verify clients with peers.tls_ca_file {}: {error}", ca_file.display()))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|error| error.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|error| format!("peers.tls_cert_file and peers.tls_key_file do not form a usable certificate and key: {error}"))?;
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|error| error.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|error| format!("peers.tls_cert_file and peers.tls_key_file do not form a usable client certificate: {error}"))?;
        let server_name = match &config.tls_server_name {
            Some(name) => Some(ServerName::try_from(name.clone()).map_err(|error| format!("invalid peers.tls_server_name {name:?}: {error}"))?),
            None => None,
        };
        Ok(Some(Tls { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)), client: Arc::new(client), server_name }))
    }
}

/// Returns the connector for peer requests: HTTPS with this sidecar's client certificate when
/// `tls` is set, plain HTTP otherwise.
pub fn connector(tls: Option<&Tls>) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    match tls {
        Some(tls) => {
            let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config((*tls.client).clone()).https_only();
            let builder = match &tls.server_name {
                Some(name) => builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name.clone())),
                None => builder,
            };
            builder.enable_http1().wrap_connector(http)
        }
        None => {
            // A configuration without roots: only plain http:// peers are configured then.
            let empty = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth();
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(empty).https_or_http().enable_http1().wrap_connector(http)
        }
    }
}
