//! Child processes of the suite (etcd, kube-apiserver, MinIO, Prometheus, pods): each logs
//! to a file, dies with the process that started it (`PR_SET_PDEATHSIG`, so a killed test
//! run leaves nothing behind), and is stopped on drop: SIGTERM, a grace period, SIGKILL.
//!
//! That stop sequence is written once, in [`stop_with`]: [`Proc::stop`] runs it for the
//! suite's servers (blocking, on a `std` child) and [`stop`] for the pod runner's containers
//! (async, on a tokio child, signalling the container's whole process group).

use std::{
    fs::File,
    future::Future,
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
        // Blocking (it runs in `drop`, maybe outside any runtime): every wait is a thread
        // sleep, so the future completes within one `block_on`.
        let nap = |d| {
            std::thread::sleep(d);
            std::future::ready(())
        };
        let _ = futures::executor::block_on(stop_with(
            &mut self.child,
            Target::Process,
            self.grace,
            nap,
        ));
    }
}

/// Where a stop's signals go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The process alone.
    Process,
    /// The process group the process leads (spawned with `process_group(0)`): a pod's
    /// container with everything it started.
    Group,
}

impl Target {
    fn signal(self, pid: u32, signal: Signal) {
        let Ok(raw) = i32::try_from(pid) else {
            return;
        };
        let pid = Pid::from_raw(raw);
        let _ = match self {
            Self::Process => nix::sys::signal::kill(pid, signal),
            Self::Group => nix::sys::signal::killpg(pid, signal),
        };
    }
}

/// A child process [`stop_with`] can stop: `std`'s or tokio's.
pub trait Stoppable {
    /// Its process id, while it has one.
    fn pid(&self) -> Option<u32>;
    /// Its exit status if it has exited, without blocking.
    fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>>;
}

impl Stoppable for Child {
    fn pid(&self) -> Option<u32> {
        Some(self.id())
    }
    fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        Child::try_wait(self)
    }
}

impl Stoppable for tokio::process::Child {
    fn pid(&self) -> Option<u32> {
        self.id()
    }
    fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        tokio::process::Child::try_wait(self)
    }
}

/// How often a stop looks whether the process has exited.
const POLL: Duration = Duration::from_millis(50);

/// The one stop sequence: unless the process has already exited, SIGTERM to `target`, up
/// to `grace` for the process to exit, then SIGKILL; returns its exit status once it has
/// exited. `nap` waits between looks (a thread sleep for blocking callers, a tokio sleep
/// for async ones).
pub async fn stop_with<C, F>(
    child: &mut C,
    target: Target,
    grace: Duration,
    nap: impl Fn(Duration) -> F,
) -> std::io::Result<ExitStatus>
where
    C: Stoppable,
    F: Future<Output = ()>,
{
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    let pid = child.pid();
    if let Some(pid) = pid {
        target.signal(pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        nap(left.min(POLL)).await;
    }
    if let Some(pid) = pid {
        target.signal(pid, Signal::SIGKILL);
    }
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        nap(POLL).await;
    }
}

/// [`stop_with`] for a tokio child (the pod runner's containers), waiting on tokio's timer.
pub async fn stop(
    child: &mut tokio::process::Child,
    target: Target,
    grace: Duration,
) -> std::io::Result<ExitStatus> {
    stop_with(child, target, grace, tokio::time::sleep).await
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    /// A folder of this test's own.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("taper-process-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch folder");
        dir
    }

    /// `sh -c` running `sleep 30` that ignores SIGTERM (an ignored signal stays ignored
    /// across `exec`) once `ready` exists, so only the SIGKILL after the grace ends it.
    fn stubborn(ready: &Path) -> Vec<String> {
        vec![
            "-c".into(),
            format!("trap '' TERM; touch '{}'; exec sleep 30", ready.display()),
        ]
    }

    fn wait_for(ready: &Path) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            assert!(
                Instant::now() < deadline,
                "{} never appeared",
                ready.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn proc_stop_sends_sigterm_first() {
        let dir = scratch("term");
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let mut p = Proc::spawn("sleep", cmd, &dir.join("sleep.log")).expect("spawn sleep");
        let started = Instant::now();
        p.stop();
        assert!(started.elapsed() < Duration::from_secs(5));
        let status = p.child.try_wait().expect("wait").expect("exited");
        assert_eq!(status.signal(), Some(15), "{status:?}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_blocking_stop_kills_what_ignores_sigterm() {
        let dir = scratch("blocking");
        let ready = dir.join("ready");
        let mut child = Command::new("sh")
            .args(stubborn(&ready))
            .spawn()
            .expect("spawn sh");
        wait_for(&ready);
        let nap = |d| {
            std::thread::sleep(d);
            std::future::ready(())
        };
        let started = Instant::now();
        let status = futures::executor::block_on(stop_with(
            &mut child,
            Target::Process,
            Duration::from_millis(300),
            nap,
        ))
        .expect("stopped");
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(status.signal(), Some(9), "{status:?}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn stop_kills_the_group_after_the_grace_period() {
        let dir = scratch("group");
        let ready = dir.join("ready");
        let mut child = tokio::process::Command::new("sh")
            .args(stubborn(&ready))
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn sh");
        wait_for(&ready);
        let started = Instant::now();
        let status = stop(&mut child, Target::Group, Duration::from_millis(300))
            .await
            .expect("stopped");
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(status.signal(), Some(9), "{status:?}");
        // An exited child is not signalled again; its status stays.
        let again = stop(&mut child, Target::Group, Duration::ZERO).await;
        assert_eq!(again.expect("status").signal(), Some(9));
        let _ = std::fs::remove_dir_all(dir);
    }
}
