//! A real Kubernetes control plane for the suite: etcd, kube-apiserver and
//! kube-controller-manager built from the Go module proxy by `e2e/scripts/build-tools.sh`,
//! on free loopback ports, with fresh certificates and token authentication.
//!
//! The API server runs with `--authorization-mode=Node,RBAC`, the NodeRestriction and
//! PodSecurity admission plugins and ES256 service-account tokens; the controller manager
//! runs the default controllers (garbage collection of owned objects, namespace deletion,
//! service-account tokens, jobs, …) with per-controller service-account credentials, as
//! kubeadm sets it up. Everything lives in one temporary folder and stops on drop.

use std::{
    collections::BTreeMap,
    io::Read,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::ServiceAccount;
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

use crate::{
    minio::{free_port, tools_dir},
    pki::Pki,
    process::{Proc, ProcessError},
};

/// Name of the user with `system:masters` rights.
pub const ADMIN: &str = "admin";
/// The node the pod runner registers.
pub const NODE_NAME: &str = "taper-node-0";

/// Errors of starting or using the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("certificates: {0}")]
    Pki(#[from] rcgen::Error),
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("no such user in this cluster: {0}")]
    UnknownUser(String),
    #[error("{0}")]
    NotReady(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// What to create besides the admin user.
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// Service accounts (`namespace`, `name`) that get a static token, so tests can act as
    /// them (e.g. the operator's account, to prove the chart's RBAC).
    pub service_accounts: Vec<(String, String)>,
    /// Keep the folder (certificates, logs, etcd data) after stopping.
    pub keep_dir: bool,
    /// Folder to use instead of a fresh one under the temporary directory.
    pub dir: Option<PathBuf>,
}

/// A running control plane. Dropping it stops the controller manager, the API server and
/// etcd, in that order, and removes its folder.
#[derive(Debug)]
pub struct ControlPlane {
    procs: Vec<Proc>,
    dir: PathBuf,
    keep_dir: bool,
    server: String,
    tokens: BTreeMap<String, String>,
}

fn random_token() -> Result<String, ClusterError> {
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io("/dev/urandom"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The user name of a service account.
pub fn service_account_user(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

/// The user name of a node.
pub fn node_user(node: &str) -> String {
    format!("system:node:{node}")
}

impl ControlPlane {
    /// Start etcd, the API server and the controller manager, and wait until the API
    /// server is ready and the controller manager has created the `default` service
    /// account.
    pub async fn start(opts: ClusterOptions) -> Result<Self, ClusterError> {
        let bin = tools_dir();
        for tool in ["etcd", "kube-apiserver", "kube-controller-manager"] {
            if !bin.join(tool).exists() {
                return Err(ProcessError::Missing(bin.join(tool)).into());
            }
        }
        let etcd_port = free_port().map_err(io("free port"))?;
        let peer_port = free_port().map_err(io("free port"))?;
        let api_port = free_port().map_err(io("free port"))?;
        let dir = match &opts.dir {
            Some(d) => d.clone(),
            None => std::env::temp_dir()
                .join(format!("taper-cluster-{}-{api_port}", std::process::id())),
        };
        std::fs::create_dir_all(dir.join("logs")).map_err(io(dir.display().to_string()))?;
        let write = |name: &str, text: &str| -> Result<PathBuf, ClusterError> {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(io(path.display().to_string()))?;
            Ok(path)
        };

        let pki = Pki::generate()?;
        let ca = write("ca.crt", &pki.ca_cert)?;
        let cert = write("apiserver.crt", &pki.serving_cert)?;
        let key = write("apiserver.key", &pki.serving_key)?;
        let sa_key = write("service-account.key", &pki.service_account_key)?;
        let sa_pub = write("service-account.pub", &pki.service_account_public_key)?;

        // Static tokens: user -> (token, uid, groups).
        let mut users: Vec<(String, &str)> = vec![
            (ADMIN.to_string(), "system:masters"),
            ("system:kube-controller-manager".to_string(), ""),
            ("system:kube-scheduler".to_string(), ""),
            (node_user(NODE_NAME), "system:nodes"),
        ];
        let sa_groups: Vec<String> = opts
            .service_accounts
            .iter()
            .map(|(ns, _)| format!("system:serviceaccounts,system:serviceaccounts:{ns}"))
            .collect();
        for ((ns, name), groups) in opts.service_accounts.iter().zip(&sa_groups) {
            users.push((service_account_user(ns, name), groups.as_str()));
        }
        let mut tokens = BTreeMap::new();
        let mut csv = String::new();
        for (i, (user, groups)) in users.iter().enumerate() {
            let token = random_token()?;
            csv.push_str(&format!("{token},{user},uid-{i},\"{groups}\"\n"));
            tokens.insert(user.clone(), token);
        }
        let token_file = write("tokens.csv", &csv)?;
        let server = format!("https://127.0.0.1:{api_port}");
        let mut plane = Self {
            procs: Vec::new(),
            dir: dir.clone(),
            keep_dir: opts.keep_dir,
            server,
            tokens,
        };
        for user in plane.tokens.keys().cloned().collect::<Vec<_>>() {
            plane.write_kubeconfig(&user, &plane.kubeconfig_path_for(&user))?;
        }

        let logs = dir.join("logs");
        let mut etcd = Command::new(bin.join("etcd"));
        etcd.arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg("--name=taper-e2e")
            .arg(format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"))
            .arg(format!(
                "--advertise-client-urls=http://127.0.0.1:{etcd_port}"
            ))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"
            ))
            .arg(format!(
                "--initial-cluster=taper-e2e=http://127.0.0.1:{peer_port}"
            ))
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        plane
            .procs
            .push(Proc::spawn("etcd", etcd, &logs.join("etcd.log"))?);
        plane
            .wait("etcd", 30, |_| async move {
                crate::http::get(etcd_port, "/health")
                    .is_some_and(|(s, body)| s == 200 && body.contains("true"))
            })
            .await?;

        let mut api = Command::new(bin.join("kube-apiserver"));
        api.arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={api_port}"))
            .arg(format!(
                "--cert-dir={}",
                dir.join("apiserver-certs").display()
            ))
            .arg(format!("--tls-cert-file={}", cert.display()))
            .arg(format!("--tls-private-key-file={}", key.display()))
            .arg(format!("--client-ca-file={}", ca.display()))
            .arg(format!("--token-auth-file={}", token_file.display()))
            .arg("--authorization-mode=Node,RBAC")
            .arg("--enable-admission-plugins=NodeRestriction")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!("--service-account-key-file={}", sa_pub.display()))
            .arg(format!(
                "--service-account-signing-key-file={}",
                sa_key.display()
            ))
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg("--allow-privileged=false")
            .arg("--profiling=false")
            .arg("--v=1");
        plane.procs.push(Proc::spawn(
            "kube-apiserver",
            api,
            &logs.join("kube-apiserver.log"),
        )?);
        let admin = plane.client(ADMIN).await?;
        plane
            .wait("kube-apiserver", 90, |_| {
                let admin = admin.clone();
                async move {
                    let req = http_get("/readyz");
                    matches!(admin.request_text(req).await, Ok(body) if body.trim() == "ok")
                }
            })
            .await?;

        let mut kcm = Command::new(bin.join("kube-controller-manager"));
        kcm.arg(format!(
            "--kubeconfig={}",
            plane
                .kubeconfig_path_for("system:kube-controller-manager")
                .display()
        ))
        .arg("--leader-elect=false")
        .arg("--use-service-account-credentials=true")
        .arg(format!(
            "--service-account-private-key-file={}",
            sa_key.display()
        ))
        .arg(format!("--root-ca-file={}", ca.display()))
        .arg("--secure-port=0")
        .arg("--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-node-route-controller")
        .arg("--v=1");
        // Benchmarks may tune it as a production cluster would (e.g. `--kube-api-qps=200`:
        // the default of 20 requests/s bounds how fast its Job controller creates pods).
        if let Ok(extra) = std::env::var("TAPER_E2E_KCM_ARGS") {
            kcm.args(extra.split_whitespace());
        }
        plane.procs.push(Proc::spawn(
            "kube-controller-manager",
            kcm,
            &logs.join("kube-controller-manager.log"),
        )?);
        let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), "default");
        plane
            .wait("kube-controller-manager", 90, |_| {
                let accounts = accounts.clone();
                async move { matches!(accounts.get_opt("default").await, Ok(Some(_))) }
            })
            .await?;
        Ok(plane)
    }

    async fn wait<F, Fut>(
        &mut self,
        name: &str,
        secs: u64,
        mut ready: F,
    ) -> Result<(), ClusterError>
    where
        F: FnMut(()) -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            for p in &mut self.procs {
                p.check_alive()?;
            }
            if ready(()).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                let p = self.procs.last().map(|p| p.timeout(secs));
                return Err(p.map(ClusterError::from).unwrap_or_else(|| {
                    ClusterError::NotReady(format!("{name} was not ready within {secs} s"))
                }));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The API server's URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The cluster's folder (certificates, kubeconfigs, `logs/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The admin kubeconfig, for kubectl and helm.
    pub fn kubeconfig(&self) -> PathBuf {
        self.kubeconfig_path_for(ADMIN)
    }

    /// The kubeconfig of `user` (one of the static-token users).
    pub fn kubeconfig_path_for(&self, user: &str) -> PathBuf {
        let safe: String = user
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.join(format!("kubeconfig-{safe}"))
    }

    /// Process ids of the control plane's processes.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Proc::pid).collect()
    }

    fn write_kubeconfig(&self, user: &str, path: &Path) -> Result<(), ClusterError> {
        let token = self
            .tokens
            .get(user)
            .ok_or_else(|| ClusterError::UnknownUser(user.to_string()))?;
        let doc = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "taper-e2e", "cluster": {
                "server": self.server,
                "certificate-authority": self.dir.join("ca.crt"),
            }}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "taper-e2e", "context": {"cluster": "taper-e2e", "user": user}}],
            "current-context": "taper-e2e",
        });
        let text = serde_yaml::to_string(&doc).map_err(|e| ClusterError::Kubeconfig {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        std::fs::write(path, text).map_err(io(path.display().to_string()))
    }

    /// A client authenticated as `user` (admin, a node, a service account given in the
    /// options, `system:kube-scheduler`, `system:kube-controller-manager`).
    pub async fn client(&self, user: &str) -> Result<Client, ClusterError> {
        install_crypto_provider();
        let path = self.kubeconfig_path_for(user);
        if !self.tokens.contains_key(user) {
            return Err(ClusterError::UnknownUser(user.to_string()));
        }
        let kc = Kubeconfig::read_from(&path).map_err(|e| ClusterError::Kubeconfig {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| ClusterError::Kubeconfig {
                path: path.clone(),
                message: e.to_string(),
            })?;
        Client::try_from(config).map_err(|e| ClusterError::Kubeconfig {
            path,
            message: e.to_string(),
        })
    }

    /// Stop everything now (also done on drop).
    pub fn stop(&mut self) {
        while let Some(mut p) = self.procs.pop() {
            p.stop();
        }
    }
}

/// Choose rustls' ring provider for the process: with aws-sdk-s3 in the same build, both
/// ring and aws-lc-rs are compiled in and rustls refuses to guess.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn http_get(path: &'static str) -> http::Request<Vec<u8>> {
    let mut req = http::Request::new(Vec::new());
    *req.uri_mut() = http::Uri::from_static(path);
    req
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
