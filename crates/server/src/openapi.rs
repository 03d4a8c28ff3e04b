//! `GET /openapi.json`: an OpenAPI 3.1 document of what this server answers.
//!
//! Policy:
//! - The host describes its own routes. Each tenant's routes are described by its plugin's
//!   optional `describe` (see the WIT), whose `paths` are relative to each route ("/" is the route
//!   itself); a plugin that describes nothing still has its routes listed.
//! - A plugin's schemas are renamed `<tenant>.<name>` (its `$ref`s with them), so tenants on
//!   different plugins cannot collide.
//! - A tenant with keys has its operations marked with the bearer scheme.
//! - Paths only: a route bound to a host name is listed by its path, under `x-batchbox-host`.
//! - Under every tenant route, the host's own `<route>/info` (keyed like the tenant) and
//!   `<route>/health` (public) are listed beside the plugin's paths (`tenant_info`).

use serde_json::{Map, Value, json};

use batchbox_plugins::PluginRuntime;
use batchbox_tenants::Tenants;

const SCHEMA_REFS: &str = "#/components/schemas/";

/// The document for `tenants` served by `plugins`; `metrics`: whether `/metrics` is on this address.
pub(crate) fn document(tenants: &Tenants, plugins: &PluginRuntime, metrics: bool) -> Value {
    let mut paths = host_paths(metrics);
    let mut schemas = Map::from_iter([("Error".to_owned(), error_schema())]);
    for tenant in tenants.iter() {
        let prefix = schema_prefix(&tenant.name);
        let fragment = plugins.description(&tenant.name).map(|f| renamed(f, &prefix));
        if let Some(own) = fragment.as_ref().and_then(|f| f["components"]["schemas"].as_object()) {
            schemas.extend(own.iter().map(|(name, schema)| (format!("{prefix}{name}"), schema.clone())));
        }
        for route in &tenant.routes {
            let items: Vec<(String, Value)> = match fragment.as_ref().and_then(|f| f["paths"].as_object()) {
                Some(own) => own.iter().map(|(below, item)| (join(&route.path, below), item.clone())).collect(),
                None => vec![(
                    route.path.clone(),
                    json!({ "description": format!("Tenant {}'s plugin, which describes no API.", tenant.name) }),
                )],
            };
            let host_pages = crate::tenant_info::described(&route.path)
                .into_iter()
                .map(|(path, item, keyed)| (path, item, keyed && !tenant.is_public()));
            let plugin_paths = items.into_iter().map(|(path, item)| (path, item, !tenant.is_public()));
            for (path, mut item, keyed) in host_pages.chain(plugin_paths) {
                mark(&mut item, &tenant.name, keyed, route.host.as_deref());
                paths.entry(path).or_insert(item);
            }
        }
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "batchbox",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Batched transformer inference; each tenant's routes are handled by its sandboxed plugin.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
        },
    })
}

/// The host's own routes, which need no key.
fn host_paths(metrics: bool) -> Map<String, Value> {
    let get = |summary: &str, content: Value| {
        json!({ "get": { "summary": summary, "responses": {
            "200": { "description": "OK", "content": content },
            "503": error_response("Still loading (with Retry-After)"),
        } } })
    };
    let json_object = json!({ "application/json": { "schema": { "type": "object" } } });
    let mut paths = Map::new();
    paths.insert("/health".into(), get("Liveness: 200 as soon as the process listens", json_object.clone()));
    paths.insert("/ready".into(), get("Readiness: 200 once every model and plugin is loaded", json_object.clone()));
    paths.insert("/v1/models".into(), get("The models: what each is, how it runs, its counters", json_object.clone()));
    paths.insert("/openapi.json".into(), get("This document", json_object));
    if metrics {
        let text = json!({ "text/plain": { "schema": { "type": "string" } } });
        paths.insert("/metrics".into(), get("Metrics in the Prometheus text format", text));
    }
    paths
}

/// The host's error body, which every SDK writes too.
fn error_schema() -> Value {
    json!({
        "type": "object",
        "required": ["error"],
        "properties": { "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": { "type": "string" },
                "message": { "type": "string" },
                "quota": { "type": "string", "description": "With 429 quota_exceeded: which quota." },
            },
        } },
    })
}

fn error_response(description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

/// `<tenant>.`, with what a component name may not hold (`^[a-zA-Z0-9._-]+$`) as `_`.
fn schema_prefix(tenant: &str) -> String {
    let safe: String =
        tenant.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    format!("{safe}.")
}

/// `fragment` with every `$ref` to one of its schemas pointing at the renamed one.
fn renamed(fragment: &Value, prefix: &str) -> Value {
    match fragment {
        Value::Array(items) => Value::Array(items.iter().map(|v| renamed(v, prefix)).collect()),
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(key, value)| match (key.as_str(), value.as_str().and_then(|r| r.strip_prefix(SCHEMA_REFS))) {
                    ("$ref", Some(name)) => (key.clone(), Value::String(format!("{SCHEMA_REFS}{prefix}{name}"))),
                    _ => (key.clone(), renamed(value, prefix)),
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

/// A route's path and a path below it ("/" is the route itself).
fn join(route: &str, below: &str) -> String {
    match (route.trim_end_matches('/'), below) {
        ("", "/") => "/".into(),
        (route, "/") => route.into(),
        (route, below) => format!("{route}{below}"),
    }
}

/// Tags each operation of a path item with its tenant, the bearer scheme if it has keys, and the
/// host name its route is bound to.
fn mark(item: &mut Value, tenant: &str, keyed: bool, host: Option<&str>) {
    const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];
    if let Some(host) = host {
        item["x-batchbox-host"] = host.into();
    }
    for method in METHODS {
        if let Some(operation) = item.get_mut(method).and_then(Value::as_object_mut) {
            operation.insert("tags".into(), json!([tenant]));
            if keyed {
                operation.insert("security".into(), json!([{ "bearer": [] }]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugins_refs_follow_its_renamed_schemas_and_paths_hang_below_each_route() {
        let fragment = json!({ "paths": { "/": { "post": { "requestBody": { "content": { "application/json": {
            "schema": { "$ref": "#/components/schemas/Body" } } } } } } } });
        let renamed = renamed(&fragment, &schema_prefix("team a"));
        let body = &renamed["paths"]["/"]["post"]["requestBody"]["content"]["application/json"]["schema"];
        assert_eq!(body["$ref"], "#/components/schemas/team_a.Body");
        assert_eq!(join("/api/v1/x", "/"), "/api/v1/x");
        assert_eq!(join("/api/v1/x", "/batch"), "/api/v1/x/batch");
        assert_eq!(join("/", "/"), "/");
        assert_eq!(join("/", "/y"), "/y");
    }
}
