//! `lode certs init`: a cluster CA and certificates for the namenode, each datanode, an admin and a
//! user. Role and name are in the subject (OU and CN); servers read them from the verified certificate.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use lode_protocol::net::{Role, NAMENODE_SERVER_NAME};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::error::Error;

/// Writes `ca.pem` (+ `ca-key.pem`) and `<name>.pem` / `<name>-key.pem` for `namenode`, `dn-1..dn-N`,
/// `admin` and `user` into `dir`. Keys are created mode 0600. Refuses to overwrite an existing CA.
pub fn init(dir: &Path, datanodes: u32) -> Result<Vec<String>, Error> {
    fs::create_dir_all(dir).map_err(|e| Error::local(dir, e))?;
    if dir.join("ca.pem").exists() {
        return Err(Error::Invalid(format!(
            "{}: already holds a CA (ca.pem); choose another --dir",
            dir.display()
        )));
    }
    let tls = |e: rcgen::Error| Error::Invalid(format!("certificate generation: {e}"));
    let ca_key = KeyPair::generate().map_err(tls)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "lode cluster CA");
    ca_params
        .distinguished_name
        .push(DnType::OrganizationName, "lode");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_after = rcgen::date_time_ymd(2099, 1, 1);
    let ca_cert = ca_params.self_signed(&ca_key).map_err(tls)?;
    write(dir, "ca.pem", ca_cert.pem().as_bytes(), false)?;
    write(dir, "ca-key.pem", ca_key.serialize_pem().as_bytes(), true)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut made = vec!["ca".to_string()];
    let mut leaves = vec![(NAMENODE_SERVER_NAME.to_string(), Role::Namenode)];
    leaves.extend((1..=datanodes).map(|i| (format!("dn-{i}"), Role::Datanode)));
    leaves.push(("admin".into(), Role::Admin));
    leaves.push(("user".into(), Role::User));
    for (name, role) in leaves {
        leaf(dir, &issuer, &name, role)?;
        made.push(name);
    }
    Ok(made)
}

/// Issues one more certificate (a new datanode, user or admin) with the CA in `dir` (`ca.pem` and
/// `ca-key.pem` from [`init`]). Refuses to overwrite an existing certificate.
pub fn issue(dir: &Path, name: &str, role: Role) -> Result<(), Error> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if !valid {
        return Err(Error::Invalid(format!(
            "certificate name {name:?} must be [A-Za-z0-9._-]"
        )));
    }
    if dir.join(format!("{name}.pem")).exists() {
        return Err(Error::Invalid(format!(
            "{}: already holds a certificate for {name}",
            dir.display()
        )));
    }
    let read = |f: &str| fs::read_to_string(dir.join(f)).map_err(|e| Error::local(dir.join(f), e));
    let tls = |e: rcgen::Error| Error::Invalid(format!("certificate generation: {e}"));
    let key = KeyPair::from_pem(&read("ca-key.pem")?).map_err(tls)?;
    let issuer = Issuer::from_ca_cert_pem(&read("ca.pem")?, key).map_err(tls)?;
    leaf(dir, &issuer, name, role)
}

/// Makes, signs and writes one leaf certificate and its key.
fn leaf(dir: &Path, issuer: &Issuer<'_, KeyPair>, name: &str, role: Role) -> Result<(), Error> {
    let tls = |e: rcgen::Error| Error::Invalid(format!("certificate generation: {e}"));
    let key = KeyPair::generate().map_err(tls)?;
    let mut params = CertificateParams::new(vec![name.to_string()]).map_err(tls)?;
    if role == Role::Namenode || role == Role::Datanode {
        params
            .subject_alt_names
            .push(SanType::DnsName("localhost".try_into().map_err(tls)?));
    }
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, role.as_str());
    params
        .distinguished_name
        .push(DnType::OrganizationName, "lode");
    params.not_after = rcgen::date_time_ymd(2099, 1, 1);
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, issuer).map_err(tls)?;
    write(dir, &format!("{name}.pem"), cert.pem().as_bytes(), false)?;
    write(
        dir,
        &format!("{name}-key.pem"),
        key.serialize_pem().as_bytes(),
        true,
    )
}

fn write(dir: &Path, name: &str, bytes: &[u8], secret: bool) -> Result<(), Error> {
    let path = dir.join(name);
    let mut opts = fs::OpenOptions::new();
    opts.write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 });
    let mut f = opts.open(&path).map_err(|e| Error::local(&path, e))?;
    f.write_all(bytes).map_err(|e| Error::local(&path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    fn first_der(path: &Path) -> Vec<u8> {
        CertificateDer::from_pem_file(path).unwrap().to_vec()
    }

    #[test]
    fn roles_and_names_are_in_the_certificates() {
        let d = tempfile::tempdir().unwrap();
        let made = init(d.path(), 2).unwrap();
        assert_eq!(
            made,
            vec!["ca", "namenode", "dn-1", "dn-2", "admin", "user"]
        );
        let id =
            lode_protocol::net::identity_from_der(&first_der(&d.path().join("dn-2.pem"))).unwrap();
        assert_eq!((id.role, id.name.as_str()), (Role::Datanode, "dn-2"));
        let user =
            lode_protocol::net::identity_from_der(&first_der(&d.path().join("user.pem"))).unwrap();
        assert_eq!(user.role, Role::User);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(d.path().join("admin-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0);
        assert!(
            init(d.path(), 1).is_err(),
            "an existing CA is never overwritten"
        );
    }
}
