//! The ConfigMap holding the resolved job file, mounted at the pod contract's path.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use taper_crds::{TaperObject, pod};

use super::{Owner, Plan};

/// The objects of `plan` as one multi-document YAML file.
pub fn job_file(plan: &Plan) -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for (i, object) in plan.objects.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&match object {
            TaperObject::Dataset(o) => serde_yaml::to_string(o.as_ref())?,
            TaperObject::PretrainJob(o) => serde_yaml::to_string(o.as_ref())?,
            TaperObject::FinetuneJob(o) => serde_yaml::to_string(o.as_ref())?,
        });
    }
    Ok(out)
}

/// The ConfigMap `<name>-<command>` with the job file under [`pod::JOB_FILE`].
pub fn config_map(owner: &Owner, plan: &Plan) -> Result<ConfigMap, serde_yaml::Error> {
    let name = owner.child_name(plan.command);
    Ok(ConfigMap {
        metadata: owner.meta(&name, plan.command),
        data: Some(BTreeMap::from([(
            pod::JOB_FILE.to_string(),
            job_file(plan)?,
        )])),
        ..ConfigMap::default()
    })
}
