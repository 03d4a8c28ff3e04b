//! What serves a config, built whole: its models, every tenant's plugin and the tenants' routes,
//! keys and quotas (a [`Loaded`] generation). Built once at startup, and again by every reload
//! (`POST /admin/reload`, SIGHUP), beside the generation that keeps serving meanwhile.
//!
//! Reload policy:
//! - The file is read again, with the command line's overrides, and checked whole. A reload
//!   that changes what cannot be reloaded is refused: `server` (sockets, connection limits, the
//!   plugin pool) other than `admin_keys`, and `api` (every model's queue is built from it).
//! - A model whose entry is unchanged is shared with the running config. New ones load and warm up
//!   one after another (each on its model thread) while the running config serves, and are
//!   served once the swap is done.
//!   A model removed, or changed (a removal and an addition under one name), stops once the last
//!   request of the old config is done: its queue drains first.
//! - Every tenant's plugin is loaded and configured again (compiled code comes from the cache, so
//!   only a changed `.wasm` compiles). Any failure refuses the reload.
//! - Key sources are read again, so `file:` and `sha256:` keys rotate; `env:` keys cannot, as
//!   the process's environment does not change.
//! - Tenants' shares of a shared model's queue change last, once nothing else can fail.
//! - A reload empties the tenants' response caches: cached outputs are keyed by the model
//!   version, and a cache is rebuilt with its tenant.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use batchbox_model::Model;
use batchbox_model_tch::DeviceSpec;
use batchbox_plugins::{PluginHost, PluginRuntime, with_caches};
use batchbox_server::{Loaded, NextFuture, Reload};
use batchbox_tenants::{TenantConfig, Tenants};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::config::{Config, ModelConfig};

/// What the command line overrides in the config file, at startup and on every reload alike.
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides {
    /// `--device`: every model's `device`.
    pub device: Option<DeviceSpec>,
    /// `--bind`: `server.bind`.
    pub bind: Option<SocketAddr>,
    /// `--port` (`PORT`): the port of `server.bind`.
    pub port: Option<u16>,
}

impl Overrides {
    /// `config` as the command line has it.
    pub fn apply(&self, config: &mut Config) {
        if let Some(device) = self.device {
            config.models.iter_mut().for_each(|m| m.device = device);
        }
        if let Some(bind) = self.bind {
            config.server.bind = bind;
        }
        if let Some(port) = self.port {
            config.server.bind.set_port(port);
        }
    }
}

/// Builds generations of one config file (see the module docs).
pub struct Loader {
    path: PathBuf,
    overrides: Overrides,
    plugins: PluginHost,
    /// The config the current generation was built from, and its version (1 at startup). Held
    /// for a whole build, so builds run one at a time; a build that succeeds records its config
    /// here, as `App` installs every generation a build answers.
    running: tokio::sync::Mutex<Option<(Config, u64)>>,
}

impl Loader {
    /// A loader for the file at `path`, and the file as the command line has it (its config and
    /// text). The plugin engine is sized by it: `server.max_instances` and
    /// `server.plugin_cache_dir` hold for the life of the process.
    pub fn open(path: &Path, overrides: Overrides) -> anyhow::Result<(Self, Config, String)> {
        let (config, text) = read(path, overrides)?;
        let plugins = PluginHost::new(
            config.server.max_instances,
            &config.server.plugin_cache_dir,
            config.server.plugin_cache_max_bytes,
        )?;
        let running = tokio::sync::Mutex::new(None);
        Ok((Self { path: path.to_owned(), overrides, plugins, running }, config, text))
    }

    /// The first generation, of `config` (whose file held `text`).
    pub async fn first(&self, config: Config, text: &str) -> anyhow::Result<Loaded> {
        self.build(config, text, None, "startup").await
    }

    /// Builds `config`'s generation, sharing `current`'s unchanged models, and records `config`
    /// as the running one.
    async fn build(
        &self,
        config: Config,
        text: &str,
        current: Option<&Loaded>,
        trigger: &str,
    ) -> anyhow::Result<Loaded> {
        let started = Instant::now();
        let mut running = self.running.lock().await;
        if let Some((old, _)) = running.as_ref() {
            let fixed = unreloadable_changes(old, &config);
            anyhow::ensure!(fixed.is_empty(), "these cannot change without a restart: {}", fixed.join(", "));
        }
        let (models, kept) = self.models(&config, running.as_ref().map(|(c, _)| c), current).await?;
        let by_name: HashMap<String, Arc<Model>> = models.iter().cloned().collect();
        let plugins = match PluginRuntime::load(&self.plugins, &config.tenants, with_caches(&by_name)).await {
            Ok(plugins) => plugins,
            Err(e) => {
                // Models loaded for this build stop their threads as they go: off the async workers.
                drop(by_name);
                let _ = tokio::task::spawn_blocking(move || drop(models)).await;
                return Err(e.into());
            }
        };
        let tenants = match current {
            Some(current) => Tenants::succeeding(&config.tenants, &current.tenants),
            None => Tenants::new(&config.tenants),
        };
        for tenant in config.tenants.iter().filter(|t| t.key_hashes.is_empty()) {
            tracing::warn!(tenant = tenant.name, "tenant has no keys: anyone may call it");
        }
        let version = running.as_ref().map_or(1, |(_, version)| version + 1);
        let changes = running.as_ref().map(|(old, _)| changes(old, &config, &plugins, current)).unwrap_or_default();
        let about = about(&self.path, text, &config, &plugins, version, trigger, changes);
        // Nothing can fail past here. The shared models' queues take the new tenants' shares at
        // once, beside those of the tenants the reload removes (their requests in flight still
        // queue); `App` settles them on the new shares alone once those requests are done.
        let limit = config.api.max_queued_tokens.get();
        let mut settled_shares = Vec::new();
        for name in &kept {
            let (model, shares) = (&by_name[name.as_str()], config.queue_shares(name));
            let leaving = running.as_ref().map(|(old, _)| old.queue_shares(name)).unwrap_or_default();
            model.set_queue_shares(&while_leaving(&shares, &leaving, limit))?;
            settled_shares.push((model.clone(), shares));
        }
        tracing::info!(
            version,
            models = models.len(),
            tenants = config.tenants.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "config loaded"
        );
        let admin_keys = config.server.admin_key_hashes.clone();
        *running = Some((config, version));
        self.plugins.trim_cache(&plugins);
        Ok(Loaded { models, plugins, tenants, admin_keys, about, settled_shares })
    }

    /// Every model of `config`, in its order: those whose entry `old` has unchanged, shared with
    /// `current` (their names are the second list); the rest loaded, each on its own thread.
    async fn models(
        &self,
        config: &Config,
        old: Option<&Config>,
        current: Option<&Loaded>,
    ) -> anyhow::Result<(Vec<(String, Arc<Model>)>, Vec<String>)> {
        let mut models = Vec::new();
        let mut kept = Vec::new();
        for entry in &config.models {
            let unchanged = old.and_then(|old| old.model(&entry.name)).is_some_and(|was| was == entry);
            let running = current.and_then(|c| c.models.iter().find(|(name, _)| *name == entry.name));
            if let (true, Some((_, model))) = (unchanged, running) {
                models.push((entry.name.clone(), model.clone()));
                kept.push(entry.name.clone());
                continue;
            }
            let options = config.model_options(entry);
            let model = tokio::task::spawn_blocking(move || batchbox_model_tch::load(&options))
                .await?
                .with_context(|| format!("model {}", entry.name))?;
            let info = model.info();
            tracing::info!(
                model = entry.name,
                version = %info.manifest.version,
                device = %info.device,
                precision = ?info.precision,
                pass_rows = info.limits.max_sequences,
                pass_tokens = info.limits.max_tokens,
                "model loaded"
            );
            models.push((entry.name.clone(), model));
        }
        Ok((models, kept))
    }
}

impl Reload for Loader {
    fn next<'a>(&'a self, current: &'a Loaded, trigger: &'static str) -> NextFuture<'a> {
        Box::pin(async move {
            let (config, text) = read(&self.path, self.overrides).map_err(|e| format!("{e:#}"))?;
            self.build(config, &text, Some(current), trigger).await.map_err(|e| format!("{e:#}"))
        })
    }
}

/// The config file at `path` as the command line has it, and its text (read once, so that the
/// config and its hash are of the same bytes).
fn read(path: &Path, overrides: Overrides) -> anyhow::Result<(Config, String)> {
    let (mut config, text) = Config::read(path)?;
    overrides.apply(&mut config);
    Ok((config, text))
}

/// A queue's shares while a reload's previous config drains: the new config's `shares`, and the
/// old shares of the tenants it no longer has (from `old`), all scaled down together when they
/// add up to more than the queue's `limit`.
fn while_leaving(shares: &[(String, usize)], old: &[(String, usize)], limit: usize) -> Vec<(String, usize)> {
    let leaving = old.iter().filter(|(name, _)| !shares.iter().any(|(kept, _)| kept == name));
    let mut all: Vec<(String, usize)> = shares.iter().chain(leaving).cloned().collect();
    let total: usize = all.iter().map(|(_, share)| share).sum();
    if total > limit {
        all.iter_mut().for_each(|(_, share)| *share = (*share as u128 * limit as u128 / total as u128) as usize);
    }
    all
}

/// The keys `new` changes that a reload may not: every `server` key but `admin_keys`, and `api`.
fn unreloadable_changes(old: &Config, new: &Config) -> Vec<String> {
    let sections = [("server", json!(old.server), json!(new.server)), ("api", json!(old.api), json!(new.api))];
    let mut changed = Vec::new();
    for (section, old, new) in sections {
        let (Value::Object(old), Value::Object(new)) = (old, new) else { continue };
        changed.extend(
            old.iter().filter(|(key, value)| new.get(*key) != Some(value)).map(|(key, _)| format!("{section}.{key}")),
        );
    }
    changed
}

/// What a reload from `old` to `new` changes, in words, for the log and `/admin/config`.
fn changes(old: &Config, new: &Config, plugins: &PluginRuntime, current: Option<&Loaded>) -> Vec<String> {
    let mut changes = Vec::new();
    for entry in &new.models {
        match old.model(&entry.name) {
            None => changes.push(format!("model {} added", entry.name)),
            Some(was) if was != entry => changes.push(format!("model {} reloaded", entry.name)),
            Some(_) => {}
        }
    }
    changes.extend(
        old.models.iter().filter(|m| new.model(&m.name).is_none()).map(|m| format!("model {} removed", m.name)),
    );
    for tenant in &new.tenants {
        let Some(was) = old.tenants.iter().find(|t| t.name == tenant.name) else {
            changes.push(format!("tenant {} added", tenant.name));
            continue;
        };
        let what: Vec<&str> = [
            ("plugin", current.and_then(|c| c.plugins.wasm_sha256(&tenant.name)) != plugins.wasm_sha256(&tenant.name)),
            ("plugin config", was.config != tenant.config),
            ("routes", was.routes != tenant.routes),
            ("model", was.model != tenant.model),
            ("keys", was.key_hashes != tenant.key_hashes),
            ("limits", was.limits != tenant.limits),
            ("cache", was.cache != tenant.cache),
            ("reuse_instances", was.reuse_instances != tenant.reuse_instances),
        ]
        .into_iter()
        .filter_map(|(what, changed)| changed.then_some(what))
        .collect();
        if !what.is_empty() {
            changes.push(format!("tenant {}: {}", tenant.name, what.join(", ")));
        }
    }
    changes.extend(
        old.tenants
            .iter()
            .filter(|t| !new.tenants.iter().any(|n| n.name == t.name))
            .map(|t| format!("tenant {} removed", t.name)),
    );
    if old.server.admin_key_hashes != new.server.admin_key_hashes {
        changes.push("admin keys".into());
    }
    changes
}

/// What `GET /admin/config` shows of a config: its version, a hash of everything it was built
/// from (the file's `text`, the plugins it runs and the keys it read), what changed and why, and its
/// sections, with keys counted but never shown (nor their hashes).
fn about(
    path: &Path,
    text: &str,
    config: &Config,
    plugins: &PluginRuntime,
    version: u64,
    trigger: &str,
    changes: Vec<String>,
) -> Value {
    let plugin_sha256 = |tenant: &TenantConfig| plugins.wasm_sha256(&tenant.name).unwrap_or_default().to_owned();
    let mut hash = Sha256::new();
    hash.update(text);
    for tenant in &config.tenants {
        hash.update(plugin_sha256(tenant));
        tenant.key_hashes.iter().for_each(|key| hash.update(key.0));
    }
    config.server.admin_key_hashes.iter().for_each(|key| hash.update(key.0));
    let models: Vec<Value> = config
        .models
        .iter()
        .map(|m: &ModelConfig| {
            json!({
                "name": m.name,
                "path": m.path,
                "device": m.device.to_string(),
                "cpu_dtype": format!("{:?}", m.cpu_dtype).to_lowercase(),
            })
        })
        .collect();
    let tenants: Vec<Value> = config
        .tenants
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "routes": t.routes.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "model": t.model,
                "plugin": t.wasm,
                "plugin_sha256": plugin_sha256(t),
                "keys": t.key_hashes.len(),
                "limits": t.limits,
                "cache": t.cache,
                "reuse_instances": t.reuse_instances,
            })
        })
        .collect();
    json!({
        "version": version,
        "hash": format!("sha256:{}", hex::encode(hash.finalize())),
        "path": path,
        "trigger": trigger,
        "changes": changes,
        "models": models,
        "tenants": tenants,
        "server": config.server,
        "api": config.api,
        "admin_keys": config.server.admin_key_hashes.len(),
        "not_reloadable": ["server (all but admin_keys)", "api"],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(list: &[(&str, usize)]) -> Vec<(String, usize)> {
        list.iter().map(|(name, share)| (name.to_string(), *share)).collect()
    }

    #[test]
    fn a_removed_tenant_keeps_a_share_while_the_old_config_drains_and_all_fit_the_queue() {
        // b leaves, c arrives: b keeps a share beside a's and c's, everything scaled to fit.
        let during = while_leaving(&shares(&[("a", 500), ("c", 500)]), &shares(&[("a", 500), ("b", 500)]), 1000);
        assert_eq!(during, shares(&[("a", 333), ("c", 333), ("b", 333)]));
        // Room to spare: nothing is scaled.
        let roomy = while_leaving(&shares(&[("a", 100)]), &shares(&[("a", 100), ("b", 200)]), 1000);
        assert_eq!(roomy, shares(&[("a", 100), ("b", 200)]));
        // Nobody leaves: the new shares as they are.
        assert_eq!(while_leaving(&shares(&[("a", 1000)]), &shares(&[("a", 400)]), 1000), shares(&[("a", 1000)]));
    }
}
