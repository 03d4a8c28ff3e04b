//! The `tenants:` section of the config file: who is served, where, with which keys and limits.
//! Parsed here; checked against the rest of the file by the `batchbox` binary.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One tenant: a team whose plugin serves some routes with one model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Unique and not empty; names the tenant in logs, errors and `check-config`.
    pub name: String,
    /// The tenant's plugin, a component built for wasm32-wasip2. Relative to the config file.
    pub wasm: PathBuf,
    /// The plugin's own settings, handed to its `configure` as JSON.
    #[serde(default)]
    pub config: serde_json::Value,
    /// What it serves: `/path/prefix`, `host.name/path/prefix` or `host.name`.
    pub routes: Vec<Route>,
    /// The name of one of `models`; the first one if left out.
    #[serde(default)]
    pub model: String,
    /// Who may call it: `sha256:<hex>`, `env:VAR` or `file:PATH` (see [`KeySource`]). None: anyone.
    #[serde(default)]
    pub keys: Vec<KeySource>,
    /// The keys' SHA-256 hashes, read from `keys` at load time. Plain keys are never kept.
    #[serde(skip)]
    pub key_hashes: Vec<KeyHash>,
    /// What it may use; every limit left out takes its default (see [`TenantLimits`]).
    #[serde(default)]
    pub limits: TenantLimits,
    /// Opt-in: keep this tenant's logits per sequence and answer repeats without the model.
    #[serde(default)]
    pub cache: Option<CacheConfig>,
    /// Opt-in: keep up to this many configured instances of the plugin between this tenant's
    /// requests and reuse them, rather than a fresh instance per request (0, the default). Saves
    /// instantiation and `configure` (about 1.5 ms for a CPython plugin), at a cost in isolation:
    /// the plugin's globals and heap survive from one of this tenant's requests to the next.
    #[serde(default)]
    pub reuse_instances: u32,
}

/// A tenant's response cache (see `batchbox_model::cache`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Bytes of keys and logits the cache may hold; least recently used entries go first.
    pub max_bytes: u64,
}

impl CacheConfig {
    /// Larger than any cache a host could want, and far below what would overflow a byte count.
    pub const MAX_BYTES: u64 = 1 << 40;
}

/// What one tenant may use. Every limit has a default, so a tenant can never be unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantLimits {
    /// Linear memory one plugin instance may grow to. Unset: the plugin's initial memory plus
    /// [`TenantLimits::DEFAULT_MEMORY_ROOM`], resolved when the plugin is loaded, so a CPython or
    /// SpiderMonkey plugin (whose snapshot heap starts at 9 to 13 MiB) gets the same room to work
    /// as a Rust one (about 1 MiB at start).
    pub memory_bytes: Option<usize>,
    /// The plugin's own CPU time per request (time inside `tokenize` and `infer` does not count).
    pub cpu_ms: u64,
    /// Wall-clock time per request, model time included.
    pub wall_ms: u64,
    /// Requests of this tenant in flight at once; more get 429.
    pub max_concurrent: usize,
    /// Request body size; larger bodies get 429 (bodies past `server.max_body_bytes` get 413).
    pub max_body_bytes: usize,
    /// Per request: texts the plugin may tokenize, and sequences it may send to the model.
    pub max_sequences: usize,
    /// Per request: tokens the plugin may send to the model.
    pub max_tokens: usize,
    /// Per request: bytes of text the plugin may tokenize.
    pub max_text_bytes: usize,
    /// Per host call (and for the response): bytes the host copies out of the plugin
    /// (wasmtime's hostcall fuel). Checked before the data is read.
    pub max_hostcall_bytes: usize,
    /// Headers in one plugin response (default 100); more is a 500 `bad_plugin_response`.
    pub max_response_headers: usize,
    /// Bytes of the headers in one plugin response, names and values (default 64 KiB); more is a
    /// 500 `bad_plugin_response`.
    pub max_response_header_bytes: usize,
    /// Tokens this tenant may have waiting for its model; more is refused (503) for this tenant
    /// only. Unset: an equal part, among the model's tenants without a share, of what the explicit
    /// shares leave of `api.max_queued_tokens` (`Config::queue_shares` in the `batchbox` crate).
    pub max_queued_tokens: Option<usize>,
}

impl TenantLimits {
    /// The room to work a plugin gets, beyond its initial memory, when `memory_bytes` is unset.
    pub const DEFAULT_MEMORY_ROOM: usize = 64 << 20;
    /// The most `memory_bytes` may be: what one pool slot holds (wasmtime reserves 4 GiB of
    /// address space per linear memory anyway, to elide bounds checks).
    pub const MAX_MEMORY_BYTES: usize = 4 << 30;
}

impl Default for TenantLimits {
    fn default() -> Self {
        Self {
            memory_bytes: None,
            cpu_ms: 1_000,
            wall_ms: 30_000,
            max_concurrent: 64,
            max_body_bytes: 2 << 20,
            max_sequences: 2_048,
            max_tokens: 262_144,
            max_text_bytes: 8 << 20,
            max_hostcall_bytes: 16 << 20,
            max_response_headers: 100,
            max_response_header_bytes: 64 << 10,
            max_queued_tokens: None,
        }
    }
}

/// Paths the host answers itself; no tenant may take them, whether or not the host's config
/// turns them on (a reload may turn them on later).
pub const HOST_ROUTES: [&str; 7] =
    ["/health", "/ready", "/v1/models", "/metrics", "/openapi.json", "/admin/reload", "/admin/config"];

/// Where a tenant is reached: requests whose path starts with `path` (whole segments) and,
/// if `host` is set, whose `Host` header names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Route {
    /// The host name the `Host` header must name, lower-cased, without a port; `None`: any host.
    pub host: Option<String>,
    /// The path prefix, matched by whole segments; no trailing `/` unless it is the root `/`.
    pub path: String,
}

impl FromStr for Route {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (host, path) = match s.find('/') {
            Some(0) => (None, s),
            Some(i) => (Some(&s[..i]), &s[i..]),
            None => (Some(s), "/"),
        };
        let host_ok =
            host.is_none_or(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || ".-".contains(c)));
        if !host_ok || path.contains(['?', '#', ' ']) || HOST_ROUTES.contains(&path) {
            return Err(format!(
                "route {s:?}: expected /path, host/path or host, with no query and none of {HOST_ROUTES:?}"
            ));
        }
        let path = if path.len() > 1 { path.trim_end_matches('/') } else { path };
        Ok(Route { host: host.map(str::to_ascii_lowercase), path: path.to_owned() })
    }
}

impl TryFrom<String> for Route {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.host.as_deref().unwrap_or(""), self.path)
    }
}

impl Route {
    /// How specifically this route matches a request, or `None`: longer paths win, then routes
    /// that name the host. `host` is the request's Host header, lower-cased, without the port.
    pub fn matches(&self, host: Option<&str>, path: &str) -> Option<(usize, bool)> {
        if self.host.as_deref().is_some_and(|h| Some(h) != host) {
            return None;
        }
        let rest = path.strip_prefix(self.path.as_str())?;
        let whole_segment = self.path == "/" || rest.is_empty() || rest.starts_with('/');
        whole_segment.then_some((self.path.len(), self.host.is_some()))
    }
}

/// Where a tenant's API key comes from. Keys are hashed as soon as they are read.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum KeySource {
    /// `sha256:<64 hex digits>`: the SHA-256 of the key, so the config holds no secret.
    Sha256(KeyHash),
    /// `env:VAR`: the key is the value of an environment variable.
    Env(String),
    /// `file:PATH`: one key per line (blank lines and `#` comments skipped); a line may itself
    /// be `sha256:<hex>`. Relative to the config file.
    File(PathBuf),
}

impl FromStr for KeySource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("sha256", hex)) => KeyHash::from_hex(hex).map(Self::Sha256),
            Some(("env", var)) if !var.is_empty() => Ok(Self::Env(var.to_owned())),
            Some(("file", path)) if !path.is_empty() => Ok(Self::File(PathBuf::from(path))),
            // Never echo the value: it may be a key pasted by mistake.
            _ => Err("a key must be sha256:<64 hex digits>, env:VAR or file:PATH (plain keys are not accepted in the config)".into()),
        }
    }
}

impl TryFrom<String> for KeySource {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sha256(_) => f.write_str("sha256:…"),
            Self::Env(var) => write!(f, "env:{var}"),
            Self::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

impl KeySource {
    /// The hashes this source stands for. Errors name the source, never a key.
    pub fn resolve(&self) -> Result<Vec<KeyHash>, String> {
        match self {
            Self::Sha256(hash) => Ok(vec![*hash]),
            Self::Env(var) => match std::env::var(var) {
                Ok(key) if !key.trim().is_empty() => Ok(vec![KeyHash::of(key.trim())]),
                _ => Err(format!("environment variable {var} is not set or empty")),
            },
            Self::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
                let lines: Vec<&str> =
                    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
                if lines.is_empty() {
                    return Err(format!("key file {} holds no keys", path.display()));
                }
                lines
                    .into_iter()
                    .map(|line| match line.strip_prefix("sha256:") {
                        Some(hex) => KeyHash::from_hex(hex).map_err(|e| format!("{}: {e}", path.display())),
                        None => Ok(KeyHash::of(line)),
                    })
                    .collect()
            }
        }
    }
}

/// The SHA-256 of an API key. Its `Debug` prints nothing of it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    /// The hash of a plain key, as presented in `Authorization` or read from `env:` or `file:`.
    pub fn of(key: &str) -> Self {
        use sha2::Digest;
        Self(sha2::Sha256::digest(key.as_bytes()).into())
    }

    fn from_hex(digits: &str) -> Result<Self, String> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(digits, &mut bytes).map_err(|_| "sha256: expects 64 hex digits".to_string())?;
        Ok(Self(bytes))
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHash(…)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_whole_path_segments_and_hosts() {
        let route = |s: &str| s.parse::<Route>().unwrap();
        let api = route("/api/v1/");
        assert_eq!(api, Route { host: None, path: "/api/v1".into() });
        assert_eq!(api.matches(None, "/api/v1"), Some((7, false)));
        assert_eq!(api.matches(Some("a.example"), "/api/v1/predict"), Some((7, false)));
        assert_eq!(api.matches(None, "/api/v12"), None);
        let hosted = route("A.example/api");
        assert_eq!(hosted.host.as_deref(), Some("a.example"));
        assert_eq!(hosted.matches(Some("a.example"), "/api/x"), Some((4, true)));
        assert_eq!(hosted.matches(Some("b.example"), "/api/x"), None);
        assert_eq!(hosted.matches(None, "/api/x"), None);
        assert_eq!(route("b.example").matches(Some("b.example"), "/anything"), Some((1, true)));
        assert_eq!(route("/").matches(None, "/anything"), Some((1, false)));
        for bad in ["/health", "/x?y=1", "bad host/x", "/a b", "host:80/x"] {
            assert!(bad.parse::<Route>().is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_are_hashes_env_vars_or_files_and_never_echoed() {
        let hash = format!("sha256:{}", "ab".repeat(32));
        assert!(matches!(hash.parse::<KeySource>(), Ok(KeySource::Sha256(KeyHash([0xab, ..])))));
        let plain = "my-secret-key".parse::<KeySource>().unwrap_err();
        assert!(!plain.contains("my-secret-key"), "{plain}");
        assert!("sha256:abc".parse::<KeySource>().is_err());
        assert_eq!(format!("{:?}", hash.parse::<KeySource>().unwrap()), "sha256:…");

        let dir = std::env::temp_dir().join(format!("batchbox-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys");
        std::fs::write(&file, format!("# team keys\nfirst-key\n\n{hash}\n")).unwrap();
        let from_file = KeySource::File(file).resolve().unwrap();
        assert_eq!(from_file, vec![KeyHash::of("first-key"), KeyHash([0xab; 32])]);
        let missing = KeySource::Env("BATCHBOX_TEST_UNSET_KEY".into()).resolve().unwrap_err();
        assert!(missing.contains("BATCHBOX_TEST_UNSET_KEY"), "{missing}");
    }
}
