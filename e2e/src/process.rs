//! Child processes of the suite (etcd, kube-apiserver, MinIO, Prometheus, pods): each logs
//! to a file, dies with the process that started it (`PR_SET_PDEATHSIG`, so a killed test
//! run leaves nothing behind), and is stopped on drop: SIGTERM, a grace period, SIGKILL.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};

/// Errors of starting or waiting for a component.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program has not been built.
    #[error("{0} is missing: run e2e/scripts/build-tools.sh")]
    Missing(PathBuf),
    /// Spawning failed.
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    /// A log file or folder could not be made.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The program exited while it should be serving.
    #[error("{name} exited with {status}; the end of {log}:\n{tail}")]
    Exited {
        name: String,
        status: ExitStatus,
        log: PathBuf,
        tail: String,
    },
    /// It did not become ready in time.
    #[error("{name} was not ready within {secs} s; the end of {log}:\n{tail}")]
    Timeout {
        name: String,
        secs: u64,
        log: PathBuf,
        tail: String,
    },
}

/// A running child process with its log file.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    grace: Duration,
}

/// Make `cmd` receive SIGKILL when the thread that spawned it exits (Linux), so that no
/// component outlives a test process killed without running its destructors.
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
    // async-signal-safe; it touches no memory of the parent.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}

/// The last `n` lines of a log file (for error messages).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Proc {
    /// Start `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self, ProcessError> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        if program.contains('/') && !Path::new(&program).exists() {
            return Err(ProcessError::Missing(PathBuf::from(program)));
        }
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).map_err(|source| ProcessError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| ProcessError::Io {
                path: log.to_path_buf(),
                source,
            })?;
        let err = file.try_clone().map_err(|source| ProcessError::Io {
            path: log.to_path_buf(),
            source,
        })?;
        die_with_parent(&mut cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|source| ProcessError::Spawn { program, source })?;
        Ok(Self {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            grace: Duration::from_secs(10),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// An error if the process has exited.
    pub fn check_alive(&mut self) -> Result<(), ProcessError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(ProcessError::Exited {
                name: self.name.clone(),
                status,
                log: self.log.clone(),
                tail: tail(&self.log, 20),
            }),
            _ => Ok(()),
        }
    }

    /// A timeout error carrying the end of the log.
    pub fn timeout(&self, secs: u64) -> ProcessError {
        ProcessError::Timeout {
            name: self.name.clone(),
            secs,
            log: self.log.clone(),
            tail: tail(&self.log, 20),
        }
    }

    /// Poll `GET http://127.0.0.1:{port}{path}` until it answers 200, failing early when the
    /// process exits and with the end of its log after `secs` seconds.
    pub fn wait_http_ok(&mut self, port: u16, path: &str, secs: u64) -> Result<(), ProcessError> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            self.check_alive()?;
            if crate::http::get(port, path).map(|r| r.0) == Some(200) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(self.timeout(secs))
    }

    /// SIGTERM, up to the grace period for it to exit, then SIGKILL; waits for the exit.
    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}
