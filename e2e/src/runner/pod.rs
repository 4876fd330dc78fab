//! The pod state machine: one task per pod bound to the node. It resolves the pod's
//! configuration (retrying while a Secret or ConfigMap is missing), runs the init
//! containers one after the other, then the app containers together, restarting them per
//! the pod's `restartPolicy`, reports each step as the pod's status, and on deletion stops
//! them and removes the pod for good, as the kubelet does. An eviction (see
//! [`super::disrupt`]) marks the pod `DisruptionTarget`, stops its containers, and leaves
//! it `Failed` with reason `Evicted`.

use std::{path::PathBuf, sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, PodStatus};
use kube::{
    Api, Client,
    api::{DeleteParams, Preconditions},
};
use tokio::sync::watch;

use super::{
    RunnerOptions,
    config::ConfigError,
    container::run_container,
    disrupt::{self, EVICTED, Eviction, TERMINATION_BY_KUBELET},
    now,
    status::{State, conditions, container_status, patch_status, pod_status, with_pod_ip},
};

/// A pod being run: the API client (as the node), the pod as it was bound, and its folder
/// (`<work>/pods/<uid>`, with its volumes and containers).
#[derive(Clone)]
pub(super) struct PodCtx {
    pub(super) client: Client,
    pub(super) pod: Pod,
    pub(super) ns: String,
    pub(super) name: String,
    pub(super) dir: PathBuf,
    pub(super) opts: Arc<RunnerOptions>,
}

/// Run `pod` unless it has finished already, stopping it when `evict` says it is evicted;
/// once `terminate` says it is deleted (with its grace period), stop it, delete it for good
/// and remove its folder.
pub(super) async fn run_pod(
    client: Client,
    opts: Arc<RunnerOptions>,
    pod: Pod,
    mut terminate: watch::Receiver<Option<i64>>,
    evict: watch::Receiver<Option<Eviction>>,
) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let dir = opts.work_dir.join("pods").join(&uid);
    let ctx = PodCtx {
        client: client.clone(),
        pod: pod.clone(),
        ns: ns.clone(),
        name: name.clone(),
        dir: dir.clone(),
        opts: opts.clone(),
    };
    let spec = pod.spec.clone().unwrap_or_default();
    let finished_already = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    if !finished_already && terminate.borrow().is_none() {
        let (stop, mut stopped) = watch::channel(None);
        let forward = tokio::spawn(forward_stops(
            ctx.clone(),
            terminate.clone(),
            evict.clone(),
            stop,
        ));
        execute(&ctx, &spec, &mut stopped, &evict).await;
        forward.abort();
    }
    // Wait for deletion, then remove the pod for good (the kubelet's final delete).
    while terminate.borrow().is_none() {
        if terminate.changed().await.is_err() {
            return;
        }
    }
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let mut dp = DeleteParams::default().grace_period(0);
    dp.preconditions = Some(Preconditions {
        uid: Some(uid),
        resource_version: None,
    });
    let _ = pods.delete(&name, &dp).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Stop the pod's containers, through `stop` (with the grace period), when the pod is
/// deleted (`terminate`) or evicted (`evict`: its `DisruptionTarget` condition is added
/// first, as the kubelet does before it kills); `stop` closes, which kills them at once,
/// when the node's channels do.
async fn forward_stops(
    ctx: PodCtx,
    mut terminate: watch::Receiver<Option<i64>>,
    mut evict: watch::Receiver<Option<Eviction>>,
    stop: watch::Sender<Option<i64>>,
) {
    let first = |grace: i64| {
        stop.send_if_modified(|s| {
            let first = s.is_none();
            if first {
                *s = Some(grace);
            }
            first
        });
    };
    loop {
        tokio::select! {
            r = terminate.changed() => {
                if r.is_err() {
                    return;
                }
                let grace = *terminate.borrow();
                if let Some(grace) = grace {
                    first(grace);
                }
            }
            r = evict.changed() => {
                if r.is_err() {
                    return;
                }
                let eviction = evict.borrow().clone();
                if let Some(e) = eviction {
                    let c = disrupt::condition(TERMINATION_BY_KUBELET, &e.message);
                    patch_status(&ctx, disrupt::with_condition(c)).await;
                    first(e.grace);
                }
            }
        }
    }
}

/// Run the pod's containers to completion (or until `terminate`), reporting its status; an
/// eviction (`evict`) ends it `Failed`, with reason `Evicted` and its `DisruptionTarget`.
async fn execute(
    ctx: &PodCtx,
    spec: &PodSpec,
    terminate: &mut watch::Receiver<Option<i64>>,
    evict: &watch::Receiver<Option<Eviction>>,
) {
    let containers: Vec<&Container> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .collect();
    let unknown: Vec<String> = containers
        .iter()
        .filter_map(|c| c.image.clone())
        .filter(|i| !ctx.opts.is_trainer_image(i))
        .collect();
    if let Some(image) = unknown.first() {
        let msg = format!(
            "the e2e pod runner runs only the trainer image ({}); it never pulls or runs {image}",
            ctx.opts.trainer_images.join(", ")
        );
        let statuses = spec
            .containers
            .iter()
            .map(|c| {
                let known = c
                    .image
                    .as_deref()
                    .is_some_and(|i| ctx.opts.is_trainer_image(i));
                let (r, m) = if known {
                    ("PodInitializing", String::new())
                } else {
                    ("ErrImageNeverPull", msg.clone())
                };
                container_status(c, &State::Waiting(r.into(), m), 0)
            })
            .collect();
        patch_status(
            ctx,
            pod_status("Pending", now(), conditions(false, true), statuses),
        )
        .await;
        return;
    }
    let start_time = now();
    // Volumes and environments; a missing Secret or ConfigMap is retried, as the kubelet does.
    let (volumes, envs) = loop {
        let result = async {
            let volumes = ctx
                .materialise(spec.volumes.as_deref().unwrap_or_default())
                .await?;
            let mut envs = Vec::new();
            for c in &containers {
                envs.push(ctx.environment(c).await?);
            }
            Ok::<_, ConfigError>((volumes, envs))
        }
        .await;
        match result {
            Ok(v) => break v,
            Err(ConfigError(msg)) => {
                let statuses = spec
                    .containers
                    .iter()
                    .map(|c| {
                        container_status(
                            c,
                            &State::Waiting("CreateContainerConfigError".into(), msg.clone()),
                            0,
                        )
                    })
                    .collect();
                patch_status(
                    ctx,
                    pod_status(
                        "Pending",
                        start_time.clone(),
                        conditions(false, false),
                        statuses,
                    ),
                )
                .await;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = terminate.changed() => return,
                }
            }
        }
    };
    let n_init = spec.init_containers.as_ref().map_or(0, Vec::len);
    let restart = spec
        .restart_policy
        .clone()
        .unwrap_or_else(|| "Always".into());
    let mut states: Vec<State> = spec
        .containers
        .iter()
        .map(|_| State::Waiting("PodInitializing".into(), String::new()))
        .collect();
    let mut restarts = vec![0i32; spec.containers.len()];
    let status = |states: &[State], restarts: &[i32], phase: &str, ready: bool, init: bool| {
        let containers = spec
            .containers
            .iter()
            .zip(states)
            .zip(restarts)
            .map(|((c, st), r)| container_status(c, st, *r))
            .collect();
        with_pod_ip(pod_status(
            phase,
            start_time.clone(),
            conditions(ready, init),
            containers,
        ))
    };
    // Init containers, one after the other.
    for (i, c) in containers[..n_init].iter().enumerate() {
        patch_status(ctx, status(&states, &restarts, "Pending", false, false)).await;
        match run_container(ctx, c, &envs[i], &volumes, terminate).await {
            State::Terminated { code: 0, .. } => {}
            State::Terminated {
                code,
                reason,
                message,
                ..
            } => {
                let s = PodStatus {
                    reason: Some(reason),
                    message: Some(format!(
                        "init container {} exited with {code}: {message}",
                        c.name
                    )),
                    ..status(&states, &restarts, "Failed", false, false)
                };
                patch_status(ctx, s).await;
                return;
            }
            _ => return,
        }
    }
    // App containers, all at once; restarted per the pod's restart policy.
    let mut tasks = tokio::task::JoinSet::new();
    for (i, c) in spec.containers.iter().enumerate() {
        states[i] = State::Running(now());
        let (c, env, volumes) = (c.clone(), envs[n_init + i].clone(), volumes.clone());
        let mut term = terminate.clone();
        let ctx2 = ctx.clone();
        tasks.spawn(async move { (i, run_container(&ctx2, &c, &env, &volumes, &mut term).await) });
    }
    patch_status(ctx, status(&states, &restarts, "Running", true, true)).await;
    while let Some(Ok((i, state))) = tasks.join_next().await {
        let code = match &state {
            State::Terminated { code, .. } => *code,
            _ => 0,
        };
        states[i] = state;
        let again = terminate.borrow().is_none()
            && (restart == "Always" || (restart == "OnFailure" && code != 0));
        if again {
            restarts[i] += 1;
            let backoff = Duration::from_secs((1u64 << restarts[i].min(4) as u32).min(10));
            patch_status(ctx, status(&states, &restarts, "Running", false, true)).await;
            let c = spec.containers[i].clone();
            let (env, volumes) = (envs[n_init + i].clone(), volumes.clone());
            let mut term = terminate.clone();
            let ctx2 = ctx.clone();
            tasks.spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = term.changed() => {}
                }
                (i, run_container(&ctx2, &c, &env, &volumes, &mut term).await)
            });
            states[i] = State::Running(now());
            patch_status(ctx, status(&states, &restarts, "Running", true, true)).await;
            continue;
        }
        let all_done = states.iter().all(|s| matches!(s, State::Terminated { .. }));
        if all_done {
            let ok = states
                .iter()
                .all(|s| matches!(s, State::Terminated { code: 0, .. }));
            let eviction = evict.borrow().clone();
            let done = match eviction {
                // The kubelet fails an evicted pod whatever its containers' codes.
                Some(e) => {
                    let mut s = status(&states, &restarts, "Failed", false, true);
                    if let Some(cs) = s.conditions.as_mut() {
                        cs.push(disrupt::condition(TERMINATION_BY_KUBELET, &e.message));
                    }
                    PodStatus {
                        reason: Some(EVICTED.into()),
                        message: Some(e.message),
                        ..s
                    }
                }
                None => status(
                    &states,
                    &restarts,
                    if ok { "Succeeded" } else { "Failed" },
                    false,
                    true,
                ),
            };
            patch_status(ctx, done).await;
        } else {
            patch_status(ctx, status(&states, &restarts, "Running", false, true)).await;
        }
    }
}
