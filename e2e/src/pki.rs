//! The control plane's keys and certificates, made fresh for every cluster with rcgen: a CA,
//! the API server's serving certificate, and the service-account token signing key.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// PEM files of one cluster.
#[derive(Debug)]
pub struct Pki {
    /// The CA certificate (clients trust it).
    pub ca_cert: String,
    /// The API server's certificate, for 127.0.0.1, localhost and the in-cluster names.
    pub serving_cert: String,
    /// Its private key.
    pub serving_key: String,
    /// ECDSA P-256 key that signs service-account tokens (ES256).
    pub service_account_key: String,
    /// Its public key (the API server verifies tokens with it).
    pub service_account_public_key: String,
}

impl Pki {
    /// Generate a new CA and everything signed by it.
    pub fn generate() -> Result<Self, rcgen::Error> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "taper-e2e-ca");
        ca.distinguished_name = dn;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![
            "localhost".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default".to_string(),
            "kubernetes.default.svc".to_string(),
            "kubernetes.default.svc.cluster.local".to_string(),
        ])?;
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .subject_alt_names
            .push(SanType::IpAddress([10, 96, 0, 1].into()));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "kube-apiserver");
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving = params.signed_by(&key, &issuer)?;

        let sa = KeyPair::generate()?;
        Ok(Self {
            ca_cert: ca_cert.pem(),
            serving_cert: serving.pem(),
            serving_key: key.serialize_pem(),
            service_account_key: sa.serialize_pem(),
            service_account_public_key: sa.public_key_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_pem_files() {
        let pki = Pki::generate().expect("pki");
        assert!(pki.ca_cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(pki.serving_cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(pki.serving_key.contains("PRIVATE KEY"));
        assert!(pki.service_account_key.contains("PRIVATE KEY"));
        assert_ne!(pki.serving_key, pki.service_account_key);
    }
}
