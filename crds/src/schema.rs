//! The CRDs' structural OpenAPI schema, checked client-side as kube-apiserver checks it.
//!
//! `kubectl apply` of a Taper object goes through two gates before the CEL rules: the API
//! server decodes the object with strict field validation (kubectl's default), which
//! refuses every field the schema does not declare (`unknown field "spec.x"`), and then
//! validates the decoded object against the schema: types, `minimum`/`maximum` (and their
//! exclusive forms), `multipleOf`, `enum`, `pattern`, `minLength`/`maxLength`,
//! `minItems`/`maxItems`, `uniqueItems`, `minProperties`/`maxProperties`, `required`, and
//! `anyOf`/`allOf`/`oneOf`/`not`. [`validate`] does both, walking the schema that
//! [`crate::crds`] generates (the one the CRD manifests in `charts/taper/crds/` are written
//! from), with the API server's semantics and wording:
//!
//! - field paths as the API server prints them: `spec.training.batchSize`,
//!   `spec.sources[0].name`, `spec.resources.nodeSelector.zone`;
//! - messages as kube-apiserver v1.34 words them, e.g. `spec.training.batchSize: Invalid
//!   value: -4: spec.training.batchSize in body should be greater than or equal to 1`;
//! - unknown fields refuse the object on their own, before any other check, as strict
//!   decoding does; `apiVersion`, `kind` and the fields of `metadata` (ObjectMeta) are known;
//! - `status` is checked for unknown fields but not validated: the status subresource
//!   makes the API server drop it at creation, before validation;
//! - `null` is accepted where the schema says `nullable: true`, unless the field has an
//!   `enum` without `null` (the API server's enum check runs on `null` too); a `null`
//!   object field that is not nullable is dropped, as the API server prunes it (so a
//!   required one is then missing); a `null` array item that is not nullable is refused.
//!   (`kubectl apply` itself drops every field set to `null` before sending the object:
//!   [`crate::parse_manifests`] does the same before calling this module);
//! - `x-kubernetes-int-or-string` accepts an integer or a string; under
//!   `x-kubernetes-preserve-unknown-fields` undeclared fields are kept;
//! - integers are compared with integer bounds as the API server does (a bound is
//!   truncated to an integer for an integer value); string lengths count characters;
//! - schema defaults are not applied: they are valid by construction, so applying them
//!   changes no verdict (a required field with a default is not reported missing).
//!
//! Every message our CRDs can produce was compared with kube-apiserver's by the e2e suite
//! (`e2e/tests/cluster/schema.rs`); those of `anyOf`/`oneOf`/`not`, `multipleOf`,
//! `uniqueItems` and `min/maxProperties`, which our CRDs do not use, follow kube-openapi's
//! source but were not.
//!
//! Not checked: `format` (the spec's formats are `int32`, `int64` and `double`, which the
//! API server does not check either; `date-time` appears only under `status`), the
//! ObjectMeta rules of `metadata` (name syntax, label syntax), and the CEL rules
//! (`crate::validate`).

use std::{collections::BTreeMap, fmt, sync::LazyLock};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use serde_json::Value;

/// The fields of ObjectMeta: what strict decoding accepts under `metadata`.
const OBJECT_META_FIELDS: [&str; 15] = [
    "annotations",
    "creationTimestamp",
    "deletionGracePeriodSeconds",
    "deletionTimestamp",
    "finalizers",
    "generateName",
    "generation",
    "labels",
    "managedFields",
    "name",
    "namespace",
    "ownerReferences",
    "resourceVersion",
    "selfLink",
    "uid",
];

/// The check of the schema that refused a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Check {
    /// A field the schema does not declare (strict field validation).
    UnknownField,
    /// A `required` field is missing.
    Required,
    /// The value is not of the schema's `type`.
    Type,
    /// The value is not one of the schema's `enum`.
    Enum,
    /// Below `minimum`.
    Minimum,
    /// At or below `minimum` with `exclusiveMinimum`.
    ExclusiveMinimum,
    /// Above `maximum`.
    Maximum,
    /// At or above `maximum` with `exclusiveMaximum`.
    ExclusiveMaximum,
    /// Not a multiple of `multipleOf`.
    MultipleOf,
    /// Shorter than `minLength` characters.
    MinLength,
    /// Longer than `maxLength` characters.
    MaxLength,
    /// Does not match `pattern`.
    Pattern,
    /// Fewer than `minItems` items.
    MinItems,
    /// More than `maxItems` items.
    MaxItems,
    /// Repeated items under `uniqueItems`.
    UniqueItems,
    /// Fewer than `minProperties` properties.
    MinProperties,
    /// More than `maxProperties` properties.
    MaxProperties,
    /// Matches none of `anyOf`.
    AnyOf,
    /// Matches none or several of `oneOf`.
    OneOf,
    /// Matches `not`.
    Not,
}

impl Check {
    /// The schema keyword behind the check (`minimum`, `maxLength`, …); `unknownField` for
    /// strict field validation.
    pub fn keyword(self) -> &'static str {
        match self {
            Self::UnknownField => "unknownField",
            Self::Required => "required",
            Self::Type => "type",
            Self::Enum => "enum",
            Self::Minimum => "minimum",
            Self::ExclusiveMinimum => "exclusiveMinimum",
            Self::Maximum => "maximum",
            Self::ExclusiveMaximum => "exclusiveMaximum",
            Self::MultipleOf => "multipleOf",
            Self::MinLength => "minLength",
            Self::MaxLength => "maxLength",
            Self::Pattern => "pattern",
            Self::MinItems => "minItems",
            Self::MaxItems => "maxItems",
            Self::UniqueItems => "uniqueItems",
            Self::MinProperties => "minProperties",
            Self::MaxProperties => "maxProperties",
            Self::AnyOf => "anyOf",
            Self::OneOf => "oneOf",
            Self::Not => "not",
        }
    }
}

/// One field the schema refuses, worded as the API server words it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The field, in the API server's path style: `spec.sources[0].name`.
    pub field: String,
    /// Which check refused it.
    pub check: Check,
    /// What the API server prints after `<field>: `, e.g. `Invalid value: -4:
    /// spec.training.batchSize in body should be greater than or equal to 1`. Empty for
    /// an unknown field.
    pub detail: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.check {
            Check::UnknownField => write!(f, "unknown field {}", go_quote(&self.field)),
            _ => write!(f, "{}: {}", self.field, self.detail),
        }
    }
}

/// Every field of an object that its CRD's schema refuses. Displayed as kubectl shows the
/// API server's answer: `strict decoding error: unknown field "spec.x", …` for unknown
/// fields, otherwise the one error, or one per line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct SchemaErrors(Vec<FieldError>);

impl SchemaErrors {
    /// The errors, in the order of the fields in the object.
    pub fn errors(&self) -> &[FieldError] {
        &self.0
    }

    /// The errors, owned.
    pub fn into_errors(self) -> Vec<FieldError> {
        self.0
    }

    /// Whether these are unknown fields (strict decoding refused the object before any
    /// value was validated).
    pub fn is_strict_decoding(&self) -> bool {
        self.0.iter().all(|e| e.check == Check::UnknownField)
    }

    fn describe(&self) -> String {
        let items: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        if self.is_strict_decoding() {
            format!("strict decoding error: {}", items.join(", "))
        } else if let [one] = items.as_slice() {
            one.clone()
        } else {
            items
                .iter()
                .map(|e| format!("\n* {e}"))
                .collect::<Vec<_>>()
                .concat()
        }
    }
}

/// The structural schema (`openAPIV3Schema`) of each Taper kind, from [`crate::crds`].
static SCHEMAS: LazyLock<BTreeMap<String, JSONSchemaProps>> = LazyLock::new(|| {
    crate::crds()
        .into_iter()
        .filter_map(|crd| {
            let kind = crd.spec.names.kind.clone();
            let version = crd.spec.versions.into_iter().next()?;
            Some((kind, version.schema?.open_api_v3_schema?))
        })
        .collect()
});

/// The structural schema of a Taper kind (`Dataset`, `PretrainJob`, `FinetuneJob`), as
/// the generated CRD holds it.
pub fn schema(kind: &str) -> Option<&'static JSONSchemaProps> {
    SCHEMAS.get(kind)
}

/// Check `object` (a whole manifest, as JSON) against the schema of its `kind`, as the API
/// server does at `kubectl apply`: unknown fields first, then values. A kind Taper does not
/// define is refused at `kind`.
pub fn validate(object: &Value) -> Result<(), SchemaErrors> {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    match schema(kind) {
        Some(schema) => validate_against(schema, object),
        None => Err(SchemaErrors(vec![FieldError {
            field: "kind".into(),
            check: Check::Enum,
            detail: format!(
                "Unsupported value: {}: supported values: {}",
                go_value(&Value::String(kind.into())),
                SCHEMAS
                    .keys()
                    .map(|k| go_quote(k))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }])),
    }
}

/// Check `object` against the resource schema `schema` (an `openAPIV3Schema`): unknown
/// fields (strict decoding) first and alone, then the values of everything but `status`.
pub fn validate_against(schema: &JSONSchemaProps, object: &Value) -> Result<(), SchemaErrors> {
    let mut unknown = Vec::new();
    unknown_fields(
        Some(schema),
        object,
        &mut FieldPath::default(),
        true,
        &mut unknown,
    );
    if !unknown.is_empty() {
        return Err(SchemaErrors(unknown));
    }
    let mut errors = Vec::new();
    let mut created = object.clone();
    if let Some(map) = created.as_object_mut() {
        // The status subresource: the API server drops status at creation.
        map.remove("status");
    }
    Validator {
        errors: &mut errors,
    }
    .check(schema, &created, &mut FieldPath::default());
    if errors.is_empty() {
        Ok(())
    } else {
        Err(SchemaErrors(errors))
    }
}

/// A field path in the API server's style.
#[derive(Clone, Debug, Default)]
struct FieldPath(String);

impl FieldPath {
    fn with_key<T>(&mut self, key: &str, f: impl FnOnce(&mut Self) -> T) -> T {
        let len = self.0.len();
        if !self.0.is_empty() {
            self.0.push('.');
        }
        self.0.push_str(key);
        let out = f(self);
        self.0.truncate(len);
        out
    }

    fn with_index<T>(&mut self, index: usize, f: impl FnOnce(&mut Self) -> T) -> T {
        let len = self.0.len();
        self.0.push_str(&format!("[{index}]"));
        let out = f(self);
        self.0.truncate(len);
        out
    }

    fn child(&self, key: &str) -> String {
        if self.0.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.0)
        }
    }
}

fn is_nullable(s: &JSONSchemaProps) -> bool {
    s.nullable == Some(true)
}

/// The schema of `key` in an object of schema `s`: a property or the map's values.
fn field_schema<'a>(s: &'a JSONSchemaProps, key: &str) -> Option<&'a JSONSchemaProps> {
    s.properties
        .as_ref()
        .and_then(|p| p.get(key))
        .or(match &s.additional_properties {
            Some(JSONSchemaPropsOrBool::Schema(values)) => Some(values),
            _ => None,
        })
}

fn items_schema(s: &JSONSchemaProps) -> Option<&JSONSchemaProps> {
    match &s.items {
        Some(JSONSchemaPropsOrArray::Schema(items)) => Some(items),
        _ => None,
    }
}

fn sorted_keys(map: &serde_json::Map<String, Value>) -> Vec<&String> {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    keys
}

/// Strict decoding: the fields of `value` that schema `s` does not declare, as the API
/// server's pruning finds them (an object where the schema has no properties has only
/// unknown fields; `metadata` is ObjectMeta).
fn unknown_fields(
    s: Option<&JSONSchemaProps>,
    value: &Value,
    path: &mut FieldPath,
    resource_root: bool,
    out: &mut Vec<FieldError>,
) {
    let preserve = s.is_some_and(|s| s.x_kubernetes_preserve_unknown_fields == Some(true));
    match value {
        Value::Object(map) => {
            let keys = sorted_keys(map);
            let embedded = s.is_some_and(|s| s.x_kubernetes_embedded_resource == Some(true));
            if (resource_root || embedded)
                && let Some(Value::Object(meta)) = map.get("metadata")
            {
                path.with_key("metadata", |path| {
                    for key in sorted_keys(meta) {
                        if !OBJECT_META_FIELDS.contains(&key.as_str()) {
                            out.push(unknown(path.child(key)));
                        }
                    }
                });
            }
            for key in keys {
                if (resource_root || embedded)
                    && matches!(key.as_str(), "apiVersion" | "kind" | "metadata")
                {
                    continue;
                }
                match s.and_then(|s| field_schema(s, key)) {
                    Some(sub) => path.with_key(key, |path| {
                        unknown_fields(Some(sub), &map[key.as_str()], path, false, out)
                    }),
                    None if preserve => {}
                    None if s.is_some_and(|s| {
                        matches!(
                            s.additional_properties,
                            Some(JSONSchemaPropsOrBool::Bool(true))
                        )
                    }) => {}
                    None => out.push(unknown(path.child(key))),
                }
            }
        }
        Value::Array(items) => {
            let sub = s.and_then(items_schema);
            if preserve && sub.is_none() {
                return;
            }
            for (i, item) in items.iter().enumerate() {
                path.with_index(i, |path| unknown_fields(sub, item, path, false, out));
            }
        }
        _ => {}
    }
}

fn unknown(field: String) -> FieldError {
    FieldError {
        field,
        check: Check::UnknownField,
        detail: String::new(),
    }
}

/// The JSON type of a value as the API server names it after decoding (integers are
/// `integer`, other numbers `number`).
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A number as the API server holds it after decoding JSON: an int64 or a float64.
#[derive(Clone, Copy, Debug)]
enum Num {
    Int(i64),
    Float(f64),
}

fn num(n: &serde_json::Number) -> Num {
    match n.as_i64() {
        Some(i) => Num::Int(i),
        None => Num::Float(n.as_f64().unwrap_or(f64::NAN)),
    }
}

struct Validator<'e> {
    errors: &'e mut Vec<FieldError>,
}

impl Validator<'_> {
    fn push(&mut self, field: &str, check: Check, detail: String) {
        self.errors.push(FieldError {
            field: field.to_string(),
            check,
            detail,
        });
    }

    /// `Invalid value: <value>: <field> in body <what>`, the API server's generic form.
    fn invalid(&mut self, field: &str, check: Check, value: &str, what: String) {
        self.push(
            field,
            check,
            format!("Invalid value: {value}: {field} in body {what}"),
        );
    }

    /// Whether `value` passes `s` (for `anyOf`, `oneOf`, `not`), without reporting.
    fn passes(s: &JSONSchemaProps, value: &Value, path: &mut FieldPath) -> bool {
        let mut errors = Vec::new();
        Validator {
            errors: &mut errors,
        }
        .check(s, value, path);
        errors.is_empty()
    }

    /// Validate `value` against `s`, in kube-openapi's order: type, anyOf/allOf/oneOf/not,
    /// string, number, array, enum, object.
    fn check(&mut self, s: &JSONSchemaProps, value: &Value, path: &mut FieldPath) {
        let field = path.0.clone();
        let types: Vec<&str> = if s.x_kubernetes_int_or_string == Some(true) {
            vec!["integer", "string"]
        } else {
            s.type_.as_deref().into_iter().collect()
        };
        if value.is_null() {
            if !is_nullable(s) && !types.is_empty() {
                self.type_error(&field, &types, "null");
            }
            self.check_enum(s, value, &field);
            return;
        }
        let actual = type_name(value);
        let float_int = matches!(value, Value::Number(n) if !n.is_i64()
            && n.as_f64().is_some_and(|f| f.fract() == 0.0));
        let type_fits = types.is_empty()
            || types.contains(&actual)
            || (actual == "number" && float_int && types.contains(&"integer"))
            || (actual == "integer" && types.contains(&"number"));
        if !type_fits {
            self.type_error(&field, &types, actual);
        }
        self.check_combinators(s, value, path);
        match value {
            Value::String(text) => self.check_string(s, text, &field),
            Value::Number(n) => self.check_number(s, num(n), &field),
            Value::Array(items) => self.check_array(s, items, path),
            _ => {}
        }
        self.check_enum(s, value, &field);
        if let Value::Object(map) = value {
            self.check_object(s, map, path);
        }
    }

    fn type_error(&mut self, field: &str, types: &[&str], actual: &str) {
        let actual = go_quote(actual);
        self.push(
            field,
            Check::Type,
            format!(
                "Invalid value: {actual}: {field} in body must be of type {}: {actual}",
                types.join(",")
            ),
        );
    }

    fn check_combinators(&mut self, s: &JSONSchemaProps, value: &Value, path: &mut FieldPath) {
        let field = path.0.clone();
        for sub in s.all_of.iter().flatten() {
            self.check(sub, value, path);
        }
        if let Some(any) = s.any_of.as_ref().filter(|a| !a.is_empty())
            && !any.iter().any(|sub| Self::passes(sub, value, path))
        {
            self.invalid(
                &field,
                Check::AnyOf,
                "\"\"",
                "must validate at least one schema (anyOf)".into(),
            );
            // The reasons the first alternative gives, as the API server lists them.
            self.check(&any[0], value, path);
        }
        if let Some(one) = s.one_of.as_ref().filter(|o| !o.is_empty()) {
            let passing = one
                .iter()
                .filter(|sub| Self::passes(sub, value, path))
                .count();
            if passing != 1 {
                self.invalid(
                    &field,
                    Check::OneOf,
                    "\"\"",
                    "must validate one and only one schema (oneOf)".into(),
                );
            }
        }
        if let Some(not) = &s.not
            && Self::passes(not, value, path)
        {
            self.invalid(
                &field,
                Check::Not,
                "\"\"",
                "must not validate the schema (not)".into(),
            );
        }
    }

    fn check_string(&mut self, s: &JSONSchemaProps, text: &str, field: &str) {
        let chars = i64::try_from(text.chars().count()).unwrap_or(i64::MAX);
        let quoted = go_quote(text);
        if let Some(min) = s.min_length
            && chars < min
        {
            self.invalid(
                field,
                Check::MinLength,
                &quoted,
                format!("should be at least {min} chars long"),
            );
        }
        if let Some(max) = s.max_length
            && chars > max
        {
            self.push(
                field,
                Check::MaxLength,
                format!(
                    "Too long: may not be more than {max} {}",
                    if max == 1 { "byte" } else { "bytes" }
                ),
            );
        }
        if let Some(pattern) = &s.pattern {
            match regex::Regex::new(pattern) {
                Ok(re) if re.is_match(text) => {}
                Ok(_) => self.invalid(
                    field,
                    Check::Pattern,
                    &quoted,
                    format!("should match '{pattern}'"),
                ),
                Err(e) => self.invalid(
                    field,
                    Check::Pattern,
                    &quoted,
                    format!("should match '{pattern}, but pattern is invalid: {e}'"),
                ),
            }
        }
    }

    fn check_number(&mut self, s: &JSONSchemaProps, n: Num, field: &str) {
        let shown = match n {
            Num::Int(i) => i.to_string(),
            Num::Float(f) => go_float(f),
        };
        if let Some(factor) = s.multiple_of {
            let ok = match n {
                // Go converts the factor to int64 for an integer value.
                Num::Int(i) => {
                    let k = factor as i64;
                    k == 0 || i % k == 0
                }
                Num::Float(f) => {
                    let m = if factor < 1.0 {
                        1.0 / factor * f
                    } else {
                        f / factor
                    };
                    m.fract() == 0.0
                }
            };
            if !ok {
                let factor = match n {
                    Num::Int(_) => (factor as i64).to_string(),
                    Num::Float(_) => go_float(factor),
                };
                self.invalid(
                    field,
                    Check::MultipleOf,
                    &shown,
                    format!("should be a multiple of {factor}"),
                );
            }
        }
        if let Some(max) = s.maximum {
            let exclusive = s.exclusive_maximum == Some(true);
            // An integer value meets an integer bound: Go's int64(max) truncates.
            let (over, bound) = match n {
                Num::Int(i) => {
                    let m = max as i64;
                    (if exclusive { i >= m } else { i > m }, m.to_string())
                }
                Num::Float(f) => (if exclusive { f >= max } else { f > max }, go_float(max)),
            };
            if over {
                let (check, what) = if exclusive {
                    (Check::ExclusiveMaximum, "less than")
                } else {
                    (Check::Maximum, "less than or equal to")
                };
                self.invalid(field, check, &shown, format!("should be {what} {bound}"));
            }
        }
        if let Some(min) = s.minimum {
            let exclusive = s.exclusive_minimum == Some(true);
            let (under, bound) = match n {
                Num::Int(i) => {
                    let m = min as i64;
                    (if exclusive { i <= m } else { i < m }, m.to_string())
                }
                Num::Float(f) => (if exclusive { f <= min } else { f < min }, go_float(min)),
            };
            if under {
                let (check, what) = if exclusive {
                    (Check::ExclusiveMinimum, "greater than")
                } else {
                    (Check::Minimum, "greater than or equal to")
                };
                self.invalid(field, check, &shown, format!("should be {what} {bound}"));
            }
        }
    }

    fn check_array(&mut self, s: &JSONSchemaProps, items: &[Value], path: &mut FieldPath) {
        let field = path.0.clone();
        if let Some(item_schema) = items_schema(s) {
            for (i, item) in items.iter().enumerate() {
                path.with_index(i, |path| self.check(item_schema, item, path));
            }
        }
        let len = i64::try_from(items.len()).unwrap_or(i64::MAX);
        if let Some(min) = s.min_items
            && len < min
        {
            self.invalid(
                &field,
                Check::MinItems,
                &len.to_string(),
                format!("should have at least {min} items"),
            );
        }
        if let Some(max) = s.max_items
            && len > max
        {
            self.push(
                &field,
                Check::MaxItems,
                format!(
                    "Too many: {len}: must have at most {max} {}",
                    if max == 1 { "item" } else { "items" }
                ),
            );
        }
        if s.unique_items == Some(true)
            && items
                .iter()
                .enumerate()
                .any(|(i, a)| items[..i].iter().any(|b| json_eq(a, b)))
        {
            self.invalid(
                &field,
                Check::UniqueItems,
                "\"\"",
                "shouldn't contain duplicates".into(),
            );
        }
    }

    fn check_enum(&mut self, s: &JSONSchemaProps, value: &Value, field: &str) {
        let Some(allowed) = s.enum_.as_ref().filter(|e| !e.is_empty()) else {
            return;
        };
        if allowed.iter().any(|a| json_eq(value, &a.0)) {
            return;
        }
        let supported: Vec<String> = allowed
            .iter()
            .map(|a| match &a.0 {
                Value::String(text) => go_quote(text),
                other => go_quote(&other.to_string()),
            })
            .collect();
        self.push(
            field,
            Check::Enum,
            format!(
                "Unsupported value: {}: supported values: {}",
                go_value(value),
                supported.join(", ")
            ),
        );
    }

    fn check_object(
        &mut self,
        s: &JSONSchemaProps,
        map: &serde_json::Map<String, Value>,
        path: &mut FieldPath,
    ) {
        let field = path.0.clone();
        let len = i64::try_from(map.len()).unwrap_or(i64::MAX);
        if let Some(min) = s.min_properties
            && len < min
        {
            self.invalid(
                &field,
                Check::MinProperties,
                &len.to_string(),
                format!("should have at least {min} properties"),
            );
            return;
        }
        if let Some(max) = s.max_properties
            && len > max
        {
            self.push(
                &field,
                Check::MaxProperties,
                format!(
                    "Too many: {len}: must have at most {max} {}",
                    if max == 1 { "item" } else { "items" }
                ),
            );
            return;
        }
        let properties = s.properties.as_ref();
        for key in sorted_keys(map) {
            let value = &map[key.as_str()];
            let sub =
                properties
                    .and_then(|p| p.get(key.as_str()))
                    .or(match &s.additional_properties {
                        Some(JSONSchemaPropsOrBool::Schema(values)) => Some(values),
                        _ => None,
                    });
            let Some(sub) = sub else { continue };
            // The API server prunes the nulls of fields that are not nullable.
            if value.is_null() && !is_nullable(sub) {
                continue;
            }
            path.with_key(key, |path| self.check(sub, value, path));
        }
        for key in s.required.iter().flatten() {
            let present = map.get(key.as_str()).is_some_and(|v| {
                !v.is_null()
                    || properties
                        .and_then(|p| p.get(key.as_str()))
                        .is_some_and(is_nullable)
            });
            let defaulted = properties
                .and_then(|p| p.get(key.as_str()))
                .is_some_and(|p| p.default.is_some());
            if !present && !defaulted {
                self.push(&path.child(key), Check::Required, "Required value".into());
            }
        }
    }
}

/// JSON equality with numbers compared by value (`1` equals `1.0`), as Go's enum check
/// converts types before comparing.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x == y || x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// A string as Go's `%q` writes it (close enough: JSON escaping).
fn go_quote(text: &str) -> String {
    Value::String(text.to_string()).to_string()
}

/// A value as the API server prints a bad value: numbers and booleans bare, strings
/// quoted, `null`, anything else as JSON.
fn go_value(v: &Value) -> String {
    match v {
        Value::Number(n) => match num(n) {
            Num::Int(i) => i.to_string(),
            Num::Float(f) => go_float(f),
        },
        Value::String(text) => go_quote(text),
        other => other.to_string(),
    }
}

/// A float64 as Go's `%v` writes it: the shortest digits that round-trip, in exponent
/// form (`1e+06`, `6e-05`) when the decimal exponent is below -4 or at least 6.
fn go_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
    }
    if f == 0.0 {
        return "0".into();
    }
    // `{:e}` gives the shortest round-tripping digits: `1.048576e6`, `-5e-1`.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..6).contains(&exp) {
        format!("{f}")
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::json;

    use super::*;

    fn pretrain(spec_changes: Value) -> Value {
        let mut v = json!({
            "apiVersion": "taper.dev/v1alpha1",
            "kind": "PretrainJob",
            "metadata": {"name": "p"},
            "spec": {"datasetRef": {"name": "d"}, "model": {"preset": "tiny"}},
        });
        if let (Some(spec), Value::Object(changes)) = (v["spec"].as_object_mut(), spec_changes) {
            spec.extend(changes);
        }
        v
    }

    fn messages(v: &Value) -> Vec<String> {
        match validate(v) {
            Ok(()) => Vec::new(),
            Err(e) => e.errors().iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn a_valid_object_passes() {
        assert_eq!(messages(&pretrain(json!({}))), Vec::<String>::new());
    }

    #[test]
    fn bounds_are_worded_as_the_api_server_words_them() {
        let v = pretrain(json!({
            "training": {"batchSize": -4, "betas": [0.1, 0.2, 0.3], "seed": "x"},
            "resources": {"gpus": -1, "cpu": true, "gpuResourceName": "a".repeat(254)},
            "model": {"preset": "huge", "nHead": 1.5},
            "image": "",
        }));
        let got = messages(&v);
        for want in [
            "spec.training.batchSize: Invalid value: -4: spec.training.batchSize in body should be greater than or equal to 1",
            "spec.training.betas: Too many: 3: must have at most 2 items",
            "spec.training.seed: Invalid value: \"string\": spec.training.seed in body must be of type integer: \"string\"",
            "spec.resources.gpus: Invalid value: -1: spec.resources.gpus in body should be greater than or equal to 0",
            "spec.resources.cpu: Invalid value: \"boolean\": spec.resources.cpu in body must be of type integer,string: \"boolean\"",
            "spec.resources.gpuResourceName: Too long: may not be more than 253 bytes",
            "spec.model.preset: Unsupported value: \"huge\": supported values: \"tiny\", \"mini\", \"baby\", \"gpt2-small\", \"gpt2-medium\", \"gpt2-large\", \"gpt2-xl\"",
            "spec.model.nHead: Invalid value: \"number\": spec.model.nHead in body must be of type integer: \"number\"",
            "spec.image: Invalid value: \"\": spec.image in body should be at least 1 chars long",
        ] {
            assert!(
                got.contains(&want.to_string()),
                "missing {want:?} in {got:#?}"
            );
        }
        assert_eq!(got.len(), 9, "{got:#?}");
    }

    #[test]
    fn unknown_fields_refuse_alone_with_the_api_server_paths() {
        let mut v = pretrain(json!({
            "training": {"batchSize": -4},
            "datasetRef": {"name": "d", "zz": 1},
            "resources": {"tolerations": [{"key": "a", "q": 1}]},
        }));
        v["metadata"]["foo"] = json!(1);
        v["bar"] = json!(2);
        v["status"] = json!({"phase": "Bogus", "zz": 1});
        let err = validate(&v).expect_err("unknown fields");
        assert!(err.is_strict_decoding());
        assert_eq!(
            err.to_string(),
            "strict decoding error: unknown field \"metadata.foo\", unknown field \"bar\", \
             unknown field \"spec.datasetRef.zz\", unknown field \"spec.resources.tolerations[0].q\", \
             unknown field \"status.zz\""
        );
    }

    #[test]
    fn status_is_not_validated_at_creation() {
        let mut v = pretrain(json!({}));
        v["status"] = json!({"phase": "Bogus", "restarts": "many"});
        assert_eq!(messages(&v), Vec::<String>::new());
    }

    #[test]
    fn nulls_follow_nullable() {
        // Nullable: accepted. Not nullable: pruned (then defaulted, or missing).
        let v = pretrain(json!({
            "training": {"learningRate": null, "betas": null},
            "checkpoints": {"keep": null},
            "suspend": null,
            "resources": {"nodeSelector": {"a": null}, "tolerations": [{"key": null}]},
        }));
        assert_eq!(messages(&v), Vec::<String>::new());
        // Nullable with an enum: the enum check still runs, on null.
        let v = pretrain(json!({"training": {"precision": null}}));
        assert_eq!(
            messages(&v),
            [
                "spec.training.precision: Unsupported value: null: supported values: \"bf16\", \"f32\""
            ]
        );
        let v = pretrain(json!({"datasetRef": {"name": null}}));
        assert_eq!(messages(&v), ["spec.datasetRef.name: Required value"]);
        let v = pretrain(json!({"training": {"betas": [null, 0.5]}}));
        assert_eq!(
            messages(&v),
            [
                "spec.training.betas[0]: Invalid value: \"null\": spec.training.betas[0] in body must be of type number: \"null\""
            ]
        );
    }

    #[test]
    fn required_fields_and_array_paths() {
        let v = json!({
            "apiVersion": "taper.dev/v1alpha1", "kind": "Dataset", "metadata": {"name": "d"},
            "spec": {
                "format": 7,
                "cleaning": {"disable": ["bogus"], "maxWords": 0},
                "sources": [
                    {"uri": "s3://a/b", "format": "text"},
                    {"name": "é".repeat(63), "uri": "s3://a/b", "format": "text", "quality": {"field": "x"}},
                ],
            },
        });
        let got = messages(&v);
        for want in [
            "spec.format: Invalid value: \"integer\": spec.format in body must be of type string: \"integer\"",
            "spec.format: Unsupported value: 7: supported values: \"pretraining\", \"instruction\"",
            "spec.sources[0].name: Required value",
            "spec.sources[1].quality.minimum: Required value",
            "spec.cleaning.maxWords: Invalid value: 0: spec.cleaning.maxWords in body should be greater than or equal to 1",
        ] {
            assert!(
                got.contains(&want.to_string()),
                "missing {want:?} in {got:#?}"
            );
        }
        assert_eq!(got.len(), 6, "{got:#?}");
        let no_spec = json!({"apiVersion": "taper.dev/v1alpha1", "kind": "Dataset", "metadata": {"name": "d"}});
        assert_eq!(messages(&no_spec), ["spec: Required value"]);
        let empty = json!({"apiVersion": "taper.dev/v1alpha1", "kind": "Dataset", "metadata": {"name": "d"}, "spec": {"sources": []}});
        assert_eq!(
            messages(&empty),
            ["spec.sources: Invalid value: 0: spec.sources in body should have at least 1 items"]
        );
    }

    #[test]
    fn keywords_absent_from_our_crds_are_checked_too() {
        let s: JSONSchemaProps = serde_json::from_value(json!({
            "type": "object",
            "properties": {
                "ratio": {"type": "number", "minimum": 0.0, "exclusiveMinimum": true, "maximum": 1.0, "exclusiveMaximum": true},
                "step": {"type": "integer", "multipleOf": 8.0},
                "id": {"type": "string", "pattern": "^[a-z]+$"},
                "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": true},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}, "minProperties": 1},
                "either": {"anyOf": [{"minimum": 10.0}, {"maximum": 0.0}], "type": "integer"},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
            },
        }))
        .expect("schema");
        let v = json!({
            "ratio": 1, "step": 12, "id": "Abc", "tags": ["a", "a"], "labels": {},
            "either": 5, "free": {"anything": {"goes": 1}},
        });
        let err = validate_against(&s, &v).expect_err("invalid");
        let checks: BTreeSet<Check> = err.errors().iter().map(|e| e.check).collect();
        assert_eq!(
            checks,
            BTreeSet::from([
                Check::ExclusiveMaximum,
                Check::MultipleOf,
                Check::Pattern,
                Check::UniqueItems,
                Check::MinProperties,
                Check::AnyOf,
                Check::Minimum,
            ]),
            "{err}"
        );
        let ok = json!({"ratio": 0.5, "step": 16, "id": "abc", "tags": ["a"], "labels": {"a": "b"}, "either": 11});
        assert_eq!(validate_against(&s, &ok), Ok(()));
        let zero = json!({"ratio": 0});
        assert_eq!(
            validate_against(&s, &zero).map_err(|e| e.to_string()),
            Err("ratio: Invalid value: 0: ratio in body should be greater than 0".into())
        );
    }

    #[test]
    fn floats_print_as_go_prints_them() {
        assert_eq!(go_float(1.0), "1");
        assert_eq!(go_float(0.5), "0.5");
        assert_eq!(go_float(-4.0), "-4");
        assert_eq!(go_float(65536.0), "65536");
        assert_eq!(go_float(1_048_576.0), "1.048576e+06");
        assert_eq!(go_float(1e-7), "1e-07");
        assert_eq!(go_float(0.0001), "0.0001");
        assert_eq!(go_float(6e-5), "6e-05");
    }

    #[test]
    fn other_kinds_are_refused_at_kind() {
        let err = validate(&json!({"apiVersion": "v1", "kind": "Pod"})).expect_err("not ours");
        assert_eq!(err.errors()[0].field, "kind");
    }
}
