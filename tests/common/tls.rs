//! TLS servers of the test's own: a CA and a server certificate made here (rcgen), a private
//! PostgreSQL started with `ssl=on` that accepts only TLS connections (`hostssl` in `pg_hba.conf`), and
//! a private `redis-server` that listens only on its `--tls-port` (alone or as a one-node cluster).
//! Every process is stopped when its value is dropped (also when the test panics).
//!
//! PostgreSQL refuses to run as root: when the test runs as root, `initdb` and `pg_ctl` run as the
//! `postgres` OS user (`runuser`), in a temporary folder handed to that user.
//!
//! Under `CI=true` a missing PostgreSQL server binary or `redis-server` fails the test; elsewhere the
//! test is skipped with a note.
#![allow(dead_code)]

use super::unavailable;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A CA, and a server certificate it signed for `localhost` and `127.0.0.1`, written as PEM files.
pub struct Certs {
    /// The CA certificate: what a client trusts.
    pub ca: PathBuf,
    /// The server's certificate.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
    dir: tempfile::TempDir,
}

impl Certs {
    /// A fresh CA (`name` is its common name) and a server certificate signed by it.
    pub fn new(name: &str) -> Certs {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, name);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).unwrap();

        let key = KeyPair::generate().unwrap();
        let mut server = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        server
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        server
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = server.signed_by(&key, &ca_cert, &ca_key).unwrap();

        let write = |name: &str, text: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        Certs {
            ca: write("ca.pem", ca_cert.pem()),
            cert: write("server.pem", cert.pem()),
            key: write("server.key", key.serialize_pem()),
            dir,
        }
    }

    /// The CA file's path as text, for a URL or a setting.
    pub fn ca_path(&self) -> String {
        self.ca.display().to_string()
    }
}

/// Whether this process runs as root (then PostgreSQL runs as the `postgres` user).
fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// The PostgreSQL server binaries: the newest `/usr/lib/postgresql/*/bin` with `initdb`, or the
/// `PATH`'s.
fn postgres_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").is_file())
        .collect();
    found.sort_by_key(|bin| {
        bin.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(bin) = found.pop() {
        return Some(bin);
    }
    let on_path = Command::new("initdb")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    on_path.then(PathBuf::new)
}

/// A PostgreSQL of the test's own on a free port, with `ssl=on` and only `hostssl` connections
/// allowed (trust authentication, user `postgres`, database `postgres`).
pub struct TlsPostgres {
    /// Its port on 127.0.0.1.
    pub port: u16,
    bin: PathBuf,
    data: PathBuf,
    dir: tempfile::TempDir,
    running: bool,
}

impl TlsPostgres {
    /// Starts one serving `certs`' server certificate, or `None` (skip) without PostgreSQL outside CI.
    pub fn start(certs: &Certs) -> Option<TlsPostgres> {
        let Some(bin) = postgres_bin() else {
            return unavailable("TLS", "no PostgreSQL server binaries (initdb) found");
        };
        let dir = tempfile::tempdir().expect("temp dir");
        // PostgreSQL wants its key readable by its own user only.
        let cert = dir.path().join("server.pem");
        let key = dir.path().join("server.key");
        std::fs::copy(&certs.cert, &cert).unwrap();
        std::fs::copy(&certs.key, &key).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        if is_root() {
            let chown = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(dir.path())
                .status()
                .expect("run chown");
            assert!(
                chown.success(),
                "chown -R postgres: {}",
                dir.path().display()
            );
        }
        let mut pg = TlsPostgres {
            port: super::free_port(),
            bin,
            data: dir.path().join("data"),
            dir,
            running: false,
        };
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(&pg.data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Only TLS over TCP; the socket file is for pg_ctl's own checks.
        std::fs::write(
            pg.data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        let options = format!(
            "-c ssl=on -c ssl_cert_file={} -c ssl_key_file={} -c port={} \
             -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off",
            cert.display(),
            key.display(),
            pg.port,
            pg.dir.path().display()
        );
        let out = pg
            .command("pg_ctl")
            .arg("-D")
            .arg(&pg.data)
            .arg("-l")
            .arg(pg.dir.path().join("postgres.log"))
            .args(["-w", "-t", "30", "-o", &options, "start"])
            .stdout(Stdio::null())
            .output()
            .expect("run pg_ctl start");
        let log = std::fs::read_to_string(pg.dir.path().join("postgres.log")).unwrap_or_default();
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{log}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.running = true;
        Some(pg)
    }

    /// A PostgreSQL program, run as the `postgres` user when the test is root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    /// A `DATABASE_URL` for `host` (which must reach 127.0.0.1) with `query` appended.
    pub fn url(&self, host: &str, query: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres?{query}", self.port)
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        if self.running {
            let _ = self
                .command("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A `redis-server` of the test's own that listens only on a TLS port (`--port 0`), and does not ask
/// clients for certificates.
pub struct TlsRedis {
    /// Its TLS port on 127.0.0.1.
    pub port: u16,
    /// The CA that signed its certificate.
    ca: PathBuf,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl TlsRedis {
    /// A single Redis, or `None` (skip) without `redis-server` outside CI.
    pub fn start(certs: &Certs) -> Option<TlsRedis> {
        TlsRedis::spawn(certs, false)
    }

    /// A one-node Redis Cluster (every slot on this node, the cluster bus over TLS too).
    pub fn start_cluster(certs: &Certs) -> Option<TlsRedis> {
        let redis = TlsRedis::spawn(certs, true)?;
        let _: () = redis.query(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]);
        super::wait_until(
            "the one-node cluster is ok",
            Duration::from_secs(10),
            || {
                redis
                    .query::<String>(&["CLUSTER", "INFO"])
                    .contains("cluster_state:ok")
            },
        );
        Some(redis)
    }

    fn spawn(certs: &Certs, cluster: bool) -> Option<TlsRedis> {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = super::free_port();
        let mut command = Command::new("redis-server");
        command
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--tls-cert-file")
            .arg(&certs.cert)
            .arg("--tls-key-file")
            .arg(&certs.key)
            .arg("--tls-ca-cert-file")
            .arg(&certs.ca)
            .args([
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path());
        if cluster {
            command
                .args(["--cluster-enabled", "yes", "--tls-cluster", "yes"])
                .args(["--cluster-port", &super::free_port().to_string()])
                .args(["--cluster-announce-ip", "127.0.0.1"])
                .arg("--cluster-config-file")
                .arg(dir.path().join("nodes.conf"));
        }
        let child = match command.stdout(Stdio::null()).stderr(Stdio::null()).spawn() {
            Ok(child) => child,
            Err(e) => return unavailable("TLS", &format!("cannot run redis-server ({e})")),
        };
        let redis = TlsRedis {
            port,
            ca: certs.ca.clone(),
            child: Some(child),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if redis.connection().is_ok() {
                return Some(redis);
            }
            assert!(
                Instant::now() < deadline,
                "redis-server with TLS on {port} did not answer"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    /// A connection of the test's own, trusting the CA.
    fn connection(&self) -> redis::RedisResult<redis::Connection> {
        notification_service::tls::install_default_provider();
        let certs = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(&self.ca).unwrap()),
        };
        let mut conn = redis::Client::build_with_tls(self.url(), certs)?
            .get_connection_with_timeout(Duration::from_millis(500))?;
        redis::cmd("PING").query::<String>(&mut conn)?;
        Ok(conn)
    }

    /// Runs one command.
    pub fn query<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut conn = self.connection().expect("connect to the TLS redis");
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut conn)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// Waits until `count` connections subscribe to the channel `name` (sharded Pub/Sub for a
    /// cluster).
    pub fn wait_subscribers(&self, name: &str, count: i64, sharded: bool) {
        let command = if sharded { "SHARDNUMSUB" } else { "NUMSUB" };
        super::wait_until(
            &format!("{name} to have {count} subscribers"),
            Duration::from_secs(10),
            || {
                let counts: Vec<(String, i64)> = self.query(&["PUBSUB", command, name]);
                counts.first().map(|(_, n)| *n) == Some(count)
            },
        );
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A path as text.
pub fn text(path: &Path) -> String {
    path.display().to_string()
}
