//! `lode certs init`: a cluster CA and certificates for the namenode, each datanode, an admin and a
//! user. Role and name are in the subject (OU and CN); servers read them from the verified certificate.
//!
//! Lifetimes: the CA is valid for [`CA_DAYS`], every other certificate for [`LEAF_DAYS`] (from a day
//! before it was made, for clocks a little behind); `lode certs renew` issues a fresh key and
//! certificate for the same name and role. Key usage is digital signature; the extended key usage
//! is server and client authentication for the namenode and datanodes, client authentication only
//! for admins and users (whose certificates name no host either), so no user certificate can pose
//! as a server.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use lode_protocol::net::{Role, NAMENODE_SERVER_NAME};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::error::Error;

/// Days a cluster CA is valid.
pub const CA_DAYS: i64 = 3650;
/// Days every other certificate is valid; renew before then (`lode certs renew`).
pub const LEAF_DAYS: i64 = 365;

/// `[now - 1 day, now + days]`.
fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(days);
}

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
    validity(&mut ca_params, CA_DAYS);
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
    check_name(name)?;
    if dir.join(format!("{name}.pem")).exists() {
        return Err(Error::Invalid(format!(
            "{}: already holds a certificate for {name}",
            dir.display()
        )));
    }
    leaf(dir, &ca_issuer(dir)?, name, role)
}

/// Renews `name`'s certificate with the CA in `dir`: a fresh key and a certificate for the same
/// name and role, valid [`LEAF_DAYS`] from now. The old pair is kept as `NAME.pem.old` and
/// `NAME-key.pem.old`. Returns the role.
pub fn renew(dir: &Path, name: &str) -> Result<Role, Error> {
    check_name(name)?;
    let pem = dir.join(format!("{name}.pem"));
    let der = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_file(&pem).map_err(|e| {
            Error::Invalid(format!("{}: no certificate to renew: {e}", pem.display()))
        })?
    };
    let id = lode_protocol::net::identity_from_der(&der).ok_or_else(|| {
        Error::Invalid(format!(
            "{}: not a certificate of this cluster",
            pem.display()
        ))
    })?;
    if id.name != name {
        return Err(Error::Invalid(format!(
            "{}: is {}'s certificate",
            pem.display(),
            id.name
        )));
    }
    let issuer = ca_issuer(dir)?;
    for f in [format!("{name}.pem"), format!("{name}-key.pem")] {
        let from = dir.join(&f);
        let to = dir.join(format!("{f}.old"));
        fs::rename(&from, &to).map_err(|e| Error::local(&from, e))?;
    }
    leaf(dir, &issuer, name, id.role)?;
    Ok(id.role)
}

/// The SHA-256 fingerprint of the certificate in a PEM file (what `[tls] deny` lists).
pub fn fingerprint(pem: &Path) -> Result<String, Error> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_file(pem)
        .map_err(|e| Error::Invalid(format!("{}: no certificate: {e}", pem.display())))?;
    Ok(lode_protocol::net::fingerprint(&der))
}

fn check_name(name: &str) -> Result<(), Error> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if !valid {
        return Err(Error::Invalid(format!(
            "certificate name {name:?} must be [A-Za-z0-9._-]"
        )));
    }
    Ok(())
}

/// The CA in `dir` (`ca.pem` and `ca-key.pem` from [`init`]).
fn ca_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, Error> {
    let read = |f: &str| fs::read_to_string(dir.join(f)).map_err(|e| Error::local(dir.join(f), e));
    let tls = |e: rcgen::Error| Error::Invalid(format!("certificate generation: {e}"));
    let key = KeyPair::from_pem(&read("ca-key.pem")?).map_err(tls)?;
    Issuer::from_ca_cert_pem(&read("ca.pem")?, key).map_err(tls)
}

/// Makes, signs and writes one leaf certificate and its key.
fn leaf(dir: &Path, issuer: &Issuer<'_, KeyPair>, name: &str, role: Role) -> Result<(), Error> {
    let tls = |e: rcgen::Error| Error::Invalid(format!("certificate generation: {e}"));
    let key = KeyPair::generate().map_err(tls)?;
    let server = role == Role::Namenode || role == Role::Datanode;
    let mut hosts = if server {
        vec![name.to_string()]
    } else {
        vec![]
    };
    // Every member of a namenode group answers to the name clients ask for, as well as its own
    // (which the other members ask for).
    if role == Role::Namenode && name != NAMENODE_SERVER_NAME {
        hosts.push(NAMENODE_SERVER_NAME.to_string());
    }
    let mut params = CertificateParams::new(hosts).map_err(tls)?;
    if server {
        params
            .subject_alt_names
            .push(SanType::DnsName("localhost".try_into().map_err(tls)?));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
    } else {
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, role.as_str());
    params
        .distinguished_name
        .push(DnType::OrganizationName, "lode");
    validity(&mut params, LEAF_DAYS);
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

    #[test]
    fn certificates_last_a_year_say_what_they_are_for_and_renew() {
        let d = tempfile::tempdir().unwrap();
        init(d.path(), 1).unwrap();
        let check = |name: &str, server: bool| {
            let der = first_der(&d.path().join(format!("{name}.pem")));
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            let v = cert.validity();
            let days = (v.not_after.timestamp() - v.not_before.timestamp()) / 86_400;
            assert_eq!(days, LEAF_DAYS + 1, "{name}: valid {days} days");
            let eku = cert.extended_key_usage().unwrap().unwrap().value;
            assert_eq!((eku.server_auth, eku.client_auth), (server, true), "{name}");
            assert!(cert.key_usage().unwrap().unwrap().value.digital_signature());
            der
        };
        check("namenode", true);
        let before = check("dn-1", true);
        check("admin", false);
        check("user", false);
        assert_eq!(renew(d.path(), "dn-1").unwrap(), Role::Datanode);
        let after = check("dn-1", true);
        assert_ne!(before, after);
        assert_eq!(
            lode_protocol::net::identity_from_der(&after).unwrap().name,
            "dn-1"
        );
        assert!(
            d.path().join("dn-1.pem.old").exists() && d.path().join("dn-1-key.pem.old").exists()
        );
        assert!(renew(d.path(), "nobody").is_err());
    }
}
