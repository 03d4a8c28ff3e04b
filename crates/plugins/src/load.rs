//! Loading a generation: each tenant's plugin compiled (or read from the cache), its memory
//! limit set, its exports checked, configured once, and its `describe` read.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::{Component, ComponentExportIndex};

use batchbox_tenants::{TenantConfig, TenantLimits};

use crate::cache::CodeCache;
use crate::engine::PluginHost;
use crate::error::{PluginError, mib};
use crate::runtime::{LoadedPlugin, PluginRuntime};
use crate::state::SplitMetrics;
use crate::{PluginModel, bindings};

impl PluginRuntime {
    /// Compiles (or loads from the cache) every tenant's plugin, checks its exports and that it
    /// accepts its config. `model_for` gives each tenant its model (see [`with_caches`]).
    pub async fn load(
        host: &PluginHost,
        tenants: &[TenantConfig],
        model_for: impl Fn(&TenantConfig) -> Arc<dyn PluginModel>,
    ) -> Result<Self, PluginError> {
        let linker = &host.linker;
        let mut runtime = Self {
            engine: host.engine.clone(),
            plugins: HashMap::new(),
            instances: host.instances.clone(),
            code_keys: HashSet::new(),
        };
        // Tenants that run the same .wasm share its compiled code.
        let mut components = HashMap::new();
        for tenant in tenants {
            let name = || tenant.name.clone();
            let (component, wasm_sha256) = load_component(&runtime.engine, tenant, &host.cache, &mut components)?;
            let memory_limit = memory_limit(&component, tenant)?;
            // Imports the host does not offer fail here; missing exports in `PluginPre::new`.
            let pre = linker
                .instantiate_pre(&component)
                .map_err(|e| PluginError::MissingExport { tenant: name(), message: format!("{e:#}") })?;
            let pre = bindings::PluginPre::new(pre)
                .map_err(|e| PluginError::MissingExport { tenant: name(), message: format!("{e:#}") })?;
            // No `config:` in the file means an empty object, so plugins can default every field.
            let config_json = match &tenant.config {
                serde_json::Value::Null => "{}".to_owned(),
                value => serde_json::to_string(value).map_err(|e| PluginError::Configure {
                    tenant: name(),
                    message: format!("config is not representable as JSON: {e}"),
                })?,
            };
            let describe = describe_export(&component);
            let mut plugin = LoadedPlugin {
                tenant: tenant.name.as_str().into(),
                pre,
                config_json,
                limits: tenant.limits,
                memory_limit,
                model: model_for(tenant),
                reuse: tenant.reuse_instances as usize,
                idle: Mutex::new(Vec::new()),
                description: None,
                split_metrics: SplitMetrics::new(&tenant.name),
                wasm_sha256,
            };
            // Configure once now, so a bad config stops startup instead of failing every request.
            let description = runtime.configure(&plugin, describe).await?;
            plugin.description = openapi_fragment(&description, &tenant.name)?;
            runtime.plugins.insert(tenant.name.clone(), plugin);
        }
        runtime.code_keys = components.into_keys().collect();
        Ok(runtime)
    }
}

/// Compiles a plugin, or loads the machine code compiled for this exact .wasm and engine before:
/// by another tenant of this process (`components`, by key), or by any process (the cache,
/// whose file names are the keys). Also answers the SHA-256 of the .wasm it read.
pub(crate) fn load_component(
    engine: &Engine,
    tenant: &TenantConfig,
    cache: &CodeCache,
    components: &mut HashMap<String, Component>,
) -> Result<(Component, String), PluginError> {
    let plugin = tenant.name.clone();
    let wasm = std::fs::read(&tenant.wasm).map_err(|source| PluginError::Read {
        tenant: plugin.clone(),
        path: tenant.wasm.clone(),
        source,
    })?;
    let wasm_sha256 = hex::encode(Sha256::digest(&wasm));
    let mut engine_hash = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut engine_hash);
    let mut key = Sha256::new();
    key.update(&wasm_sha256);
    key.update(engine_hash.finish().to_le_bytes());
    let key = hex::encode(&key.finalize()[..16]);
    if let Some(component) = components.get(&key) {
        return Ok((component.clone(), wasm_sha256));
    }
    if let Some(component) = cache.get(engine, &key) {
        return Ok((components.entry(key).or_insert(component).clone(), wasm_sha256));
    }
    let compile_error = |e: wasmtime::Error| PluginError::Compile { tenant: plugin.clone(), message: format!("{e:#}") };
    let started = Instant::now();
    let compiled = engine.precompile_component(&wasm).map_err(compile_error)?;
    tracing::info!(tenant = plugin, elapsed_ms = started.elapsed().as_millis() as u64, "compiled plugin");
    // The cache only saves time: failing to write it is worth a warning, not an error.
    if let Err(e) = cache.put(&key, &compiled) {
        tracing::warn!(tenant = plugin, error = %e, "cannot cache compiled plugin");
    }
    // SAFETY: `compiled` was produced by this engine a moment ago.
    let component = unsafe { Component::deserialize(engine, &compiled) }.map_err(compile_error)?;
    Ok((components.entry(key).or_insert(component).clone(), wasm_sha256))
}

/// The tenant's memory limit for this plugin: `limits.memory_bytes`, or by default the plugin's
/// initial linear memory plus [`TenantLimits::DEFAULT_MEMORY_ROOM`]. A plugin whose memory starts
/// larger than an explicit limit is refused: instantiating it would fail on every request, with a
/// message that says less.
pub(crate) fn memory_limit(component: &Component, tenant: &TenantConfig) -> Result<usize, PluginError> {
    /// A WebAssembly page.
    pub(crate) const PAGE: u64 = 64 << 10;
    // `None` only for components that import core modules, which the host does not offer.
    let pages = component.resources_required().and_then(|r| r.max_initial_memory_size).unwrap_or(0);
    let need = usize::try_from(pages * PAGE).unwrap_or(usize::MAX);
    let limit = match tenant.limits.memory_bytes {
        Some(limit) if need > limit => {
            return Err(PluginError::MemoryTooSmall { tenant: tenant.name.clone(), need, limit });
        }
        Some(limit) => limit,
        None => need.saturating_add(TenantLimits::DEFAULT_MEMORY_ROOM).min(TenantLimits::MAX_MEMORY_BYTES),
    };
    tracing::info!(tenant = tenant.name, initial_mib = mib(need), limit_mib = mib(limit), "plugin memory");
    Ok(limit)
}

/// The interface a plugin of world `described-plugin` exports.
pub(crate) const API_EXPORT: &str = "batchbox:plugin/api@0.1.3";

/// The component's `api.describe`, if it exports one (it is optional: see the WIT).
pub(crate) fn describe_export(component: &Component) -> Option<ComponentExportIndex> {
    let api = component.get_export_index(None, API_EXPORT)?;
    component.get_export_index(Some(&api), "describe")
}

/// `describe`'s answer checked: `None` for an empty one, else a JSON object whose `paths` is an
/// object, and whose `components`, if any, holds only `schemas`.
pub(crate) fn openapi_fragment(text: &str, tenant: &str) -> Result<Option<serde_json::Value>, PluginError> {
    if text.is_empty() {
        return Ok(None);
    }
    let refuse = |message: String| PluginError::Describe { tenant: tenant.to_owned(), message };
    let fragment: serde_json::Value = serde_json::from_str(text).map_err(|e| refuse(format!("not JSON: {e}")))?;
    if !fragment["paths"].is_object() {
        return Err(refuse("it has no `paths` object".into()));
    }
    let components = fragment.get("components").and_then(|c| c.as_object());
    if components.is_some_and(|c| c.keys().any(|key| key != "schemas")) {
        return Err(refuse("`components` may hold `schemas` only".into()));
    }
    Ok(Some(fragment))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_must_answer_nothing_or_an_openapi_fragment() {
        assert!(openapi_fragment("", "t").unwrap().is_none(), "nothing to describe");
        let fragment = r#"{"paths": {"/": {}}, "components": {"schemas": {"A": {}}}}"#;
        assert!(openapi_fragment(fragment, "t").unwrap().is_some());
        for (bad, why) in [
            ("{not json", "not JSON"),
            (r#"{"components": {}}"#, "no `paths`"),
            (r#"{"paths": []}"#, "no `paths`"),
            (r#"{"paths": {}, "components": {"securitySchemes": {}}}"#, "`schemas` only"),
        ] {
            let error = openapi_fragment(bad, "t").unwrap_err().to_string();
            assert!(error.starts_with("tenant t: the plugin's describe") && error.contains(why), "{bad}: {error}");
        }
    }
}
