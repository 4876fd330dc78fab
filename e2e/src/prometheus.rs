//! A real Prometheus for tests (Debian's package, unpacked by `e2e/scripts/build-tools.sh
//! prometheus`), with a configuration the suite writes, on a free loopback port.

use std::{path::PathBuf, process::Command};

use crate::{
    minio::{free_port, tools_dir},
    process::Proc,
};

/// A running Prometheus.
#[derive(Debug)]
pub struct Prometheus {
    proc: Proc,
    dir: PathBuf,
    port: u16,
}

impl Prometheus {
    /// Start Prometheus scraping `targets` (`host:port`, path `/metrics`) every second under
    /// the job name `job`; the configuration is checked with `promtool` first.
    pub fn start(job: &str, targets: &[String]) -> Result<Self, String> {
        Self::start_with(
            serde_json::json!([{"job_name": job, "scrape_interval": "1s",
                                             "static_configs": [{"targets": targets}]}]),
        )
    }

    /// Start Prometheus with these `scrape_configs` (a JSON array, e.g. the chart's rendered
    /// scrape configuration), scraping and evaluating every second by default.
    pub fn start_with(scrape_configs: serde_json::Value) -> Result<Self, String> {
        let bin = tools_dir().join("prometheus");
        let promtool = tools_dir().join("promtool");
        for b in [&bin, &promtool] {
            if !b.exists() {
                return Err(format!(
                    "{} is missing: run e2e/scripts/build-tools.sh prometheus",
                    b.display()
                ));
            }
        }
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        let dir =
            std::env::temp_dir().join(format!("taper-prometheus-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let config = serde_json::json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": scrape_configs,
        });
        let path = dir.join("prometheus.yml");
        let text = serde_yaml::to_string(&config).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        let check = Command::new(&promtool)
            .args(["check", "config"])
            .arg(&path)
            .output()
            .map_err(|e| format!("promtool: {e}"))?;
        if !check.status.success() {
            return Err(format!(
                "promtool check config: {}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            ));
        }
        let mut cmd = Command::new(&bin);
        cmd.arg(format!("--config.file={}", path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn");
        let proc = Proc::spawn("prometheus", cmd, &dir.join("prometheus.log"))
            .map_err(|e| e.to_string())?;
        let mut server = Self { proc, dir, port };
        server
            .proc
            .wait_http_ok(port, "/-/ready", 60)
            .map_err(|e| e.to_string())?;
        Ok(server)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Base URL of the web API.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Run an instant query (`/api/v1/query`) and return the JSON answer.
    pub fn query(&self, promql: &str) -> Result<serde_json::Value, String> {
        self.api(promql, &format!("/api/v1/query?query={}", encode(promql)))
    }

    /// Run a range query (`/api/v1/query_range`) from `start` to `end` (Unix seconds) every
    /// `step` seconds, as Grafana does for a panel, and return the JSON answer.
    pub fn query_range(
        &self,
        promql: &str,
        start: f64,
        end: f64,
        step: f64,
    ) -> Result<serde_json::Value, String> {
        self.api(
            promql,
            &format!(
                "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={step}",
                encode(promql)
            ),
        )
    }

    fn api(&self, promql: &str, path: &str) -> Result<serde_json::Value, String> {
        // A query can outlast one read timeout (5 s) on a loaded 2-core machine: ask again
        // a few times before calling Prometheus silent.
        let mut answer = None;
        for attempt in 0..4 {
            answer = crate::http::get(self.port, path);
            if answer.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(500 * (attempt + 1)));
        }
        let (status, body) = answer.ok_or("prometheus did not answer (4 tries)")?;
        if status != 200 {
            return Err(format!("query {promql:?}: HTTP {status}: {body}"));
        }
        serde_json::from_str(&body).map_err(|e| format!("query {promql:?}: {e}: {body}"))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.proc.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encode a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
