//! `GET <route>/info` and `GET <route>/health` under every tenant's route: what the Hugging Face
//! and TEI clients ask an endpoint before they call it (`InferenceClient(base_url=<route>)`'s
//! `get_endpoint_info` and `health_check`), answered by the host for every tenant, whatever its
//! plugin, so a plugin never sees these two paths.
//!
//! Policy:
//! - `/health` is public, as the host's own `/health` is (TEI's too): 200 `{"status": "ok"}`
//!   while the tenant's config is loaded. It says nothing a key would protect.
//! - `/info` needs the tenant's key, as its route does: it names the model and its labels.
//!   Its shape is TEI's `Info` (`model_id`, `model_type.classifier.id2label`, `max_input_length`,
//!   `max_batch_tokens`, ...) with batchbox's own figures beside (`task`, `activation`,
//!   `precision`); never a key or a key's hash.

use serde_json::{Value, json};

use batchbox_model::Task;
use batchbox_tenants::Tenant;

use crate::Loaded;

/// Which of the two pages `path` is, if it is one directly under `route` (the tenant's route
/// that matched it, by its path).
pub(crate) fn endpoint(route: &str, path: &str) -> Option<&'static str> {
    let (prefix, page) = ["/info", "/health"].into_iter().find_map(|page| Some((path.strip_suffix(page)?, page)))?;
    let prefix = if prefix.is_empty() { "/" } else { prefix };
    (prefix == route).then_some(page)
}

/// TEI's `GET /info` for the model behind `tenant`'s routes.
pub(crate) fn info(loaded: &Loaded, tenant: &Tenant) -> Option<Value> {
    let model_name = &tenant.model;
    let model = &loaded.models.iter().find(|(name, _)| name == model_name)?.1;
    let info = model.info();
    let m = &info.manifest;
    let id2label: serde_json::Map<String, Value> =
        m.labels.iter().enumerate().map(|(i, label)| (i.to_string(), label.clone().into())).collect();
    let label2id: serde_json::Map<String, Value> =
        m.labels.iter().enumerate().map(|(i, label)| (label.clone(), i.into())).collect();
    let kind = match m.task {
        Task::SequenceClassification => "classifier",
        Task::TokenClassification => "token_classifier",
    };
    Some(json!({
        "model_id": m.name,
        "model_sha": m.version,
        "model_dtype": info.precision,
        "model_type": { kind: { "id2label": id2label, "label2id": label2id } },
        "max_input_length": m.max_length,
        "max_batch_tokens": info.limits.max_tokens,
        "max_batch_requests": info.limits.max_sequences,
        "max_client_batch_size": tenant.limits.max_sequences,
        "auto_truncate": true,
        "version": env!("CARGO_PKG_VERSION"),
        "tenant": tenant.name,
        "model": model_name,
        "task": m.task,
        "problem_type": m.problem_type,
        "activation": m.activation(),
        "device": info.device,
    }))
}

/// The two pages' entries in `/openapi.json`, under `route`: `/info` needs the tenant's key when
/// it has keys (the caller marks it), `/health` never does.
pub(crate) fn described(route: &str) -> [(String, Value, bool); 2] {
    let base = route.trim_end_matches('/');
    let ok = |description: &str| {
        json!({ "description": description, "content": { "application/json": {
        "schema": { "type": "object" } } } })
    };
    [
        (
            format!("{base}/info"),
            json!({ "get": {
                "summary": "TEI's Info for this route's model",
                "description": "model_id, model_type.classifier.id2label, max_input_length, max_batch_tokens, ..., \
                    with task, activation and precision; what huggingface_hub's get_endpoint_info reads. Answered by the host.",
                "responses": { "200": ok("The model behind this route") },
            } }),
            true,
        ),
        (
            format!("{base}/health"),
            json!({ "get": {
                "summary": "200 while this route is served; what huggingface_hub's health_check reads",
                "responses": { "200": ok("{\"status\": \"ok\"}") },
            } }),
            false,
        ),
    ]
}
