//! `shared_config.yaml`, parsed into validated types.
//!
//! Everything that can be checked before the model loads is checked here, so a bad
//! config stops startup with a message naming the key instead of failing later.

use std::fmt;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use crate::batcher::BatchLimits;

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
}

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
    /// How many inference calls may wait for the model thread before callers block.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: NonZeroUsize,
}

/// The seed's `api` section, keys unchanged.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    pub inference_batch_size: NonZeroUsize,
    pub use_fp16: bool,
    pub max_batch_tokens: NonZeroUsize,
}

fn default_queue_capacity() -> NonZeroUsize {
    NonZeroUsize::new(64).expect("non-zero")
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut config: Config = serde_yaml::from_str(&text)
            .map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.model.path = base.join(&config.model.path);
        if !config.model.path.join("manifest.json").is_file() {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                key: "model.path",
                message: format!(
                    "{} is not an exported model directory (no manifest.json); run `make setup` or tools/export_model.py",
                    config.model.path.display()
                ),
            });
        }
        Ok(config)
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
    fn missing_model_directory_is_named() {
        let dir = std::env::temp_dir().join(format!("batchbox-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.yaml");
        std::fs::write(&file, GOOD).unwrap();
        let err = Config::load(&file).unwrap_err().to_string();
        assert!(err.contains("model.path") && err.contains("models/m"), "{err}");
    }
}
