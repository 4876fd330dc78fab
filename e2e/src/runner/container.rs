//! The container process: the locally built `taper` in place of the trainer image's
//! entrypoint, with the container's args and environment (mount paths rewritten to the
//! pod's folders), its output appended to `<work>/logs/<namespace>_<pod>_<container>.log`,
//! stopped through [`crate::process::stop`] (SIGTERM to its process group, the grace
//! period, SIGKILL) when the pod is deleted, and its termination message read back.

use std::{collections::BTreeMap, path::PathBuf, process::Stdio, time::Duration};

use k8s_openapi::api::core::v1::Container;
use tokio::sync::watch;

use super::{config::expand, now, paths::Mounts, pod::PodCtx, status::State};
use crate::process::{self, Target};

/// Run container `c` of the pod to its end: exited, failed to start, or stopped when
/// `terminate` carries the grace period (at once when the channel closes).
pub(super) async fn run_container(
    ctx: &PodCtx,
    c: &Container,
    env: &BTreeMap<String, String>,
    volumes: &BTreeMap<String, PathBuf>,
    terminate: &mut watch::Receiver<Option<i64>>,
) -> State {
    let started = now();
    let fail = |message: String| State::Terminated {
        code: 128,
        reason: "StartError".into(),
        message,
        started: started.clone(),
        finished: now(),
    };
    let cdir = ctx.dir.join("containers").join(&c.name);
    let root = cdir.join("root");
    if let Err(e) = std::fs::create_dir_all(&root) {
        return fail(format!("{}: {e}", root.display()));
    }
    let term_log = cdir.join("termination-log");
    let _ = std::fs::write(&term_log, b"");
    let term_path = c
        .termination_message_path
        .clone()
        .unwrap_or_else(|| "/dev/termination-log".into());
    let mut mounts = Mounts::default();
    mounts.0.push((term_path, term_log.clone()));
    for m in c.volume_mounts.iter().flatten() {
        let Some(host) = volumes.get(&m.name) else {
            return fail(format!("volume mount {:?}: no such volume", m.name));
        };
        let host = match m.sub_path.as_deref() {
            Some(sub) if !sub.is_empty() => host.join(sub),
            _ => host.clone(),
        };
        mounts.0.push((m.mount_path.clone(), host));
    }
    // The image's entrypoint is `taper` and its default argument `--help`.
    let (program, args): (String, Vec<String>) = match (&c.command, &c.args) {
        (Some(cmd), args) if !cmd.is_empty() => (
            cmd[0].clone(),
            cmd[1..]
                .iter()
                .chain(args.iter().flatten())
                .cloned()
                .collect(),
        ),
        (_, Some(args)) => ("taper".into(), args.clone()),
        (_, None) => ("taper".into(), vec!["--help".into()]),
    };
    if program != "taper" && !program.ends_with("/taper") {
        return fail(format!(
            "exec: {program:?}: the e2e pod runner runs only the trainer's `taper` entrypoint"
        ));
    }
    let args: Vec<String> = args
        .iter()
        .map(|a| mounts.rewrite(&expand(a, env)))
        .collect();
    let log_path = ctx
        .opts
        .work_dir
        .join("logs")
        .join(format!("{}_{}_{}.log", ctx.ns, ctx.name, c.name));
    let log = match std::fs::File::options()
        .create(true)
        .append(true)
        .open(&log_path)
    {
        Ok(f) => f,
        Err(e) => return fail(format!("{}: {e}", log_path.display())),
    };
    let Ok(log_err) = log.try_clone() else {
        return fail("log file".into());
    };
    let workdir = c
        .working_dir
        .as_deref()
        .map(|w| PathBuf::from(mounts.rewrite(w)))
        .unwrap_or(root.clone());
    let _ = std::fs::create_dir_all(&workdir);
    let mut cmd = tokio::process::Command::new(&ctx.opts.taper_bin);
    cmd.args(&args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", &root)
        .env("HOSTNAME", &ctx.name)
        .current_dir(&workdir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0)
        .kill_on_drop(true);
    if let Some((host, port)) = &ctx.opts.api_host_port {
        cmd.env("KUBERNETES_SERVICE_HOST", host)
            .env("KUBERNETES_SERVICE_PORT", port.to_string());
    }
    for (k, v) in env {
        cmd.env(k, mounts.rewrite(v));
    }
    process::die_with_parent(cmd.as_std_mut());
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return fail(format!("exec {}: {e}", ctx.opts.taper_bin.display())),
    };
    let status = loop {
        let requested = *terminate.borrow();
        if let Some(grace) = requested {
            let grace = Duration::from_secs(u64::try_from(grace).unwrap_or(0));
            break process::stop(&mut child, Target::Group, grace).await;
        }
        tokio::select! {
            s = child.wait() => break s,
            r = terminate.changed() => if r.is_err() { let _ = child.start_kill(); break child.wait().await; },
        }
    };
    let code = match status {
        Ok(s) => s.code().unwrap_or_else(|| {
            128 + std::os::unix::process::ExitStatusExt::signal(&s).unwrap_or(9)
        }),
        Err(_) => 128,
    };
    let mut message = std::fs::read_to_string(&term_log).unwrap_or_default();
    if message.is_empty()
        && code != 0
        && c.termination_message_policy.as_deref() == Some("FallbackToLogsOnError")
    {
        message = process::tail(&log_path, 80);
    }
    if message.len() > 4096 {
        message = message[message.len() - 4096..].to_string();
    }
    State::Terminated {
        code,
        reason: if code == 0 {
            "Completed".into()
        } else {
            "Error".into()
        },
        message,
        started,
        finished: now(),
    }
}
