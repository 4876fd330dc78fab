//! Manifests derived from the CRDs' structural schema, one per check the schema holds: for
//! every `minimum`, `maximum`, `multipleOf`, `minLength`, `maxLength`, `pattern`,
//! `minItems`, `maxItems`, `uniqueItems`, `minProperties`, `maxProperties`, `enum`,
//! `required` entry, `type`, closed object (a field it does not declare) and
//! `nullable: true`, a minimal valid object with that one field set to a value that breaks
//! the check (or to `null`, which `nullable` must accept, unless the field has an `enum`:
//! the API server checks it on `null` too). Its two readers: the crds tests
//! (`schema_bounds.rs`, the client-side validator `taper_crds::schema`) and the e2e suite
//! (`e2e/tests/cluster/schema.rs`, the same manifests sent to a real kube-apiserver),
//! which includes this file with `#[path]`. Both assert that every check [`count_checks`]
//! finds has its case, so a walker that finds nothing, or skips a kind of node, fails.
//!
//! Under `status` only unknown fields are refused: the status subresource makes the API
//! server drop `status` at creation, before validation, so its cases must be accepted.
//! The resource root is always an object (it carries `apiVersion` and `kind`): its `type`
//! is not a case.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// A field name no schema declares.
pub const UNKNOWN: &str = "zzUnknownField";

/// The checks a schema node holds, by keyword (each `required` entry counts once).
const VALUE_KEYWORDS: [&str; 12] = [
    "minimum",
    "maximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minProperties",
    "maxProperties",
    "enum",
];

/// One derived manifest and what both sides must do with it.
#[derive(Clone, Debug)]
pub struct SchemaCase {
    /// Unique: kind, field and keyword.
    pub name: String,
    pub kind: String,
    /// The check: a keyword of [`VALUE_KEYWORDS`], `exclusiveMinimum`/`exclusiveMaximum`,
    /// `required`, `type`, `unknownField` or `nullable`.
    pub keyword: &'static str,
    /// The field the refusal must name, in the API server's path style.
    pub field: String,
    /// The whole object to create.
    pub manifest: Value,
    /// The check that must refuse it (at `field`): `keyword`, or `enum` for a `nullable`
    /// field with an enum; `None`: it must be accepted (`nullable`, checks under `status`).
    pub refused_by: Option<&'static str>,
}

/// One step from a schema node to a child.
#[derive(Clone, Debug)]
enum Step {
    /// A property.
    Key(String),
    /// The first item of an array.
    Index,
    /// A value of a map (`additionalProperties`), under the key `k`.
    MapKey,
}

/// What to do at the end of the path.
enum Op {
    Set(Value),
    Remove,
}

/// The `openAPIV3Schema` of a CRD (as JSON).
pub fn root_schema(crd: &Value) -> &Value {
    &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
}

/// How many checks the schema of `crd` holds, by keyword, counted by a plain walk over
/// every schema node (the root, properties, items, map values, `anyOf`/`allOf`/`oneOf`
/// alternatives and `not`), independently of [`derive`].
pub fn count_checks(crd: &Value) -> BTreeMap<&'static str, usize> {
    fn walk(s: &Value, root: bool, out: &mut BTreeMap<&'static str, usize>) {
        let Some(node) = s.as_object() else { return };
        let mut add = |k: &'static str, n: usize| *out.entry(k).or_default() += n;
        for keyword in VALUE_KEYWORDS {
            if node.contains_key(keyword) {
                let keyword = match keyword {
                    "minimum" if s["exclusiveMinimum"] == json!(true) => "exclusiveMinimum",
                    "maximum" if s["exclusiveMaximum"] == json!(true) => "exclusiveMaximum",
                    k => k,
                };
                add(keyword, 1);
            }
        }
        add("required", s["required"].as_array().map_or(0, Vec::len));
        if !root && (node.contains_key("type") || s["x-kubernetes-int-or-string"] == json!(true)) {
            add("type", 1);
        }
        if s["nullable"] == json!(true) {
            add("nullable", 1);
        }
        if closed(s) {
            add("unknownField", 1);
        }
        for sub in s["properties"].as_object().into_iter().flatten() {
            walk(sub.1, false, out);
        }
        walk(&s["items"], false, out);
        walk(&s["additionalProperties"], false, out);
        walk(&s["not"], false, out);
        for key in ["anyOf", "allOf", "oneOf"] {
            for sub in s[key].as_array().into_iter().flatten() {
                walk(sub, false, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root_schema(crd), true, &mut out);
    out
}

/// Whether an object node refuses fields it does not declare.
fn closed(s: &Value) -> bool {
    s["type"] == "object"
        && s["x-kubernetes-preserve-unknown-fields"] != json!(true)
        && !s["additionalProperties"].is_object()
        && s["additionalProperties"] != json!(true)
}

/// Every case of `crd`'s schema, each a change of `base` (a valid object of `kind`).
pub fn derive(kind: &str, crd: &Value, base: &Value) -> Vec<SchemaCase> {
    let root = root_schema(crd);
    let mut out = Vec::new();
    let mut steps = Vec::new();
    walk(kind, root, root, base, &mut steps, &mut out);
    out
}

fn walk(
    kind: &str,
    root: &Value,
    s: &Value,
    base: &Value,
    steps: &mut Vec<Step>,
    out: &mut Vec<SchemaCase>,
) {
    let in_status = matches!(steps.first(), Some(Step::Key(k)) if k == "status");
    let field = path(steps);
    let mut case =
        |keyword: &'static str, field: String, extra: Option<Step>, op: Op, refused: bool| {
            let mut at = steps.clone();
            at.extend(extra);
            out.push(SchemaCase {
                name: format!("{kind} {field} {keyword}"),
                kind: kind.to_string(),
                keyword,
                field,
                manifest: build(base, root, &at, op),
                // A null is refused only by the enum check of a nullable field.
                refused_by: refused.then_some(if keyword == "nullable" {
                    "enum"
                } else {
                    keyword
                }),
            });
        };
    let refused = !in_status;
    if !steps.is_empty() {
        if s["x-kubernetes-int-or-string"] == json!(true) || s.get("type").is_some() {
            case("type", field.clone(), None, Op::Set(wrong_type(s)), refused);
        }
        if s["nullable"] == json!(true) {
            let enum_refuses_null = s["enum"]
                .as_array()
                .is_some_and(|e| !e.contains(&Value::Null));
            case(
                "nullable",
                field.clone(),
                None,
                Op::Set(Value::Null),
                refused && enum_refuses_null,
            );
        }
    }
    let integer = s["type"] == "integer";
    let number = |x: f64| {
        if integer { json!(x as i64) } else { json!(x) }
    };
    if let Some(min) = s["minimum"].as_f64() {
        let (keyword, bad) = if s["exclusiveMinimum"] == json!(true) {
            ("exclusiveMinimum", min)
        } else if integer {
            ("minimum", min.ceil() - 1.0)
        } else {
            ("minimum", min - 1.0)
        };
        case(keyword, field.clone(), None, Op::Set(number(bad)), refused);
    }
    if let Some(max) = s["maximum"].as_f64() {
        let (keyword, bad) = if s["exclusiveMaximum"] == json!(true) {
            ("exclusiveMaximum", max)
        } else if integer {
            ("maximum", max.floor() + 1.0)
        } else {
            ("maximum", max + 1.0)
        };
        case(keyword, field.clone(), None, Op::Set(number(bad)), refused);
    }
    if let Some(k) = s["multipleOf"].as_f64() {
        case(
            "multipleOf",
            field.clone(),
            None,
            Op::Set(number(k * 1.5)),
            refused,
        );
    }
    if let Some(n) = s["minLength"].as_u64() {
        // minLength 0 cannot be broken: no case, and the count check fails.
        if n > 0 {
            let short = "a".repeat(n as usize - 1);
            case(
                "minLength",
                field.clone(),
                None,
                Op::Set(json!(short)),
                refused,
            );
        }
    }
    if let Some(n) = s["maxLength"].as_u64() {
        let long = "a".repeat(n as usize + 1);
        case(
            "maxLength",
            field.clone(),
            None,
            Op::Set(json!(long)),
            refused,
        );
    }
    if let Some(pattern) = s["pattern"].as_str() {
        let re = regex::Regex::new(pattern).expect("the CRD's pattern compiles");
        let candidates = ["", "-", "A", "a", "0", " ", "_!_", "a.b/c", "ÿ"];
        if let Some(bad) = candidates.iter().find(|c| !re.is_match(c)) {
            case("pattern", field.clone(), None, Op::Set(json!(bad)), refused);
        }
    }
    let items = &s["items"];
    // minItems 0 (like minLength 0) cannot be broken: no case, and the count check fails.
    if let Some(n) = s["minItems"].as_u64()
        && n > 0
    {
        let few = vec![minimal(items); n as usize - 1];
        case(
            "minItems",
            field.clone(),
            None,
            Op::Set(json!(few)),
            refused,
        );
    }
    if let Some(n) = s["maxItems"].as_u64() {
        let many = vec![minimal(items); n as usize + 1];
        case(
            "maxItems",
            field.clone(),
            None,
            Op::Set(json!(many)),
            refused,
        );
    }
    if s["uniqueItems"] == json!(true) {
        let n = s["minItems"].as_u64().unwrap_or(0).max(2) as usize;
        let same = vec![minimal(items); n];
        case(
            "uniqueItems",
            field.clone(),
            None,
            Op::Set(json!(same)),
            refused,
        );
    }
    if s["minProperties"].as_u64().is_some_and(|n| n > 0) {
        case(
            "minProperties",
            field.clone(),
            None,
            Op::Set(json!({})),
            refused,
        );
    }
    if let Some(n) = s["maxProperties"].as_u64() {
        let map: serde_json::Map<String, Value> = (0..=n)
            .map(|i| (format!("k{i}"), minimal(&s["additionalProperties"])))
            .collect();
        case(
            "maxProperties",
            field.clone(),
            None,
            Op::Set(Value::Object(map)),
            refused,
        );
    }
    if let Some(allowed) = s["enum"].as_array() {
        let bad = ["zz-not-allowed", "ZZ", "0"]
            .into_iter()
            .map(|b| json!(b))
            .find(|b| !allowed.contains(b))
            .unwrap_or(json!({}));
        case("enum", field.clone(), None, Op::Set(bad), refused);
    }
    let properties = s["properties"].as_object();
    for name in s["required"].as_array().into_iter().flatten() {
        let name = name.as_str().expect("required names are strings");
        let defaulted = properties.is_some_and(|p| p[name].get("default").is_some());
        case(
            "required",
            join(&field, name),
            Some(Step::Key(name.to_string())),
            Op::Remove,
            refused && !defaulted,
        );
    }
    if closed(s) {
        case(
            "unknownField",
            join(&field, UNKNOWN),
            Some(Step::Key(UNKNOWN.to_string())),
            Op::Set(json!(1)),
            true,
        );
    }
    for (name, sub) in properties.into_iter().flatten() {
        steps.push(Step::Key(name.clone()));
        walk(kind, root, sub, base, steps, out);
        steps.pop();
    }
    if items.is_object() {
        steps.push(Step::Index);
        walk(kind, root, items, base, steps, out);
        steps.pop();
    }
    if s["additionalProperties"].is_object() {
        steps.push(Step::MapKey);
        walk(kind, root, &s["additionalProperties"], base, steps, out);
        steps.pop();
    }
}

/// The API server's path of `steps`: `spec.sources[0].name`, `spec.resources.nodeSelector.k`.
fn path(steps: &[Step]) -> String {
    let mut out = String::new();
    for step in steps {
        match step {
            Step::Key(k) => out = join(&out, k),
            Step::Index => out.push_str("[0]"),
            Step::MapKey => out = join(&out, "k"),
        }
    }
    out
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// A value of another type than `s` declares.
fn wrong_type(s: &Value) -> Value {
    if s["x-kubernetes-int-or-string"] == json!(true) {
        return json!(true);
    }
    match s["type"].as_str() {
        Some("string") => json!(12345),
        _ => json!("text"),
    }
}

/// The smallest valid value of `s`: its first enum value, or the lowest number in bounds,
/// the shortest string, the fewest items, only the required properties.
fn minimal(s: &Value) -> Value {
    if let Some(first) = s["enum"].as_array().and_then(|e| e.first()) {
        return first.clone();
    }
    if s["x-kubernetes-int-or-string"] == json!(true) {
        return json!(1);
    }
    match s["type"].as_str() {
        Some("string") => {
            // A CEL rule `self.startsWith('s3://') || …` on the field: start with its first
            // prefix, so that the minimal object passes the API server's CEL rules too.
            let prefix = s["x-kubernetes-validations"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v["rule"].as_str()?.split("startsWith('").nth(1))
                .filter_map(|rest| rest.split('\'').next())
                .next()
                .unwrap_or_default();
            let min = s["minLength"].as_u64().unwrap_or(1).max(1) as usize;
            json!(format!(
                "{prefix}{}",
                "a".repeat(min.saturating_sub(prefix.len()).max(1))
            ))
        }

        Some("integer" | "number") => {
            let mut x = 1.0_f64;
            if let Some(min) = s["minimum"].as_f64() {
                let lo = if s["exclusiveMinimum"] == json!(true) {
                    min + 1.0
                } else {
                    min
                };
                x = x.max(lo.ceil());
            }
            if let Some(max) = s["maximum"].as_f64() {
                x = x.min(max.floor());
            }
            json!(x as i64)
        }
        Some("boolean") => json!(false),
        Some("array") => {
            json!(vec![
                minimal(&s["items"]);
                s["minItems"].as_u64().unwrap_or(0) as usize
            ])
        }
        _ => {
            let mut map = serde_json::Map::new();
            for name in s["required"].as_array().into_iter().flatten() {
                let name = name.as_str().unwrap_or_default();
                map.insert(name.to_string(), minimal(&s["properties"][name]));
            }
            Value::Object(map)
        }
    }
}

/// `base` with `op` done at `steps`, the objects and arrays on the way created minimal.
fn build(base: &Value, root: &Value, steps: &[Step], op: Op) -> Value {
    let mut manifest = base.clone();
    let mut cur = &mut manifest;
    let mut s = root;
    let mut op = Some(op);
    for (i, step) in steps.iter().enumerate() {
        let last = i + 1 == steps.len();
        let (key, sub) = match step {
            Step::Key(k) => (Some(k.as_str()), &s["properties"][k.as_str()]),
            Step::MapKey => (Some("k"), &s["additionalProperties"]),
            Step::Index => (None, &s["items"]),
        };
        // A key absent from `properties` (an unknown field) has no schema: `sub` is null.
        s = sub;
        match key {
            Some(key) => {
                let map = cur.as_object_mut().expect("an object on the way");
                if last {
                    match op.take() {
                        Some(Op::Set(v)) => {
                            map.insert(key.to_string(), v);
                        }
                        Some(Op::Remove) => {
                            map.remove(key);
                        }
                        None => {}
                    }
                    return manifest;
                }
                let slot = map.entry(key.to_string()).or_insert(Value::Null);
                if slot.is_null() {
                    *slot = minimal(s);
                }
                cur = slot;
            }
            None => {
                let items = cur.as_array_mut().expect("an array on the way");
                if items.is_empty() {
                    items.push(minimal(s));
                }
                if last {
                    match op.take() {
                        Some(Op::Set(v)) => items[0] = v,
                        Some(Op::Remove) => {
                            items.remove(0);
                        }
                        None => {}
                    }
                    return manifest;
                }
                cur = &mut items[0];
            }
        }
    }
    manifest
}
