//! `shared_config.yaml`, parsed into validated types. Each crate owns its section's types
//! (`server:` is `batchbox-server`'s, `tenants:` is `batchbox-tenants`'s, a model's `device` and
//! `cpu_dtype` are `batchbox-model-tch`'s); this file composes them, holds the `models:` and
//! `api:` sections, and checks what spans sections (a tenant's model exists, shares fit the queue).
//!
//! Everything that can be checked before the model loads is checked here, so a bad
//! config stops startup with a message naming the key instead of failing later.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use batchbox_batcher::ChunkOrder;
use batchbox_model::QueueOptions;
use batchbox_model_tch::{CpuDtype, DeviceSpec, FormatChoice, ModelOptions, PassShape};
use batchbox_server::ServerConfig;
use batchbox_tenants::{CacheConfig, KeySource, TenantConfig, TenantLimits};
use serde::{Deserialize, Serialize};

/// Why the config file stops startup; every error names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The config file, as given.
        path: PathBuf,
        /// Why reading it failed.
        source: std::io::Error,
    },
    /// The file is not YAML or does not fit the schema: an unknown key, a missing one, or a value
    /// of the wrong type.
    #[error("invalid config {path}: {source}")]
    Parse {
        /// The config file, as given.
        path: PathBuf,
        /// The parser's error, naming the key and where it is.
        source: yaml_serde::Error,
    },
    /// The file parses but a value fails a check, or a tenant's key cannot be read.
    #[error("invalid config {path}: {key}: {message}")]
    Invalid {
        /// The config file, as given.
        path: PathBuf,
        /// The key at fault, dotted, such as `server.max_header_bytes`.
        key: &'static str,
        /// What is wrong, naming the model or tenant where there is one; never a key or a hash.
        message: String,
    },
}

/// The whole file. Unknown keys are errors: a typo must not silently fall back to a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The models to load, each with its own queue and batcher. Tenants pick one by name.
    pub models: Vec<ModelConfig>,
    /// The batching settings, shared by every model. Required.
    pub api: ApiConfig,
    /// Where to listen and the limits of the HTTP edge; every key has a default.
    #[serde(default)]
    pub server: ServerConfig,
    /// Who is served: each tenant's routes, plugin, model, keys and limits.
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
}

/// One entry of `models:`: a model to load, with its own thread, queue and batcher.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Name clients see and tenants pick the model by; the exported manifest carries the
    /// model's own name and version.
    pub name: String,
    /// Exported model directory (see `tools/export_model.py`); relative to the config file.
    pub path: PathBuf,
    /// `auto` (default: the first GPU if any, else CPU), `cpu`, `cuda` or `cuda:N`; `--device`
    /// overrides it for every model.
    #[serde(default)]
    pub device: DeviceSpec,
    /// Precision on CPU. `use_fp16` only applies to CUDA.
    #[serde(default)]
    pub cpu_dtype: CpuDtype,
    /// On CPU: `auto` (default), `torchscript` or `aoti`: which format of the exported variants runs.
    #[serde(default)]
    pub cpu_backend: FormatChoice,
    /// On CUDA: `auto` (default), `torchscript` or `aoti`.
    #[serde(default)]
    pub gpu_backend: FormatChoice,
}

/// The seed's `api` section, keys unchanged. Every model's queue is built from it, so a reload
/// may not change it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// At most this many sequences per forward pass. Unset: the device's default, 32 on CPU and
    /// 128 on CUDA (`batchbox_model_tch::PassShape`).
    #[serde(default)]
    pub inference_batch_size: Option<NonZeroUsize>,
    /// Half precision on CUDA (the `cuda-float16` variant); no effect on CPU. Required.
    pub use_fp16: bool,
    /// At most this many padded tokens (rows × longest row) per forward pass; a longer sequence
    /// runs alone. Unset: the device's default, 8192 on CPU and 32768 on CUDA.
    #[serde(default)]
    pub max_batch_tokens: Option<NonZeroUsize>,
    /// How long a batch that is not full may wait for more work (0: never wait).
    #[serde(default)]
    pub max_queue_delay_ms: u64,
    /// Tokens that may wait for the model; past it, requests get 503 at once.
    #[serde(default = "default_max_queued_tokens")]
    pub max_queued_tokens: NonZeroUsize,
    /// `length-sorted` (batchbox) or `input-order` (the seed's batching, for comparisons).
    #[serde(default)]
    pub batch_order: BatchOrder,
    /// A target for one forward pass: a batch predicted to take longer gets fewer rows (a single
    /// sequence always runs), so a request arriving mid-pass waits about this long at most.
    #[serde(default = "default_max_batch_ms")]
    pub max_batch_ms: u64,
}

/// Longer than a pass of normal traffic takes on a 2-core CPU (BENCHMARKS.md, "Bounded pass
/// time"), so it costs no throughput there; short enough to bound a flood of long sequences.
fn default_max_batch_ms() -> u64 {
    500
}

/// The longest `api.max_batch_ms` accepted: longer is surely a mistake (seconds for milliseconds).
pub const MAX_BATCH_MS: u64 = 60_000;

/// `api.batch_order`: how queued sequences are grouped into forward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BatchOrder {
    /// `length-sorted`, the default: similar lengths together, so passes pad little, with
    /// tenants sharing the model fairly and each pass aiming at `api.max_batch_ms`.
    #[default]
    LengthSorted,
    /// `input-order`: the seed's batching, first come first in a pass, with no fairness and no
    /// pass-time target; kept for comparisons.
    InputOrder,
}

impl From<BatchOrder> for ChunkOrder {
    fn from(order: BatchOrder) -> Self {
        match order {
            BatchOrder::LengthSorted => ChunkOrder::LengthSorted,
            BatchOrder::InputOrder => ChunkOrder::InputOrder,
        }
    }
}

fn default_max_queued_tokens() -> NonZeroUsize {
    NonZeroUsize::new(262_144).expect("non-zero")
}

impl Config {
    /// Reads, parses and checks the file at `path`: relative paths are taken from its directory,
    /// a tenant without `model` gets the first one, and every tenant's keys are read and hashed.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::read(path).map(|(config, _)| config)
    }

    /// [`Config::load`], and the text it parsed: a reload hashes what it serves, not a second read.
    pub fn read(path: &Path) -> Result<(Self, String), ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let config = Self::from_text(path, &text)?;
        Ok((config, text))
    }

    /// [`Config::read`] of `text`, read from `path`.
    fn from_text(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut config: Config =
            yaml_serde::from_str(text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for model in &mut config.models {
            model.path = base.join(&model.path);
        }
        config.server.plugin_cache_dir = base.join(&config.server.plugin_cache_dir);
        let first_model = config.models.first().map(|m| m.name.clone()).unwrap_or_default();
        for tenant in &mut config.tenants {
            tenant.wasm = base.join(&tenant.wasm);
            if tenant.model.is_empty() {
                tenant.model.clone_from(&first_model);
            }
            for source in &mut tenant.keys {
                if let KeySource::File(file) = source {
                    *file = base.join(&*file);
                }
            }
        }
        let invalid = |(key, message)| ConfigError::Invalid { path: path.to_owned(), key, message };
        config.validate().map_err(invalid)?;
        for source in &mut config.server.admin_keys {
            if let KeySource::File(file) = source {
                *file = base.join(&*file);
            }
        }
        let mut admin_hashes = Vec::new();
        for source in &config.server.admin_keys {
            admin_hashes.extend(source.resolve().map_err(|e| invalid(("server.admin_keys", e)))?);
        }
        config.server.admin_key_hashes = admin_hashes;
        for tenant in &mut config.tenants {
            let mut hashes = Vec::new();
            for source in &tenant.keys {
                hashes.extend(
                    source.resolve().map_err(|e| invalid(("tenants.keys", format!("tenant {}: {e}", tenant.name))))?,
                );
            }
            tenant.key_hashes = hashes;
        }
        Ok(config)
    }

    /// The model a tenant uses (validated to exist).
    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }

    /// How to load one of the config's models; the batching settings are shared by all.
    pub fn model_options(&self, model: &ModelConfig) -> ModelOptions {
        ModelOptions {
            path: model.path.clone(),
            device: model.device,
            use_fp16: self.api.use_fp16,
            cpu_dtype: model.cpu_dtype,
            cpu_backend: model.cpu_backend,
            gpu_backend: model.gpu_backend,
            pass: self.pass_shape(),
            queue: QueueOptions {
                name: model.name.clone(),
                max_queue_delay: Duration::from_millis(self.api.max_queue_delay_ms),
                max_queued_tokens: self.api.max_queued_tokens.get(),
                queue_shares: self.queue_shares(&model.name),
                max_batch_time: Some(Duration::from_millis(self.api.max_batch_ms)),
                chunk_order: self.api.batch_order.into(),
            },
        }
    }

    /// Checks what serde cannot: files exist, names and routes are unique, limits make sense.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.models.is_empty() {
            return Err(("models", "at least one model is needed".into()));
        }
        let mut model_names = std::collections::HashSet::new();
        for model in &self.models {
            if model.name.is_empty() || !model_names.insert(model.name.as_str()) {
                return Err(("models.name", format!("model name {:?} is empty or used twice", model.name)));
            }
            if !model.path.join("manifest.json").is_file() {
                return Err((
                    "models.path",
                    format!(
                        "model {}: {} is not an exported model directory (no manifest.json); run `make setup` or tools/export_model.py",
                        model.name,
                        model.path.display()
                    ),
                ));
            }
        }
        if !(1..=MAX_BATCH_MS).contains(&self.api.max_batch_ms) {
            return Err(("api.max_batch_ms", format!("{} is not between 1 and {MAX_BATCH_MS}", self.api.max_batch_ms)));
        }
        if self.server.max_body_bytes == 0 || self.server.max_instances == 0 {
            return Err(("server", "max_body_bytes and max_instances must be above 0".into()));
        }
        if self.server.max_connections.get() > ServerConfig::MAX_CONNECTIONS {
            return Err(("server.max_connections", format!("must be at most {}", ServerConfig::MAX_CONNECTIONS)));
        }
        if !(ServerConfig::MIN_HEADER_BYTES..=u32::MAX as usize).contains(&self.server.max_header_bytes) {
            return Err((
                "server.max_header_bytes",
                format!("must be {} to {}", ServerConfig::MIN_HEADER_BYTES, u32::MAX),
            ));
        }
        if let Some(metrics_bind) = self.server.metrics_bind {
            if !self.server.metrics {
                return Err(("server.metrics_bind", "is set, but server.metrics is false".into()));
            }
            if metrics_bind == self.server.bind && metrics_bind.port() != 0 {
                return Err(("server.metrics_bind", format!("{metrics_bind} is server.bind too: choose another")));
            }
        }
        let mut names = std::collections::HashSet::new();
        let mut routes = std::collections::HashMap::new();
        for (i, tenant) in self.tenants.iter().enumerate() {
            let name = &tenant.name;
            if name.is_empty() || !names.insert(name.as_str()) {
                return Err(("tenants.name", format!("tenants[{i}]: name {name:?} is empty or used twice")));
            }
            if !tenant.wasm.is_file() {
                return Err((
                    "tenants.wasm",
                    format!(
                        "tenant {name}: {} does not exist; build the plugins (`make plugins`)",
                        tenant.wasm.display()
                    ),
                ));
            }
            if self.model(&tenant.model).is_none() {
                let known: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
                return Err((
                    "tenants.model",
                    format!("tenant {name}: no model named {:?} (models: {known:?})", tenant.model),
                ));
            }
            if tenant.routes.is_empty() {
                return Err(("tenants.routes", format!("tenant {name} has no routes")));
            }
            for route in &tenant.routes {
                if let Some(other) = routes.insert(route.clone(), name.as_str()) {
                    return Err(("tenants.routes", format!("route {route} is claimed by both {other} and {name}")));
                }
            }
            let l = tenant.limits;
            if let Some(bytes) = l.memory_bytes
                && !((1 << 20)..=TenantLimits::MAX_MEMORY_BYTES).contains(&bytes)
            {
                return Err(("tenants.limits.memory_bytes", format!("tenant {name}: must be 1 MiB to 4 GiB")));
            }
            let positive = [
                ("cpu_ms", l.cpu_ms as usize),
                ("wall_ms", l.wall_ms as usize),
                ("max_concurrent", l.max_concurrent),
                ("max_body_bytes", l.max_body_bytes),
                ("max_sequences", l.max_sequences),
                ("max_tokens", l.max_tokens),
                ("max_text_bytes", l.max_text_bytes),
                ("max_hostcall_bytes", l.max_hostcall_bytes),
                ("max_response_headers", l.max_response_headers),
                ("max_response_header_bytes", l.max_response_header_bytes),
                ("max_queued_tokens", l.max_queued_tokens.unwrap_or(1)),
            ];
            if let Some((limit, _)) = positive.iter().find(|(_, v)| *v == 0) {
                return Err(("tenants.limits", format!("tenant {name}: {limit} must be above 0")));
            }
            if let Some(cache) = tenant.cache
                && !(1..=CacheConfig::MAX_BYTES).contains(&cache.max_bytes)
            {
                return Err((
                    "tenants.cache.max_bytes",
                    format!(
                        "tenant {name}: {} is not between 1 and {} (1 TiB)",
                        cache.max_bytes,
                        CacheConfig::MAX_BYTES
                    ),
                ));
            }
        }
        // Idle instances hold pool slots: however many wait, requests must still find one.
        let reused: u64 = self.tenants.iter().map(|t| u64::from(t.reuse_instances)).sum();
        if reused >= u64::from(self.server.max_instances) {
            return Err((
                "tenants.reuse_instances",
                format!(
                    "the tenants' reuse_instances add up to {reused}, which leaves none of server.max_instances ({}) \
                     for requests; lower them or raise max_instances",
                    self.server.max_instances
                ),
            ));
        }
        self.validate_queue_shares()
    }

    /// Each model's queue must hold its tenants' shares, so that no tenant's backlog can make
    /// another's requests get 503 (see [`batchbox_batcher::scheduler`]).
    fn validate_queue_shares(&self) -> Result<(), (&'static str, String)> {
        let limit = self.api.max_queued_tokens.get();
        for model in &self.models {
            let (_, explicit, unset) = self.explicit_shares(&model.name);
            if explicit > limit {
                return Err((
                    "tenants.limits.max_queued_tokens",
                    format!(
                        "the shares of model {}'s tenants add up to {explicit} tokens, more than api.max_queued_tokens ({limit})",
                        model.name
                    ),
                ));
            }
            if unset > 0 && (limit - explicit) / unset == 0 {
                return Err((
                    "tenants.limits.max_queued_tokens",
                    format!(
                        "model {}'s tenants with a share leave {} of api.max_queued_tokens ({limit}) tokens for {unset} without one",
                        model.name,
                        limit - explicit
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `model`'s tenants, the tokens their explicit shares add up to, and how many have none.
    fn explicit_shares(&self, model: &str) -> (Vec<&TenantConfig>, usize, usize) {
        let tenants: Vec<&TenantConfig> = self.tenants.iter().filter(|t| t.model == model).collect();
        let explicit = tenants.iter().filter_map(|t| t.limits.max_queued_tokens).sum();
        let unset = tenants.iter().filter(|t| t.limits.max_queued_tokens.is_none()).count();
        (tenants, explicit, unset)
    }

    /// Each of `model`'s tenants' share of its queue, in tokens: its `limits.max_queued_tokens`
    /// if set, else an equal part of what the tenants with a share leave of `api.max_queued_tokens`.
    /// Validated to add up to at most the queue.
    pub fn queue_shares(&self, model: &str) -> Vec<(String, usize)> {
        let (tenants, explicit, unset) = self.explicit_shares(model);
        let default = self.api.max_queued_tokens.get().saturating_sub(explicit) / unset.max(1);
        tenants.iter().map(|t| (t.name.clone(), t.limits.max_queued_tokens.unwrap_or(default))).collect()
    }

    /// The bounds of one forward pass as written: `api.inference_batch_size` sequences and
    /// `api.max_batch_tokens` padded tokens; each model's device fills in what is unset.
    pub fn pass_shape(&self) -> PassShape {
        PassShape { rows: self.api.inference_batch_size, tokens: self.api.max_batch_tokens }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Config, yaml_serde::Error> {
        yaml_serde::from_str(yaml)
    }

    const GOOD: &str = "
models: [{name: m, path: models/m, device: cuda:1, cpu_dtype: bf16}]
api: {inference_batch_size: 32, use_fp16: true, max_batch_tokens: 8192}
";

    #[test]
    fn parses_the_seed_keys_and_extensions() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.models[0].device, DeviceSpec::Cuda(1));
        assert_eq!(c.models[0].cpu_dtype, CpuDtype::Bf16);
        assert_eq!(c.pass_shape(), PassShape::fixed(32, 8192));
        assert!(c.api.use_fp16);
    }

    #[test]
    fn defaults_are_auto_device_auto_cpu_dtype_and_the_devices_pass_shape() {
        let c =
            parse("models: [{name: m, path: p}]\napi: {inference_batch_size: 1, use_fp16: false, max_batch_tokens: 1}")
                .unwrap();
        assert_eq!(c.models[0].device, DeviceSpec::Auto);
        assert_eq!(c.models[0].cpu_dtype, CpuDtype::Auto);
        let unset = parse("models: [{name: m, path: p}]\napi: {use_fp16: true}").unwrap();
        assert_eq!(unset.pass_shape(), PassShape::default(), "the pass shape left to the device");
        let int8 = parse(&GOOD.replace("bf16", "int8")).unwrap();
        assert_eq!(int8.models[0].cpu_dtype, CpuDtype::Int8);
    }

    #[test]
    fn errors_name_the_offending_key() {
        let unknown = parse(&GOOD.replace("use_fp16", "use_fp61")).unwrap_err().to_string();
        // GOOD's `api` is on line 3: errors name the key's path and the line.
        assert!(unknown.contains("api: unknown field `use_fp61`") && unknown.contains("at line 3 column"), "{unknown}");
        let zero = parse(&GOOD.replace("32", "0")).unwrap_err().to_string();
        assert!(zero.contains("api.inference_batch_size:") && zero.contains("at line 3 column"), "{zero}");
        let device = parse(&GOOD.replace("cuda:1", "tpu")).unwrap_err().to_string();
        assert!(device.contains("models") && device.contains("unknown device \"tpu\""), "{device}");
        let dtype = parse(&GOOD.replace("bf16", "fp8")).unwrap_err().to_string();
        assert!(dtype.contains("fp8"), "{dtype}");
    }

    #[test]
    fn server_and_tenants_parse_with_defaults() {
        let yaml = format!(
            "{GOOD}server: {{bind: '0.0.0.0:9000'}}\ntenants:\n  - {{name: p, wasm: p.wasm, routes: [/x], config: {{max_sentences: 5}}}}\n"
        );
        let c = parse(&yaml).unwrap();
        assert_eq!(c.server.bind.port(), 9000);
        assert_eq!(c.server.max_body_bytes, 2 << 20);
        let limits = c.tenants[0].limits;
        assert_eq!((limits.cpu_ms, limits.max_concurrent, limits.max_hostcall_bytes), (1_000, 64, 16 << 20));
        assert_eq!(serde_json::to_string(&c.tenants[0].config).unwrap(), r#"{"max_sentences":5}"#);
        let typo = parse(&format!("{GOOD}tenants:\n  - {{name: p, wasm: p.wasm, routes: [/x], limits: {{cpu: 1}}}}\n"))
            .unwrap_err();
        assert!(typo.to_string().contains("cpu"), "{typo}");
    }

    #[test]
    fn tenants_models_routes_and_files_are_checked() {
        let dir = std::env::temp_dir().join(format!("batchbox-config-tenants-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("models/m")).unwrap();
        std::fs::write(dir.join("models/m/manifest.json"), "{}").unwrap();
        std::fs::write(dir.join("p.wasm"), "").unwrap();
        let check = |tenants: &str| {
            let file = dir.join("c.yaml");
            std::fs::write(&file, format!("{GOOD}tenants:\n{tenants}")).unwrap();
            Config::load(&file).map_err(|e| e.to_string())
        };
        let ok = check("  - {name: p, wasm: p.wasm, routes: [/x]}\n").unwrap();
        assert_eq!(ok.tenants[0].model, "m", "the first model is the default");
        assert!(ok.tenants[0].key_hashes.is_empty());
        let missing = check("  - {name: p, wasm: nope.wasm, routes: [/x]}\n").unwrap_err();
        assert!(missing.contains("nope.wasm"), "{missing}");
        let host_route = check("  - {name: p, wasm: p.wasm, routes: [/health]}\n").unwrap_err();
        assert!(host_route.contains("/health"), "{host_route}");
        let twice = check("  - {name: p, wasm: p.wasm, routes: [/x]}\n  - {name: q, wasm: p.wasm, routes: [/x/]}\n")
            .unwrap_err();
        assert!(twice.contains("claimed by both p and q"), "{twice}");
        let model = check("  - {name: p, wasm: p.wasm, routes: [/x], model: other}\n").unwrap_err();
        assert!(model.contains("tenants.model") && model.contains("\"other\""), "{model}");
        let zero = check("  - {name: p, wasm: p.wasm, routes: [/x], limits: {max_concurrent: 0}}\n").unwrap_err();
        assert!(zero.contains("max_concurrent"), "{zero}");
        let unset =
            check("  - {name: p, wasm: p.wasm, routes: [/x], keys: [env:BATCHBOX_TEST_UNSET_KEY]}\n").unwrap_err();
        assert!(unset.contains("tenant p") && unset.contains("BATCHBOX_TEST_UNSET_KEY"), "{unset}");
        let cached = check("  - {name: p, wasm: p.wasm, routes: [/x], cache: {max_bytes: 1048576}}\n").unwrap();
        assert_eq!(cached.tenants[0].cache.map(|c| c.max_bytes), Some(1 << 20));
        for (bad, shows) in [("-1", "-1"), ("0", "0"), ("1000000000000000", "1000000000000000"), ("lots", "lots")] {
            let err = check(&format!("  - {{name: p, wasm: p.wasm, routes: [/x], cache: {{max_bytes: {bad}}}}}\n"))
                .unwrap_err();
            assert!(err.contains("max_bytes") && err.contains(shows), "{bad}: {err}");
        }
    }

    #[test]
    fn connection_limits_have_safe_defaults_and_refuse_what_cannot_work() {
        let server = parse(GOOD).unwrap().server;
        assert_eq!(
            (server.header_read_timeout_ms.get(), server.keep_alive_idle_ms.get(), server.body_read_timeout_ms.get()),
            (10_000, 10_000, 30_000)
        );
        assert_eq!(
            (server.max_connections.get(), server.max_header_bytes, server.http2_max_concurrent_streams.get()),
            (4_096, 64 << 10, 100)
        );
        // Zero would mean "close at once" or "never accept": refused while parsing, naming the key.
        for key in [
            "header_read_timeout_ms",
            "keep_alive_idle_ms",
            "body_read_timeout_ms",
            "max_connections",
            "http2_max_concurrent_streams",
        ] {
            let err = parse(&format!("{GOOD}server: {{{key}: 0}}\n")).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        let dir = std::env::temp_dir().join(format!("batchbox-config-server-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("models/m")).unwrap();
        std::fs::write(dir.join("models/m/manifest.json"), "{}").unwrap();
        let check = |server: &str| {
            let file = dir.join("c.yaml");
            std::fs::write(&file, format!("{GOOD}server: {{{server}}}\n")).unwrap();
            Config::load(&file).map(|_| ()).map_err(|e| e.to_string())
        };
        check("max_header_bytes: 8192, max_connections: 1048576").unwrap();
        let small = check("max_header_bytes: 8191").unwrap_err();
        assert!(small.contains("server.max_header_bytes") && small.contains("8192"), "{small}");
        let many = check("max_connections: 1048577").unwrap_err();
        assert!(many.contains("server.max_connections"), "{many}");
    }

    #[test]
    fn max_batch_ms_has_a_default_and_a_range() {
        assert_eq!(parse(GOOD).unwrap().api.max_batch_ms, 500);
        let dir = std::env::temp_dir().join(format!("batchbox-config-batch-ms-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("models/m")).unwrap();
        std::fs::write(dir.join("models/m/manifest.json"), "{}").unwrap();
        let check = |ms: &str| {
            let file = dir.join("c.yaml");
            std::fs::write(
                &file,
                GOOD.replace("max_batch_tokens: 8192", &format!("max_batch_tokens: 8192, max_batch_ms: {ms}")),
            )
            .unwrap();
            Config::load(&file).map(|c| c.api.max_batch_ms).map_err(|e| e.to_string())
        };
        assert_eq!(check("200"), Ok(200));
        for bad in ["0", "60001"] {
            let err = check(bad).unwrap_err();
            assert!(err.contains("api.max_batch_ms") && err.contains(bad), "{err}");
        }
        assert!(check("-5").unwrap_err().contains("max_batch_ms"));
    }

    #[test]
    fn queue_shares_default_to_equal_parts_and_never_pass_the_queue() {
        let dir = std::env::temp_dir().join(format!("batchbox-config-shares-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("models/m")).unwrap();
        std::fs::create_dir_all(dir.join("models/n")).unwrap();
        std::fs::write(dir.join("models/m/manifest.json"), "{}").unwrap();
        std::fs::write(dir.join("models/n/manifest.json"), "{}").unwrap();
        std::fs::write(dir.join("p.wasm"), "").unwrap();
        let check = |tenants: &str| {
            let file = dir.join("c.yaml");
            let models = "models: [{name: m, path: models/m}, {name: n, path: models/n}]\n";
            let api =
                "api: {inference_batch_size: 32, use_fp16: true, max_batch_tokens: 8192, max_queued_tokens: 1000}\n";
            std::fs::write(&file, format!("{models}{api}tenants:\n{tenants}")).unwrap();
            Config::load(&file).map_err(|e| e.to_string())
        };
        let tenant = |name: &str, model: &str, share: Option<usize>| {
            let limits = share.map_or(String::new(), |s| format!(", limits: {{max_queued_tokens: {s}}}"));
            format!("  - {{name: {name}, wasm: p.wasm, routes: [/{name}], model: {model}{limits}}}\n")
        };
        // Each model's queue is shared by its own tenants.
        let c = check(
            &[tenant("a", "m", None), tenant("b", "m", None), tenant("c", "m", None), tenant("d", "n", None)].concat(),
        )
        .unwrap();
        assert_eq!(c.queue_shares("m"), vec![("a".into(), 333), ("b".into(), 333), ("c".into(), 333)]);
        assert_eq!(c.queue_shares("n"), vec![("d".into(), 1000)]);
        // Tenants without a share split what the others leave.
        let c = check(&[tenant("a", "m", Some(600)), tenant("b", "m", None), tenant("c", "m", None)].concat()).unwrap();
        assert_eq!(c.queue_shares("m"), vec![("a".into(), 600), ("b".into(), 200), ("c".into(), 200)]);
        let c = check(&[tenant("a", "m", Some(100)), tenant("b", "m", Some(100))].concat()).unwrap();
        assert_eq!(c.queue_shares("m"), vec![("a".into(), 100), ("b".into(), 100)], "shares may leave room unreserved");
        let over = check(&[tenant("a", "m", Some(600)), tenant("b", "m", Some(500))].concat()).unwrap_err();
        assert!(
            over.contains("tenants.limits.max_queued_tokens") && over.contains("1100") && over.contains("1000"),
            "{over}"
        );
        let none_left = check(&[tenant("a", "m", Some(1000)), tenant("b", "m", None)].concat()).unwrap_err();
        assert!(none_left.contains("leave 0"), "{none_left}");
        let zero = check(&tenant("a", "m", Some(0))).unwrap_err();
        assert!(zero.contains("max_queued_tokens must be above 0"), "{zero}");
    }

    #[test]
    fn missing_model_directory_is_named() {
        let dir = std::env::temp_dir().join(format!("batchbox-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.yaml");
        std::fs::write(&file, GOOD).unwrap();
        let err = Config::load(&file).unwrap_err().to_string();
        assert!(err.contains("models.path") && err.contains("models/m"), "{err}");
    }
}
