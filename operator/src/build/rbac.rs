//! The per-job identity: a ServiceAccount for the trainer pod, and a Role and RoleBinding
//! that allow it exactly `get` and `patch` on its own resource's `status` — the channel of
//! live training figures, with the least privilege that can carry them.

use k8s_openapi::api::{
    core::v1::ServiceAccount,
    rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
};
use taper_crds::GROUP;

use super::Owner;

/// The trainer's ServiceAccount (no token automounted: the pod projects its own).
pub fn service_account(owner: &Owner, command: &str) -> ServiceAccount {
    ServiceAccount {
        metadata: owner.meta(&owner.child_name(command), command),
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

/// The Role: `get` and `patch` on `<plural>/status` of this one resource.
pub fn role(owner: &Owner, command: &str) -> Role {
    Role {
        metadata: owner.meta(&owner.child_name(command), command),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![GROUP.to_string()]),
            resources: Some(vec![format!("{}/status", owner.plural)]),
            resource_names: Some(vec![owner.name.clone()]),
            verbs: vec!["get".into(), "patch".into()],
            ..PolicyRule::default()
        }]),
    }
}

/// The RoleBinding of that Role to the ServiceAccount.
pub fn role_binding(owner: &Owner, command: &str) -> RoleBinding {
    let name = owner.child_name(command);
    RoleBinding {
        metadata: owner.meta(&name, command),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name,
            namespace: Some(owner.namespace.clone()),
            ..Subject::default()
        }]),
    }
}
