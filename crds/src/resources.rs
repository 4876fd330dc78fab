//! Compute resources and placement of the pods a resource runs.

use std::collections::BTreeMap;

use k8s_openapi::{api::core::v1::Toleration, apimachinery::pkg::api::resource::Quantity};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Default extended-resource name of a GPU.
pub const DEFAULT_GPU_RESOURCE: &str = "nvidia.com/gpu";

/// Compute resources and scheduling of the trainer pod.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// GPUs requested by the trainer pod (requests = limits). Default: 1 for PretrainJob and
    /// FinetuneJob, 0 for Dataset. 0 runs on CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 64))]
    pub gpus: Option<i32>,
    /// Extended-resource name under which GPUs are requested. Default: `nvidia.com/gpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub gpu_resource_name: Option<String>,
    /// CPU request of the pod (a Kubernetes quantity such as `8` or `500m`). Default: `2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory request and limit of the pod (a Kubernetes quantity such as `32Gi`). Default: `8Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// Node labels the pod must match, as `pod.spec.nodeSelector`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the pod, as `pod.spec.tolerations` (for example for tainted GPU nodes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// PriorityClass of the pod, so training can be preempted by (or preempt) other work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
}

impl Resources {
    /// GPUs requested, with the kind's default filled in.
    pub fn gpus_or(&self, default: i32) -> i32 {
        self.gpus.unwrap_or(default)
    }

    /// Extended-resource name for GPUs, with the default filled in.
    pub fn gpu_resource_name(&self) -> &str {
        self.gpu_resource_name
            .as_deref()
            .unwrap_or(DEFAULT_GPU_RESOURCE)
    }
}
