//! A real MinIO server for tests, built by `e2e/scripts/build-tools.sh minio`, on a free
//! loopback port with a temporary data folder; stopped (and its folder removed) on drop.

use std::{net::TcpListener, path::PathBuf, process::Command};

use crate::process::Proc;

/// Access key of the test server.
pub const ACCESS_KEY: &str = "taper-test";
/// Secret key of the test server.
pub const SECRET_KEY: &str = "taper-test-secret";

/// A running MinIO.
#[derive(Debug)]
pub struct Minio {
    proc: Proc,
    dir: PathBuf,
    port: u16,
}

/// The folder of the suite's built tools: `$TAPER_TOOLS_DIR` or `e2e/.bin`.
pub fn tools_dir() -> PathBuf {
    std::env::var_os("TAPER_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".bin"))
}

/// The built tool (or folder) `name` in [`tools_dir`]; panics, naming the script that
/// builds it, when it is missing.
pub fn tool(name: &str) -> PathBuf {
    let path = tools_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run e2e/scripts/build-tools.sh (make test does)",
        path.display()
    );
    path
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
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
        let mut cmd = Command::new(&bin);
        cmd.args(["server", "--quiet", "--address"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--console-address")
            .arg(format!("127.0.0.1:{console}"))
            .arg(dir.join("data"))
            .env("MINIO_ROOT_USER", ACCESS_KEY)
            .env("MINIO_ROOT_PASSWORD", SECRET_KEY)
            .env("MINIO_BROWSER", "off")
            .env("MINIO_UPDATE", "off");
        let proc = Proc::spawn("minio", cmd, &dir.join("minio.log")).map_err(|e| e.to_string())?;
        let mut server = Self { proc, dir, port };
        server
            .proc
            .wait_http_ok(port, "/minio/health/live", 60)
            .map_err(|e| e.to_string())?;
        Ok(server)
    }

    /// The S3 endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The process id (tests check that nothing outlives the suite).
    pub fn pid(&self) -> u32 {
        self.proc.pid()
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
        self.proc.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
