//! Certificates for a TLS broker that authenticates clients by certificate: a CA, the
//! broker's certificate, a client certificate the CA signed and one it did not.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

/// A PEM certificate and its private key.
pub struct Identity {
    pub certificate: String,
    pub key: String,
}

pub struct TestPki {
    pub ca: String,
    /// Signed by the CA.
    pub client: Identity,
    /// Signed by another CA: the broker must refuse it.
    pub stranger: Identity,
}

impl TestPki {
    /// Makes the certificates and writes what `blocksmith-broker --tls dir` reads (ca.pem,
    /// server.pem, server-key.pem) into `dir`. The broker's certificate names `hosts`.
    pub fn generate(dir: &Path, hosts: &[&str]) -> anyhow::Result<TestPki> {
        let (ca_pem, ca) = certificate_authority("blocksmith e2e CA")?;
        let (_, other_ca) = certificate_authority("someone else's CA")?;
        let server = leaf(&ca, hosts, "broker", ExtendedKeyUsagePurpose::ServerAuth)?;
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("ca.pem"), &ca_pem)?;
        std::fs::write(dir.join("server.pem"), &server.certificate)?;
        std::fs::write(dir.join("server-key.pem"), &server.key)?;
        Ok(TestPki {
            ca: ca_pem,
            client: leaf(&ca, &[], "pipeline", ExtendedKeyUsagePurpose::ClientAuth)?,
            stranger: leaf(
                &other_ca,
                &[],
                "pipeline",
                ExtendedKeyUsagePurpose::ClientAuth,
            )?,
        })
    }
}

fn certificate_authority(name: &str) -> anyhow::Result<(String, Issuer<'static, KeyPair>)> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate()?;
    let certificate = params.self_signed(&key)?;
    Ok((certificate.pem(), Issuer::new(params, key)))
}

fn leaf(
    issuer: &Issuer<'static, KeyPair>,
    hosts: &[&str],
    name: &str,
    usage: ExtendedKeyUsagePurpose,
) -> anyhow::Result<Identity> {
    let mut params =
        CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages.push(usage);
    let key = KeyPair::generate()?;
    let certificate = params.signed_by(&key, issuer)?;
    Ok(Identity {
        certificate: certificate.pem(),
        key: key.serialize_pem(),
    })
}
