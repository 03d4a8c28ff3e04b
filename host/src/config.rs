//! `shared_config.yaml`, parsed into validated types.
//!
//! Everything that can be checked before the model loads is checked here, so a bad
//! config stops startup with a message naming the key instead of failing later.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use crate::batcher::{BatchLimits, ChunkOrder};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config {path}: {source}")]
    Parse { path: PathBuf, source: serde_yaml::Error },
    #[error("invalid config {path}: {key}: {message}")]
    Invalid { path: PathBuf, key: &'static str, message: String },
}

/// The whole file. Unknown keys are errors: a typo must not silently fall back to a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    pub api: ApiConfig,
    #[serde(default)]
    pub server: ServerConfig,
    /// The plugins and the routes each one serves.
    #[serde(default)]
    pub plugins: Vec<PluginConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Where to listen; `PORT` or `--bind` override it.
    pub bind: SocketAddr,
    /// Larger request bodies get 413 before any plugin runs.
    pub max_body_bytes: usize,
    /// Plugin instances alive at once (the pooling allocator's size); more concurrent requests
    /// than this get 503.
    pub max_instances: u32,
    /// Compiled plugins are kept here so a restart does not recompile them. Relative to the config file.
    pub plugin_cache_dir: PathBuf,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    pub shutdown_grace_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8000)),
            max_body_bytes: 2 << 20,
            max_instances: 256,
            plugin_cache_dir: PathBuf::from("target/plugin-cache"),
            shutdown_grace_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    pub name: String,
    /// The component, built for wasm32-wasip2. Relative to the config file.
    pub wasm: PathBuf,
    /// Exact paths this plugin answers, e.g. `/api/v1/predict/sentences`.
    pub routes: Vec<String>,
    /// The plugin's own settings, handed to its `configure` as JSON.
    #[serde(default)]
    pub config: serde_yaml::Value,
    #[serde(default)]
    pub limits: PluginLimits,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginLimits {
    /// Linear memory one instance may grow to.
    pub memory_bytes: usize,
    /// The plugin's own CPU time per request (time inside host calls does not count).
    pub cpu_ms: u64,
    /// Wall-clock time per request, model time included.
    pub wall_ms: u64,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self { memory_bytes: 64 << 20, cpu_ms: 1_000, wall_ms: 30_000 }
    }
}

/// Paths the host answers itself; no plugin may take them.
pub const HOST_ROUTES: [&str; 3] = ["/health", "/ready", "/v1/models"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Name clients see; the exported manifest carries the model's own name and version.
    pub name: String,
    /// Exported model directory (see `tools/export_model.py`); relative to the config file.
    pub path: PathBuf,
    #[serde(default)]
    pub device: DeviceSpec,
    /// Precision on CPU. `use_fp16` only applies to CUDA.
    #[serde(default)]
    pub cpu_dtype: CpuDtype,
}

/// The seed's `api` section, keys unchanged.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    pub inference_batch_size: NonZeroUsize,
    pub use_fp16: bool,
    pub max_batch_tokens: NonZeroUsize,
    /// How long a batch that is not full may wait for more work (0: never wait).
    #[serde(default)]
    pub max_queue_delay_ms: u64,
    /// Tokens that may wait for the model; past it, requests get 503 at once.
    #[serde(default = "default_max_queued_tokens")]
    pub max_queued_tokens: NonZeroUsize,
    /// `length-sorted` (batchbox) or `input-order` (the seed's batching, for comparisons).
    #[serde(default)]
    pub batch_order: BatchOrder,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BatchOrder {
    #[default]
    LengthSorted,
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
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut config: Config = serde_yaml::from_str(&text)
            .map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.model.path = base.join(&config.model.path);
        config.server.plugin_cache_dir = base.join(&config.server.plugin_cache_dir);
        for plugin in &mut config.plugins {
            plugin.wasm = base.join(&plugin.wasm);
        }
        config.validate().map_err(|(key, message)| ConfigError::Invalid { path: path.to_owned(), key, message })?;
        Ok(config)
    }

    /// Checks what serde cannot: files exist, routes are well-formed and unambiguous.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if !self.model.path.join("manifest.json").is_file() {
            return Err((
                "model.path",
                format!(
                    "{} is not an exported model directory (no manifest.json); run `make setup` or tools/export_model.py",
                    self.model.path.display()
                ),
            ));
        }
        if self.server.max_body_bytes == 0 || self.server.max_instances == 0 {
            return Err(("server", "max_body_bytes and max_instances must be above 0".into()));
        }
        let mut names = std::collections::HashSet::new();
        let mut routes = std::collections::HashMap::new();
        for (i, plugin) in self.plugins.iter().enumerate() {
            if plugin.name.is_empty() || !names.insert(plugin.name.as_str()) {
                return Err(("plugins.name", format!("plugins[{i}]: name {:?} is empty or used twice", plugin.name)));
            }
            if !plugin.wasm.is_file() {
                return Err((
                    "plugins.wasm",
                    format!("plugin {}: {} does not exist; build the plugins (`make plugins`)", plugin.name, plugin.wasm.display()),
                ));
            }
            if plugin.routes.is_empty() {
                return Err(("plugins.routes", format!("plugin {} has no routes", plugin.name)));
            }
            for route in &plugin.routes {
                if !route.starts_with('/') || route.contains('?') || HOST_ROUTES.contains(&route.as_str()) {
                    return Err((
                        "plugins.routes",
                        format!("plugin {}: route {route:?} must be a path starting with / and not one of {HOST_ROUTES:?}", plugin.name),
                    ));
                }
                if let Some(other) = routes.insert(route.as_str(), plugin.name.as_str()) {
                    return Err(("plugins.routes", format!("route {route} is claimed by both {other} and {}", plugin.name)));
                }
            }
            let limits = plugin.limits;
            if limits.memory_bytes < (1 << 20) || limits.cpu_ms == 0 || limits.wall_ms == 0 {
                return Err((
                    "plugins.limits",
                    format!("plugin {}: memory_bytes must be at least 1 MiB, cpu_ms and wall_ms above 0", plugin.name),
                ));
            }
        }
        Ok(())
    }

    pub fn batch_limits(&self) -> BatchLimits {
        BatchLimits {
            max_sequences: self.api.inference_batch_size,
            max_tokens: self.api.max_batch_tokens,
        }
    }
}

/// Where the model runs. `auto` picks CUDA when a GPU is usable and falls back to CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum DeviceSpec {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}, expected auto, cpu, cuda or cuda:N")),
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuDtype {
    #[default]
    Fp32,
    Bf16,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Config, serde_yaml::Error> {
        serde_yaml::from_str(yaml)
    }

    const GOOD: &str = "
model: {name: m, path: models/m, device: cuda:1, cpu_dtype: bf16}
api: {inference_batch_size: 32, use_fp16: true, max_batch_tokens: 8192}
";

    #[test]
    fn parses_the_seed_keys_and_extensions() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.model.device, DeviceSpec::Cuda(1));
        assert_eq!(c.model.cpu_dtype, CpuDtype::Bf16);
        assert_eq!(c.api.inference_batch_size.get(), 32);
        assert!(c.api.use_fp16);
        assert_eq!(c.api.max_batch_tokens.get(), 8192);
    }

    #[test]
    fn defaults_are_auto_device_and_fp32() {
        let c = parse("model: {name: m, path: p}\napi: {inference_batch_size: 1, use_fp16: false, max_batch_tokens: 1}").unwrap();
        assert_eq!(c.model.device, DeviceSpec::Auto);
        assert_eq!(c.model.cpu_dtype, CpuDtype::Fp32);
    }

    #[test]
    fn errors_name_the_offending_key() {
        let unknown = parse(&GOOD.replace("use_fp16", "use_fp61")).unwrap_err().to_string();
        assert!(unknown.contains("use_fp61"), "{unknown}");
        let zero = parse(&GOOD.replace("32", "0")).unwrap_err().to_string();
        assert!(zero.contains("inference_batch_size"), "{zero}");
        let device = parse(&GOOD.replace("cuda:1", "tpu")).unwrap_err().to_string();
        assert!(device.contains("model") && device.contains("unknown device \"tpu\""), "{device}");
        let dtype = parse(&GOOD.replace("bf16", "fp8")).unwrap_err().to_string();
        assert!(dtype.contains("fp8"), "{dtype}");
    }

    #[test]
    fn device_strings_round_trip() {
        for s in ["auto", "cpu", "cuda:0", "cuda:3"] {
            assert_eq!(s.parse::<DeviceSpec>().unwrap().to_string(), s);
        }
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn server_and_plugins_parse_with_defaults() {
        let yaml = format!("{GOOD}server: {{bind: '0.0.0.0:9000'}}\nplugins:\n  - {{name: p, wasm: p.wasm, routes: [/x], config: {{max_sentences: 5}}}}\n");
        let c = parse(&yaml).unwrap();
        assert_eq!(c.server.bind.port(), 9000);
        assert_eq!(c.server.max_body_bytes, 2 << 20);
        assert_eq!(c.plugins[0].limits.cpu_ms, 1_000);
        assert_eq!(serde_json::to_string(&c.plugins[0].config).unwrap(), r#"{"max_sentences":5}"#);
        let typo = parse(&format!("{GOOD}plugins:\n  - {{name: p, wasm: p.wasm, routes: [/x], limits: {{cpu: 1}}}}\n")).unwrap_err();
        assert!(typo.to_string().contains("cpu"), "{typo}");
    }

    #[test]
    fn plugin_routes_and_files_are_checked() {
        let dir = std::env::temp_dir().join(format!("batchbox-config-plugins-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("models/m")).unwrap();
        std::fs::write(dir.join("models/m/manifest.json"), "{}").unwrap();
        std::fs::write(dir.join("p.wasm"), "").unwrap();
        let check = |plugins: &str| {
            let file = dir.join("c.yaml");
            std::fs::write(&file, format!("{GOOD}plugins:\n{plugins}")).unwrap();
            Config::load(&file).map(|_| ()).map_err(|e| e.to_string())
        };
        assert_eq!(check("  - {name: p, wasm: p.wasm, routes: [/x]}\n"), Ok(()));
        let missing = check("  - {name: p, wasm: nope.wasm, routes: [/x]}\n").unwrap_err();
        assert!(missing.contains("nope.wasm"), "{missing}");
        let host_route = check("  - {name: p, wasm: p.wasm, routes: [/health]}\n").unwrap_err();
        assert!(host_route.contains("/health"), "{host_route}");
        let twice = check("  - {name: p, wasm: p.wasm, routes: [/x]}\n  - {name: q, wasm: p.wasm, routes: [/x]}\n").unwrap_err();
        assert!(twice.contains("claimed by both p and q"), "{twice}");
    }

    #[test]
    fn missing_model_directory_is_named() {
        let dir = std::env::temp_dir().join(format!("batchbox-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.yaml");
        std::fs::write(&file, GOOD).unwrap();
        let err = Config::load(&file).unwrap_err().to_string();
        assert!(err.contains("model.path") && err.contains("models/m"), "{err}");
    }
}
