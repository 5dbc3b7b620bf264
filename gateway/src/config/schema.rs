//! A route's request body schema: a JSON Schema file the routes file names
//! (`request_schema = "schemas/orders.json"`), read and compiled once at start. The gateway checks
//! every body of the route against it before anything is written, and declares it in the OpenAPI
//! document, so that client generators make a typed body.
//!
//! The dialect is the file's `$schema` (JSON Schema 2020-12 when absent, the dialect of OpenAPI
//! 3.1, <https://spec.openapis.org/oas/v3.1.0#schema-object>). References resolve inside the file
//! only (`#/$defs/...`): nothing is fetched.

use std::path::Path;
use std::sync::Arc;

use super::error::{ConfigError, invalid};

/// Most violations one refusal lists (a body can break a schema in many places at once).
pub const MAX_VIOLATIONS: usize = 20;

/// A compiled body schema and the document it came from.
#[derive(Clone)]
pub struct BodySchema {
    document: Arc<serde_json::Value>,
    validator: Arc<jsonschema::Validator>,
}

impl std::fmt::Debug for BodySchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodySchema")
            .field("document", &self.document)
            .finish_non_exhaustive()
    }
}

/// Why a body does not meet its route's schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// The body is not JSON at all (or not UTF-8).
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    /// The body is JSON that breaks the schema: where (a JSON Pointer, RFC 6901) and why.
    #[error("the body does not match the route's schema ({} violations)", .0.len())]
    Violations(Vec<Violation>),
}

/// One place a body breaks its schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// JSON Pointer (RFC 6901) into the body; empty for the whole body.
    pub pointer: String,
    pub detail: String,
}

impl BodySchema {
    /// Reads and compiles `path`. Errors name the file and what is wrong with it: unreadable, not
    /// JSON, not a schema, or a reference outside the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let document: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| invalid(format!("{}: not JSON: {e}", path.display())))?;
        Self::compile(document).map_err(|e| invalid(format!("{}: {e}", path.display())))
    }

    /// Compiles a schema document: self-contained (references are JSON Pointers into the file,
    /// `#` or `#/...`; no `$id`, anchors or dynamic references, which would change what a
    /// reference means once the schema sits inside the OpenAPI document), with `$defs` named by
    /// letters, digits, `-` and `_` (they become OpenAPI component names).
    pub fn compile(document: serde_json::Value) -> Result<Self, String> {
        if !matches!(
            document,
            serde_json::Value::Object(_) | serde_json::Value::Bool(_)
        ) {
            return Err("a JSON Schema is an object (or true/false)".to_owned());
        }
        self_contained(&document)?;
        for key in ["$defs", "definitions"] {
            if let Some(serde_json::Value::Object(defs)) = document.get(key)
                && let Some(bad) = defs.keys().find(|name| {
                    name.is_empty()
                        || !name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                })
            {
                return Err(format!(
                    "{key} name {bad:?}: use letters, digits, '-' and '_' (it names an OpenAPI component)"
                ));
            }
        }
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&document)
            .map_err(|e| format!("not a usable JSON Schema: {e}"))?;
        Ok(Self {
            document: Arc::new(document),
            validator: Arc::new(validator),
        })
    }

    /// The schema as the file has it.
    pub fn document(&self) -> &serde_json::Value {
        &self.document
    }

    /// Checks a body: JSON that meets the schema, or the first [`MAX_VIOLATIONS`] places it
    /// does not.
    pub fn check(&self, body: &[u8]) -> Result<(), BodyError> {
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| BodyError::NotJson(e.to_string()))?;
        let violations: Vec<Violation> = self
            .validator
            .iter_errors(&value)
            .take(MAX_VIOLATIONS)
            .map(|error| Violation {
                pointer: error.instance_path().to_string(),
                detail: error.to_string(),
            })
            .collect();
        if violations.is_empty() {
            Ok(())
        } else {
            Err(BodyError::Violations(violations))
        }
    }
}

/// Refuses what would make the schema mean something else inside another document.
fn self_contained(value: &serde_json::Value) -> Result<(), String> {
    match value {
        serde_json::Value::Object(object) => {
            for (key, child) in object {
                match (key.as_str(), child) {
                    ("$ref", serde_json::Value::String(target))
                        if target != "#" && !target.starts_with("#/") =>
                    {
                        return Err(format!(
                            "$ref {target:?}: only references into this file (`#/$defs/...`) are read"
                        ));
                    }
                    (
                        "$id" | "$anchor" | "$dynamicAnchor" | "$dynamicRef" | "$recursiveRef",
                        serde_json::Value::String(_),
                    ) => {
                        return Err(format!(
                            "{key}: a route's schema is self-contained; refer to its parts by JSON Pointer (`#/$defs/...`)"
                        ));
                    }
                    _ => self_contained(child)?,
                }
            }
            Ok(())
        }
        serde_json::Value::Array(items) => items.iter().try_for_each(self_contained),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order_schema() -> BodySchema {
        BodySchema::compile(serde_json::json!({
            "type": "object",
            "required": ["item"],
            "properties": {
                "item": { "type": "string", "minLength": 1 },
                "qty": { "$ref": "#/$defs/quantity" }
            },
            "$defs": { "quantity": { "type": "integer", "minimum": 1 } }
        }))
        .unwrap()
    }

    #[test]
    fn a_body_is_json_that_meets_the_schema() {
        let schema = order_schema();
        assert_eq!(schema.check(br#"{"item":"book","qty":2}"#), Ok(()));
        assert!(matches!(
            schema.check(b"{not json"),
            Err(BodyError::NotJson(_))
        ));
        let Err(BodyError::Violations(found)) = schema.check(br#"{"qty":0}"#) else {
            panic!("violations expected");
        };
        let pointers: Vec<&str> = found.iter().map(|v| v.pointer.as_str()).collect();
        assert!(pointers.contains(&""), "the missing item: {found:?}");
        assert!(
            pointers.contains(&"/qty"),
            "the quantity below 1: {found:?}"
        );
    }

    #[test]
    fn what_is_not_a_schema_is_refused() {
        assert!(BodySchema::compile(serde_json::json!([1])).is_err());
        assert!(BodySchema::compile(serde_json::json!({"type": "no-such-type"})).is_err());
        // Nothing is fetched: a reference outside the file cannot be resolved.
        let remote = serde_json::json!({"$ref": "https://example.com/schema.json"});
        assert!(BodySchema::compile(remote).is_err());
        // What would change meaning inside the OpenAPI document.
        for unusable in [
            serde_json::json!({"$id": "https://example.com/order", "type": "object"}),
            serde_json::json!({"items": {"$ref": "#item"}, "$defs": {"x": {"$anchor": "item"}}}),
            serde_json::json!({"$defs": {"a/b": {}}}),
            serde_json::json!({"$defs": {"my def": {}}}),
        ] {
            assert!(BodySchema::compile(unusable.clone()).is_err(), "{unusable}");
        }
        // A property may be called "$id": it is a name there, not the keyword.
        let named = serde_json::json!({"properties": {"$id": {"type": "string"}}});
        assert!(BodySchema::compile(named).is_ok());
    }
}
