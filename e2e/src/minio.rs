//! A real MinIO server for tests, built by `e2e/scripts/build-tools.sh minio`, on a free
//! loopback port with a temporary data folder; killed (and its folder removed) on drop.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Access key of the test server.
pub const ACCESS_KEY: &str = "taper-test";
/// Secret key of the test server.
pub const SECRET_KEY: &str = "taper-test-secret";

/// A running MinIO.
#[derive(Debug)]
pub struct Minio {
    child: Child,
    dir: PathBuf,
    port: u16,
}

/// The folder of the suite's built tools: `$TAPER_TOOLS_DIR` or `e2e/.bin`.
pub fn tools_dir() -> PathBuf {
    std::env::var_os("TAPER_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".bin"))
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn http_get_status(port: u16, path: &str) -> Option<u16> {
    let mut s =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
            .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    std::str::from_utf8(&buf[..n])
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

impl Minio {
    /// Start MinIO and wait until it is live. Fails with a message naming the build
    /// script when the binary has not been built.
    pub fn start() -> Result<Self, String> {
        let bin = tools_dir().join("minio");
        if !bin.exists() {
            return Err(format!(
                "{} is missing: run e2e/scripts/build-tools.sh minio",
                bin.display()
            ));
        }
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        let console = free_port().map_err(|e| format!("no free port: {e}"))?;
        let dir = std::env::temp_dir().join(format!("taper-minio-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let log = std::fs::File::create(dir.with_extension("log"))
            .map_err(|e| format!("minio log: {e}"))?;
        let child = Command::new(&bin)
            .args([
                "server",
                "--quiet",
                "--address",
                &format!("127.0.0.1:{port}"),
            ])
            .args(["--console-address", &format!("127.0.0.1:{console}")])
            .arg(dir.join("data"))
            .env("MINIO_ROOT_USER", ACCESS_KEY)
            .env("MINIO_ROOT_PASSWORD", SECRET_KEY)
            .env("MINIO_BROWSER", "off")
            .env("MINIO_UPDATE", "off")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut server = Self { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!(
                    "minio exited with {status}; see {}",
                    server.dir.with_extension("log").display()
                ));
            }
            if http_get_status(port, "/minio/health/live") == Some(200) {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err("minio did not become live within 60 s".into())
    }

    /// The S3 endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Set the AWS environment variables of this process so that the default credential
    /// chain and endpoint resolution find this server.
    pub fn export_env(&self) {
        // SAFETY: called by tests before they start threads that read the environment.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS_KEY);
            std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
            std::env::set_var("AWS_REGION", "us-east-1");
            std::env::set_var("AWS_ENDPOINT_URL", self.endpoint());
            std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        }
    }
}

impl Drop for Minio {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(self.dir.with_extension("log"));
    }
}
