//! What the runner reports of its pods, as the typed API objects: each container's state
//! (`ContainerStatus`), the pod's phase and conditions (`PodStatus`), written with a
//! strategic merge patch of the `status` subresource, as the kubelet writes it: conditions
//! merge by type, so one the runner does not own (`DisruptionTarget`) is kept.

use k8s_openapi::{
    api::core::v1::{
        Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
        ContainerStateWaiting, ContainerStatus, Pod, PodCondition, PodIP, PodStatus,
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::json;

use super::{now, pod::PodCtx};

/// The address of the node and of every pod on it.
pub(super) const LOCALHOST: &str = "127.0.0.1";

/// Where one container is: the runner's state machine, one variant per `ContainerState`.
#[derive(Clone, Debug)]
pub(super) enum State {
    /// Not started: (reason, message).
    Waiting(String, String),
    /// Running since the time given.
    Running(Time),
    /// Exited.
    Terminated {
        code: i32,
        reason: String,
        message: String,
        started: Time,
        finished: Time,
    },
}

impl From<&State> for ContainerState {
    fn from(state: &State) -> Self {
        match state {
            State::Waiting(reason, message) => Self {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: Some(message.clone()),
                }),
                ..Default::default()
            },
            State::Running(started) => Self {
                running: Some(ContainerStateRunning {
                    started_at: Some(started.clone()),
                }),
                ..Default::default()
            },
            State::Terminated {
                code,
                reason,
                message,
                started,
                finished,
            } => Self {
                terminated: Some(ContainerStateTerminated {
                    exit_code: *code,
                    reason: Some(reason.clone()),
                    message: Some(message.clone()),
                    started_at: Some(started.clone()),
                    finished_at: Some(finished.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            },
        }
    }
}

/// The status of container `c` in `state` after `restarts` restarts.
pub(super) fn container_status(c: &Container, state: &State, restarts: i32) -> ContainerStatus {
    let running = matches!(state, State::Running(_));
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone().unwrap_or_default(),
        image_id: String::new(),
        container_id: Some(format!("taper://{}", c.name)),
        ready: running,
        started: Some(running),
        restart_count: restarts,
        state: Some(state.into()),
        ..Default::default()
    }
}

/// The pod conditions: scheduled (always), initialized, and ready (containers and pod).
pub(super) fn conditions(ready: bool, initialized: bool) -> Vec<PodCondition> {
    let t = now();
    let c = |type_: &str, ok: bool| PodCondition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        last_transition_time: Some(t.clone()),
        ..Default::default()
    };
    vec![
        c("PodScheduled", true),
        c("Initialized", initialized),
        c("ContainersReady", ready),
        c("Ready", ready),
    ]
}

/// A pod's status on this node: its phase, start time, conditions and containers.
pub(super) fn pod_status(
    phase: &str,
    start_time: Time,
    conditions: Vec<PodCondition>,
    containers: Vec<ContainerStatus>,
) -> PodStatus {
    PodStatus {
        phase: Some(phase.into()),
        host_ip: Some(LOCALHOST.into()),
        start_time: Some(start_time),
        conditions: Some(conditions),
        container_statuses: Some(containers),
        ..Default::default()
    }
}

/// `status` with the pod's IP, which it has once its containers are created.
pub(super) fn with_pod_ip(status: PodStatus) -> PodStatus {
    PodStatus {
        pod_ip: Some(LOCALHOST.into()),
        pod_ips: Some(vec![PodIP {
            ip: LOCALHOST.into(),
        }]),
        ..status
    }
}

/// Merge `status` into the pod's status (a strategic merge: conditions by type); a failure
/// is logged (the next update retries).
pub(super) async fn patch_status(ctx: &PodCtx, status: PodStatus) {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    if let Err(e) = pods
        .patch_status(
            &ctx.name,
            &PatchParams::default(),
            &Patch::Strategic(json!({ "status": status })),
        )
        .await
    {
        tracing::warn!("status of pod {}/{}: {e}", ctx.ns, ctx.name);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn time(s: &str) -> Time {
        Time(s.parse().expect("timestamp"))
    }

    /// The JSON the runner sends is what it sent when it built it by hand.
    #[test]
    fn container_status_json_is_the_kubelet_shape() {
        let c = Container {
            name: "trainer".into(),
            image: Some("taper-trainer:0.1.0".into()),
            ..Default::default()
        };
        let waiting = State::Waiting("PodInitializing".into(), String::new());
        assert_eq!(
            serde_json::to_value(container_status(&c, &waiting, 0)).expect("json"),
            json!({"name": "trainer", "image": "taper-trainer:0.1.0", "imageID": "",
                   "containerID": "taper://trainer", "ready": false, "started": false,
                   "restartCount": 0,
                   "state": {"waiting": {"reason": "PodInitializing", "message": ""}}})
        );
        let running = State::Running(time("2025-01-02T03:04:05Z"));
        let v: Value = serde_json::to_value(container_status(&c, &running, 2)).expect("json");
        assert_eq!(
            v["state"],
            json!({"running": {"startedAt": "2025-01-02T03:04:05Z"}})
        );
        assert_eq!(
            (v["ready"].clone(), v["started"].clone()),
            (json!(true), json!(true))
        );
        assert_eq!(v["restartCount"], 2);
        let done = State::Terminated {
            code: 2,
            reason: "Error".into(),
            message: "bad job".into(),
            started: time("2025-01-02T03:04:05Z"),
            finished: time("2025-01-02T03:04:09Z"),
        };
        let v = serde_json::to_value(container_status(&c, &done, 0)).expect("json");
        assert_eq!(
            v["state"],
            json!({"terminated": {"exitCode": 2, "reason": "Error", "message": "bad job",
                   "startedAt": "2025-01-02T03:04:05Z", "finishedAt": "2025-01-02T03:04:09Z"}})
        );
    }

    #[test]
    fn pod_status_json_is_the_kubelet_shape() {
        let t = time("2025-01-02T03:04:05Z");
        let s = with_pod_ip(pod_status("Running", t, conditions(true, true), vec![]));
        let v = serde_json::to_value(s).expect("json");
        assert_eq!(v["phase"], "Running");
        assert_eq!(v["hostIP"], LOCALHOST);
        assert_eq!(v["podIP"], LOCALHOST);
        assert_eq!(v["podIPs"], json!([{"ip": LOCALHOST}]));
        assert_eq!(v["startTime"], "2025-01-02T03:04:05Z");
        let types: Vec<_> = v["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .map(|c| (c["type"].clone(), c["status"].clone()))
            .collect();
        assert_eq!(
            types,
            [
                (json!("PodScheduled"), json!("True")),
                (json!("Initialized"), json!("True")),
                (json!("ContainersReady"), json!("True")),
                (json!("Ready"), json!("True")),
            ]
        );
        let pending = pod_status("Pending", time("2025-01-02T03:04:05Z"), vec![], vec![]);
        let v = serde_json::to_value(pending).expect("json");
        assert!(v.get("podIP").is_none() && v.get("reason").is_none(), "{v}");
    }
}
