//! A nats-server as deploy/ runs one: the shipped accounts and users
//! (deploy/nats-accounts.conf), TLS with client certificates from a test CA.

use super::{repo_root, NatsServer};
use natter_shared::nats::NatsSettings;
use natter_shared::secret::Secret;
use std::path::Path;
use std::process::Command;

pub const WORKER_PASSWORD: &str = "worker-secret-1";
pub const FRONTEND_PASSWORD: &str = "frontend-secret-2";

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
    assert!(status.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&status.stderr));
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all
/// signed by the CA, in `dir`.
pub fn make_certs(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=natter test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    for (name, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
        let ext = format!("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n");
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}-key.pem"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN=natter {name}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
}

pub fn secure_server(certs: &Path) -> NatsServer {
    let accounts = repo_root().join("deploy/nats-accounts.conf");
    let certs = certs.to_path_buf();
    NatsServer::start_with_config(
        move |port, store| {
            let dir = store.parent().unwrap();
            std::fs::copy(&accounts, dir.join("nats-accounts.conf")).unwrap();
            let cert = |name: &str| certs.join(name).display().to_string();
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\" }}\n\
                 tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true }}\n\
                 include ./nats-accounts.conf\n",
                store.display(),
                cert("server.pem"),
                cert("server-key.pem"),
                cert("ca.pem"),
            )
        },
        &[
            ("NATTER_WORKER_PASSWORD", WORKER_PASSWORD),
            ("NATTER_FRONTEND_PASSWORD", FRONTEND_PASSWORD),
            ("NATTER_ADMIN_PASSWORD", "admin-secret-3"),
        ],
    )
}

pub fn as_user(nats: &NatsServer, certs: &Path, user: &str, password: &str) -> NatsSettings {
    NatsSettings {
        user: user.into(),
        password: Secret::new(password),
        tls_ca: Some(certs.join("ca.pem")),
        tls_cert: Some(certs.join("client.pem")),
        tls_key: Some(certs.join("client-key.pem")),
        ..NatsSettings::url(nats.url())
    }
}

/// The environment a worker process reaches NATS with as `settings` says.
pub fn worker_env(settings: &NatsSettings) -> Vec<(String, String)> {
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    vec![
        ("NATS_USER".into(), settings.user.clone()),
        ("NATS_PASSWORD".into(), settings.password.expose().to_string()),
        ("NATS_TLS_CA".into(), path(&settings.tls_ca)),
        ("NATS_TLS_CERT".into(), path(&settings.tls_cert)),
        ("NATS_TLS_KEY".into(), path(&settings.tls_key)),
    ]
}
