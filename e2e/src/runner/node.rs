//! The node agent: registers the Node and keeps it Ready with heartbeats, binds unbound
//! pods to it (as the absent scheduler would, through `pods/binding`), starts or stops one
//! pod task per pod bound to it as pods appear, are deleted or vanish, and disrupts the
//! pods annotated for it (see [`super::disrupt`]): preempts them as the scheduler, or has
//! their task evict them.

use std::{collections::HashMap, sync::Arc, time::Duration};

use k8s_openapi::{
    api::core::v1::{
        Binding, Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo, ObjectReference, Pod,
    },
    apimachinery::pkg::api::resource::Quantity,
};
use kube::{
    Api, Client,
    api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use tokio::{sync::watch, task::JoinHandle};

use super::{
    RunnerError, RunnerOptions,
    disrupt::{self, Disruption, Eviction},
    now,
    pod::run_pod,
    status::LOCALHOST,
};

/// Register the node (its labels) and post its first status.
pub(super) async fn register_node(
    client: &Client,
    opts: &RunnerOptions,
) -> Result<(), RunnerError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let pp = PatchParams::apply("taper-pod-runner").force();
    let labels = [
        ("kubernetes.io/hostname", opts.node_name.as_str()),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", "amd64"),
        ("nvidia.com/gpu.present", "true"),
    ];
    let node = Node {
        metadata: ObjectMeta {
            name: Some(opts.node_name.clone()),
            labels: Some(
                labels
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        ..Default::default()
    };
    nodes
        .patch(&opts.node_name, &pp, &Patch::Apply(node))
        .await?;
    heartbeat(&nodes, opts).await
}

/// The node's status: resources (with the fake GPUs), Ready and no pressure, addresses
/// and system info.
fn node_status(opts: &RunnerOptions) -> NodeStatus {
    let t = now();
    let resources: std::collections::BTreeMap<String, Quantity> = [
        ("cpu", "16".to_string()),
        ("memory", "128Gi".into()),
        ("pods", "110".into()),
        ("ephemeral-storage", "100Gi".into()),
        ("nvidia.com/gpu", opts.gpus.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), Quantity(v)))
    .collect();
    let condition = |type_: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(t.clone()),
        last_transition_time: Some(t.clone()),
    };
    let address = |type_: &str, address: &str| NodeAddress {
        type_: type_.into(),
        address: address.into(),
    };
    NodeStatus {
        capacity: Some(resources.clone()),
        allocatable: Some(resources),
        conditions: Some(vec![
            condition(
                "Ready",
                "True",
                "KubeletReady",
                "taper pod runner is posting ready status",
            ),
            condition(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "ok",
            ),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "ok"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "ok"),
        ]),
        addresses: Some(vec![
            address("InternalIP", LOCALHOST),
            address("Hostname", &opts.node_name),
        ]),
        node_info: Some(NodeSystemInfo {
            machine_id: "taper-e2e".into(),
            system_uuid: "taper-e2e".into(),
            boot_id: "taper-e2e".into(),
            kernel_version: String::new(),
            os_image: "taper e2e pod runner".into(),
            container_runtime_version: "taper-pod-runner://0.1".into(),
            kubelet_version: "v1.34.4".into(),
            kube_proxy_version: String::new(),
            operating_system: "linux".into(),
            architecture: "amd64".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Post the node's status (every 10 s, so the node stays Ready).
async fn heartbeat(nodes: &Api<Node>, opts: &RunnerOptions) -> Result<(), RunnerError> {
    nodes
        .patch_status(
            &opts.node_name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": node_status(opts) })),
        )
        .await?;
    Ok(())
}

/// A pod this node runs: its task, the channels that ask it to stop (deleted) or to evict
/// the pod, and whether the pod's disruption annotation was acted on.
struct Tracked {
    terminate: watch::Sender<Option<i64>>,
    evict: watch::Sender<Option<Eviction>>,
    disrupted: bool,
    task: JoinHandle<()>,
}

/// The node agent's loop: heartbeats, binding, and one task per pod bound to the node,
/// told through its `terminate` channel when the pod is deleted (its grace period) or gone
/// (none); on stop, every pod gets 5 s.
pub(super) async fn run(
    node: Client,
    scheduler: Client,
    opts: Arc<RunnerOptions>,
    mut stopped: watch::Receiver<bool>,
) {
    let nodes: Api<Node> = Api::all(node.clone());
    let all_sched: Api<Pod> = Api::all(scheduler.clone());
    let all_node: Api<Pod> = Api::all(node.clone());
    let mine = ListParams::default().fields(&format!("spec.nodeName={}", opts.node_name));
    let unbound = ListParams::default().fields("spec.nodeName=");
    let mut tracked: HashMap<String, Tracked> = HashMap::new();
    let mut last_beat = tokio::time::Instant::now();
    loop {
        if *stopped.borrow() {
            break;
        }
        if last_beat.elapsed() > Duration::from_secs(10) {
            if let Err(e) = heartbeat(&nodes, &opts).await {
                tracing::warn!("node heartbeat: {e}");
            }
            last_beat = tokio::time::Instant::now();
        }
        // Bind what the (absent) scheduler would.
        if let Ok(list) = all_sched.list(&unbound).await {
            for pod in list.items {
                if let Err(e) = bind(&scheduler, &pod, &opts.node_name).await {
                    tracing::warn!(
                        "binding {}: {e}",
                        pod.metadata.name.as_deref().unwrap_or("")
                    );
                }
            }
        }
        match all_node.list(&mine).await {
            Ok(list) => {
                let mut seen = Vec::new();
                for pod in list.items {
                    let Some(uid) = pod.metadata.uid.clone() else {
                        continue;
                    };
                    seen.push(uid.clone());
                    let deleting = pod.metadata.deletion_timestamp.is_some();
                    let grace = pod
                        .metadata
                        .deletion_grace_period_seconds
                        .or_else(|| pod.spec.as_ref()?.termination_grace_period_seconds)
                        .unwrap_or(30);
                    if let Some(t) = tracked.get_mut(&uid) {
                        if deleting {
                            if t.terminate.borrow().is_none() {
                                let _ = t.terminate.send(Some(grace));
                            }
                        } else if !t.disrupted
                            && let Some(asked) = disrupt::requested(&pod)
                        {
                            t.disrupted = true;
                            disrupt_pod(&scheduler, &pod, t, asked).await;
                        }
                        continue;
                    }
                    let (terminate, rx) = watch::channel(deleting.then_some(grace));
                    let (evict, evict_rx) = watch::channel(None);
                    let task = tokio::spawn(run_pod(node.clone(), opts.clone(), pod, rx, evict_rx));
                    tracked.insert(
                        uid,
                        Tracked {
                            terminate,
                            evict,
                            disrupted: false,
                            task,
                        },
                    );
                }
                // Gone from the API (force-deleted): stop at once.
                for (uid, t) in &tracked {
                    if !seen.contains(uid) && t.terminate.borrow().is_none() {
                        let _ = t.terminate.send(Some(0));
                    }
                }
                tracked.retain(|uid, t| seen.contains(uid) || !t.task.is_finished());
            }
            Err(e) => tracing::warn!("listing pods of {}: {e}", opts.node_name),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            _ = stopped.changed() => {}
        }
    }
    for t in tracked.values() {
        let _ = t.terminate.send(Some(5));
    }
    for (_, t) in tracked {
        let _ = t.task.await;
    }
}

/// Disrupt `pod` as `asked`: preempt it as the scheduler, or have its task evict it.
async fn disrupt_pod(
    scheduler: &Client,
    pod: &Pod,
    t: &Tracked,
    asked: Result<Disruption, String>,
) {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    match asked {
        Ok(Disruption::Preemption { grace }) => {
            tracing::info!("preempting pod {name} (grace {grace} s)");
            if let Err(e) = disrupt::preempt(scheduler, pod, grace).await {
                tracing::warn!("preempting pod {name}: {e}");
            }
        }
        Ok(Disruption::Eviction(e)) => {
            tracing::info!("evicting pod {name} (grace {} s)", e.grace);
            let _ = t.evict.send(Some(e));
        }
        Err(why) => tracing::warn!("pod {name}: {why}"),
    }
}

/// Bind `pod` to the node, as the scheduler would, unless it names another scheduler or
/// is being deleted.
async fn bind(client: &Client, pod: &Pod, node_name: &str) -> Result<(), RunnerError> {
    let (Some(ns), Some(name)) = (
        pod.metadata.namespace.as_deref(),
        pod.metadata.name.as_deref(),
    ) else {
        return Ok(());
    };
    let spec = pod.spec.as_ref();
    let scheduler = spec
        .and_then(|s| s.scheduler_name.as_deref())
        .unwrap_or("default-scheduler");
    if scheduler != "default-scheduler" || pod.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(ns.to_string()),
            ..Default::default()
        },
        target: ObjectReference {
            kind: Some("Node".into()),
            api_version: Some("v1".into()),
            name: Some(node_name.to_string()),
            ..Default::default()
        },
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.create_subresource::<Binding, Value>("binding", name, &PostParams::default(), &binding)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// The JSON the runner sends is what it sent when it built it by hand.
    #[test]
    fn node_status_json_is_the_kubelet_shape() {
        let opts = RunnerOptions::new("n0", PathBuf::from("/bin/true"), PathBuf::from("/tmp"));
        let v = serde_json::to_value(node_status(&opts)).expect("json");
        let resources = json!({"cpu": "16", "memory": "128Gi", "pods": "110",
                               "ephemeral-storage": "100Gi", "nvidia.com/gpu": "8"});
        assert_eq!(v["capacity"], resources);
        assert_eq!(v["allocatable"], resources);
        assert_eq!(
            v["addresses"],
            json!([{"type": "InternalIP", "address": "127.0.0.1"},
                   {"type": "Hostname", "address": "n0"}])
        );
        let ready = &v["conditions"][0];
        assert_eq!(
            (&ready["type"], &ready["status"], &ready["reason"]),
            (&json!("Ready"), &json!("True"), &json!("KubeletReady"))
        );
        assert!(ready["lastHeartbeatTime"].is_string(), "{ready}");
        assert_eq!(v["nodeInfo"]["kubeletVersion"], "v1.34.4");
        assert_eq!(v["nodeInfo"]["kernelVersion"], "");
        assert_eq!(v["nodeInfo"].as_object().map(|o| o.len()), Some(10), "{v}");
    }
}
