//! The one table of manifests the CRDs' CEL rules must refuse (`invalid-manifests.yaml`
//! beside this file) and what its two readers share: the crds tests (`cel_rules.rs`, the
//! rules evaluated client-side by kube's CEL evaluator) and the e2e suite
//! (`e2e/tests/cluster/cel.rs`, the same manifests through `kubectl apply` to a real
//! kube-apiserver), which includes this file with `#[path]`. Add a case to the YAML and
//! both check it; each also fails when a CRD rule has no case.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Value, json};

/// The table, read at compile time so both suites always see the same one.
const TABLE: &str = include_str!("invalid-manifests.yaml");

/// `invalid-manifests.yaml`: a valid object per kind and the cases that break it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    /// A valid object of each kind (the key); every case changes one.
    pub bases: BTreeMap<String, Value>,
    pub cases: Vec<Case>,
}

/// A manifest the API server must refuse.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Case {
    /// Unique, for messages.
    pub name: String,
    /// The kind, a key of `bases`.
    pub kind: String,
    /// An update of the base object rather than a create (for rules on `oldSelf`).
    #[serde(default)]
    pub update: bool,
    /// JSON pointer → value, set in the base; objects on the way are created.
    pub set: BTreeMap<String, Value>,
    /// Every rule the manifest breaks: the refusal must name each.
    pub refused: Vec<Refusal>,
    /// Set when only one side can check the case, with the reason in a comment.
    #[serde(default)]
    pub only: Option<Side>,
}

/// One rule a case breaks, and what the refusal must say.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    /// The schema node that holds the rule, as [`rules`] spells it: `.spec.sources[].uri`.
    pub rule: String,
    /// Part of the rule's message (which also tells the rules of one node apart).
    pub message: String,
    /// The field the refusal must name, in its message or its field path.
    pub field: String,
}

/// Who evaluates the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Side {
    /// kube's CEL evaluator in the crds tests.
    Client,
    /// kube-apiserver in the e2e suite.
    Server,
}

/// A CEL rule of a CRD: where it sits, its message and its `fieldPath`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The schema node: `.spec.training`, `.spec.sources[].uri`.
    pub path: String,
    pub message: String,
    pub field_path: String,
}

impl Table {
    /// The table, parsed; panics with the reason when the YAML is malformed.
    pub fn load() -> Self {
        let table: Self = serde_yaml::from_str(TABLE)
            .unwrap_or_else(|e| panic!("cel_cases/invalid-manifests.yaml: {e}"));
        let mut names: Vec<&str> = table.cases.iter().map(|c| c.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            panic!("cel_cases/invalid-manifests.yaml: case {:?} twice", w[0]);
        }
        table
    }

    /// The valid base object of `kind`.
    pub fn base(&self, kind: &str) -> Value {
        self.bases
            .get(kind)
            .unwrap_or_else(|| panic!("invalid-manifests.yaml has no base for {kind}"))
            .clone()
    }

    /// The cases `side` checks.
    pub fn cases_for(&self, side: Side) -> impl Iterator<Item = &Case> {
        self.cases
            .iter()
            .filter(move |c| c.only.is_none_or(|only| only == side))
    }

    /// The rules of `kind` (from `crd`) that no case checked by `side` breaks, and the
    /// refusals of its cases that name no rule of the CRD (stale entries), as messages.
    pub fn gaps(&self, kind: &str, crd: &Value, side: Side) -> Vec<String> {
        let rules = rules(crd);
        let cases: Vec<&Case> = self.cases_for(side).filter(|c| c.kind == kind).collect();
        let mut gaps: Vec<String> = rules
            .iter()
            .filter(|r| !cases.iter().any(|c| c.refused.iter().any(|f| f.breaks(r))))
            .map(|r| {
                format!(
                    "no case breaks the {kind} rule at {} ({}): add one to invalid-manifests.yaml",
                    r.path, r.message
                )
            })
            .collect();
        for case in &cases {
            for f in &case.refused {
                let n = rules.iter().filter(|r| f.breaks(r)).count();
                if n != 1 {
                    gaps.push(format!(
                        "case {}: {n} {kind} rules at {} with a message containing {:?}, not 1",
                        case.name, f.rule, f.message
                    ));
                }
            }
        }
        gaps
    }
}

impl Case {
    /// The manifest: the base of its kind with `set` applied.
    pub fn manifest(&self, table: &Table) -> Value {
        let mut v = table.base(&self.kind);
        for (pointer, value) in &self.set {
            set(&mut v, pointer, value.clone());
        }
        v
    }
}

impl Refusal {
    /// Whether this is `rule`: the same node and a message containing ours.
    pub fn breaks(&self, rule: &Rule) -> bool {
        rule.path == self.rule && rule.message.contains(&self.message)
    }
}

/// Set a JSON-pointer path, creating objects on the way (an index one past the end
/// appends).
pub fn set(v: &mut Value, pointer: &str, value: Value) {
    let mut cur = v;
    let parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
    for (i, p) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        cur = match cur {
            Value::Array(items) => {
                let idx: usize = p
                    .parse()
                    .unwrap_or_else(|_| panic!("{pointer}: {p} is not an array index"));
                if idx == items.len() {
                    items.push(json!({}));
                }
                if last {
                    items[idx] = value;
                    return;
                }
                &mut items[idx]
            }
            other => {
                if !other.is_object() {
                    *other = json!({});
                }
                let Some(map) = other.as_object_mut() else {
                    unreachable!("made an object above")
                };
                if last {
                    map.insert(p.to_string(), value);
                    return;
                }
                map.entry(p.to_string()).or_insert_with(|| json!({}))
            }
        };
    }
}

/// Every CEL rule of a CRD (as JSON), with the path of its schema node.
pub fn rules(crd: &Value) -> Vec<Rule> {
    fn walk(s: &Value, path: &str, out: &mut Vec<Rule>) {
        for v in s["x-kubernetes-validations"]
            .as_array()
            .into_iter()
            .flatten()
        {
            out.push(Rule {
                path: path.to_string(),
                message: v["message"].as_str().unwrap_or_default().to_string(),
                field_path: v["fieldPath"].as_str().unwrap_or_default().to_string(),
            });
        }
        for (k, sub) in s["properties"].as_object().into_iter().flatten() {
            walk(sub, &format!("{path}.{k}"), out);
        }
        if s["items"].is_object() {
            walk(&s["items"], &format!("{path}[]"), out);
        }
    }
    let mut out = Vec::new();
    walk(
        &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"],
        "",
        &mut out,
    );
    out
}
