//! Why a plugin could not be loaded or did not answer, and how a trap is named.

use std::path::PathBuf;

use crate::runtime::LoadedPlugin;

/// Why a plugin could not be loaded or did not answer. Each names its tenant (`tenant`), and
/// `batchbox-server` maps each to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// At startup: the `.wasm` file cannot be read.
    #[error("tenant {tenant}: cannot read {path}: {source}")]
    Read {
        /// The tenant whose plugin it is.
        tenant: String,
        /// The file.
        path: PathBuf,
        /// What reading it said.
        source: std::io::Error,
    },
    /// At startup: the file is not a component wasmtime can compile, or the engine or linker
    /// could not be built (`tenant` is then `*`).
    #[error("tenant {tenant}: cannot load the plugin: {message}")]
    Compile {
        /// The tenant whose plugin it is.
        tenant: String,
        /// wasmtime's reason.
        message: String,
    },
    /// At startup: the component imports what the host does not offer, or lacks an export of
    /// the `batchbox:plugin` world.
    #[error("tenant {tenant}: the plugin does not implement the batchbox:plugin world: {message}")]
    MissingExport {
        /// The tenant whose plugin it is.
        tenant: String,
        /// Which import or export.
        message: String,
    },
    /// At startup: the plugin's `describe` did not answer a JSON object with `paths` (see the WIT).
    #[error("tenant {tenant}: the plugin's describe is not an OpenAPI fragment: {message}")]
    Describe {
        /// The tenant whose plugin it is.
        tenant: String,
        /// What is wrong with it.
        message: String,
    },
    /// The plugin's `configure` refused the tenant's `config:` (at startup, or on a request).
    #[error("tenant {tenant}: the plugin rejected its config: {message}")]
    Configure {
        /// The tenant whose plugin it is.
        tenant: String,
        /// The plugin's own words.
        message: String,
    },
    /// At startup: the plugin's linear memory starts larger than `limits.memory_bytes`, so it
    /// could never be instantiated (an interpreter's snapshot heap, say, in a limit set for Rust).
    #[error(
        "tenant {tenant}: the plugin needs {need} bytes ({:.1} MiB) of linear memory to start, more than \
         its limits.memory_bytes of {limit} bytes ({:.1} MiB); raise the limit",
        mib(*need),
        mib(*limit)
    )]
    MemoryTooSmall {
        /// The tenant whose plugin it is.
        tenant: String,
        /// The plugin's initial linear memory, in bytes.
        need: usize,
        /// The limit, in bytes.
        limit: usize,
    },
    /// The plugin asked for more linear memory than `limits.memory_bytes`.
    #[error("tenant {tenant}: the plugin ran out of its memory limit of {limit} bytes")]
    MemoryLimit {
        /// The tenant whose plugin it is.
        tenant: String,
        /// The limit, in bytes.
        limit: usize,
    },
    /// The plugin's own time (host calls excluded) passed `limits.cpu_ms`.
    #[error("tenant {tenant}: the plugin exceeded its CPU time limit of {limit_ms} ms")]
    CpuLimit {
        /// The tenant whose plugin it is.
        tenant: String,
        /// The limit, in milliseconds.
        limit_ms: u64,
    },
    /// The whole call, host calls included, passed `limits.wall_ms`.
    #[error("tenant {tenant}: the plugin did not answer within {limit_ms} ms")]
    WallTimeout {
        /// The tenant whose plugin it is.
        tenant: String,
        /// The limit, in milliseconds.
        limit_ms: u64,
    },
    /// One host call would have copied more than `limits.max_hostcall_bytes` out of the plugin.
    #[error("tenant {tenant}: the plugin passed more than max_hostcall_bytes ({limit} bytes) to the host in one call")]
    HostcallBytes {
        /// The tenant whose plugin it is.
        tenant: String,
        /// The limit, in bytes.
        limit: usize,
    },
    /// Every one of `server.max_instances` instances is in use; retry shortly.
    #[error("no free plugin instance (more than the configured max_instances requests in flight)")]
    NoCapacity,
    /// The plugin trapped (a panic, an out-of-bounds access, an unreachable) for another reason.
    #[error("tenant {tenant}: the plugin failed: {message}")]
    Trapped {
        /// The tenant whose plugin it is.
        tenant: String,
        /// wasmtime's description of the trap.
        message: String,
    },
}

impl PluginError {
    /// The `kind` label of [`names::PLUGIN_TRAPS`] for an error that stopped a running plugin;
    /// `None` for the rest (loading errors, a refused config, no free instance).
    pub fn trap_kind(&self) -> Option<&'static str> {
        match self {
            Self::CpuLimit { .. } => Some("cpu"),
            Self::MemoryLimit { .. } => Some("memory"),
            Self::WallTimeout { .. } => Some("wall"),
            Self::Trapped { .. } => Some("panic"),
            Self::HostcallBytes { .. } => Some("hostcall"),
            Self::Read { .. }
            | Self::Compile { .. }
            | Self::MissingExport { .. }
            | Self::Configure { .. }
            | Self::Describe { .. }
            | Self::MemoryTooSmall { .. }
            | Self::NoCapacity => None,
        }
    }
}

pub(crate) fn mib(bytes: usize) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

pub(crate) fn classify_trap(
    error: wasmtime::Error,
    tenant: String,
    plugin: &LoadedPlugin,
    memory_reached: bool,
) -> PluginError {
    let message = format!("{error:#}");
    let limits = &plugin.limits;
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => PluginError::CpuLimit { tenant, limit_ms: limits.cpu_ms },
        _ if memory_reached => PluginError::MemoryLimit { tenant, limit: plugin.memory_limit },
        // wasmtime's error type for this is private; its message is stable and documented.
        _ if message.contains("fuel allocated for hostcalls has been exhausted") => {
            PluginError::HostcallBytes { tenant, limit: limits.max_hostcall_bytes }
        }
        _ => PluginError::Trapped { tenant, message },
    }
}
