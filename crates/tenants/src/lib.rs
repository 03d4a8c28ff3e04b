//! Tenants at the door: which tenant a request is for (its routes), whether the caller may use
//! it (API keys), and whether the tenant has room for one more request (its quotas).
//!
//! Keys arrive as `Authorization: Bearer <key>`; only their SHA-256 hashes are kept, and a key
//! is compared with every known hash in constant time, so neither timing nor logs reveal keys.

use std::sync::Arc;
use std::time::Duration;

use batchbox_metrics::names;
use metrics::{Counter, Histogram};
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

mod config;

pub use config::{CacheConfig, HOST_ROUTES, KeyHash, KeySource, Route, TenantConfig, TenantLimits};

/// One tenant, as the HTTP layer sees it.
pub struct Tenant {
    /// Its unique name from the config, as logs and quota errors give it.
    pub name: String,
    /// The routes it serves; never shared with another tenant.
    pub routes: Vec<Route>,
    /// Its quotas and its plugin's limits.
    pub limits: TenantLimits,
    /// The model behind its routes, by its name in the config.
    pub model: String,
    key_hashes: Vec<KeyHash>,
    in_flight: Arc<Semaphore>,
    metrics: RequestMetrics,
}

/// A tenant's request counters (one per status class) and latency histogram, registered once
/// when the tenant is loaded, so that a request records into them without looking them up.
struct RequestMetrics {
    by_class: [Counter; 4],
    seconds: Histogram,
}

impl RequestMetrics {
    fn new(tenant: &str) -> Self {
        let counter =
            |class: &'static str| metrics::counter!(names::REQUESTS, "tenant" => tenant.to_owned(), "status" => class);
        Self {
            by_class: batchbox_metrics::STATUS_CLASSES.map(counter),
            seconds: metrics::histogram!(names::REQUEST_SECONDS, "tenant" => tenant.to_owned()),
        }
    }
}

/// Why a request may not reach its tenant.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The tenant has keys and the request has no `Authorization: Bearer <key>` (401).
    #[error("missing API key: send `Authorization: Bearer <key>`")]
    MissingKey,
    /// The key is no tenant's (401).
    #[error("the API key is not valid")]
    InvalidKey,
    /// The key is valid but another tenant's (403).
    #[error("this API key does not belong to tenant {tenant}")]
    WrongTenant {
        /// The tenant the request was for, not the key's owner.
        tenant: String,
    },
    /// The request would take the tenant past one of its quotas (429).
    #[error("quota {quota}: tenant {tenant} {detail}")]
    Quota {
        /// The tenant over its quota.
        tenant: String,
        /// The quota's key under `limits`, such as `max_concurrent`; clients get it as `error.quota`.
        quota: &'static str,
        /// What the tenant is allowed, in words, for the message.
        detail: String,
    },
}

impl Tenant {
    fn new(config: &TenantConfig) -> Self {
        Self {
            name: config.name.clone(),
            routes: config.routes.clone(),
            limits: config.limits,
            model: config.model.clone(),
            key_hashes: config.key_hashes.clone(),
            in_flight: Arc::new(Semaphore::new(config.limits.max_concurrent)),
            metrics: RequestMetrics::new(&config.name),
        }
    }

    /// Counts a request on one of the tenant's routes: its status, and how long it took.
    pub fn record(&self, status: u16, elapsed: Duration) {
        self.metrics.by_class[batchbox_metrics::status_class(status)].increment(1);
        self.metrics.seconds.record(elapsed.as_secs_f64());
    }

    /// Anyone may call a tenant without keys.
    pub fn is_public(&self) -> bool {
        self.key_hashes.is_empty()
    }

    /// A place among the tenant's concurrent requests, held until the permit is dropped.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, AccessError> {
        self.in_flight.clone().try_acquire_owned().map_err(|_| {
            self.over_quota("max_concurrent", format!("already has {} requests in flight", self.limits.max_concurrent))
        })
    }

    /// Refuses a body over the tenant's own size quota.
    pub fn check_body(&self, bytes: usize) -> Result<(), AccessError> {
        if bytes <= self.limits.max_body_bytes {
            return Ok(());
        }
        Err(self.over_quota(
            "max_body_bytes",
            format!("takes request bodies of at most {} bytes", self.limits.max_body_bytes),
        ))
    }

    /// The refusal for `quota`, counted.
    fn over_quota(&self, quota: &'static str, detail: String) -> AccessError {
        let tenant = self.name.clone();
        metrics::counter!(names::QUOTA_REJECTIONS, "tenant" => tenant.clone(), "quota" => quota).increment(1);
        AccessError::Quota { tenant, quota, detail }
    }
}

/// Every tenant, with its routes and keys.
pub struct Tenants {
    tenants: Vec<Tenant>,
}

impl Tenants {
    /// One tenant per config entry, in the config's order, with nothing in flight. The configs
    /// are taken as already checked (unique names and routes, key hashes resolved).
    pub fn new(configs: &[TenantConfig]) -> Self {
        Self { tenants: configs.iter().map(Tenant::new).collect() }
    }

    /// The tenants of a reloaded config. A tenant that keeps its name and `max_concurrent` keeps
    /// counting its requests in flight across the reload, so the requests still running on the
    /// old config and those on the new one share its quota.
    pub fn succeeding(configs: &[TenantConfig], previous: &Tenants) -> Self {
        let mut tenants = Self::new(configs);
        for tenant in &mut tenants.tenants {
            let same = previous.tenants.iter().find(|p| p.name == tenant.name);
            if let Some(same) = same.filter(|p| p.limits.max_concurrent == tenant.limits.max_concurrent) {
                tenant.in_flight = same.in_flight.clone();
            }
        }
        tenants
    }

    /// Every tenant, in the config's order.
    pub fn iter(&self) -> impl Iterator<Item = &Tenant> {
        self.tenants.iter()
    }

    /// The tenant whose route matches most specifically: the longest path prefix, then a route
    /// that names the host. `host` is the request's Host header.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&Tenant> {
        self.route_matched(host, path).map(|(tenant, _)| tenant)
    }

    /// [`route`](Self::route), with the route of the tenant's that matched.
    pub fn route_matched(&self, host: Option<&str>, path: &str) -> Option<(&Tenant, &Route)> {
        let host = host.map(|h| h.rsplit_once(':').map_or(h, |(name, _port)| name).to_ascii_lowercase());
        let host = host.as_deref();
        self.tenants
            .iter()
            .flat_map(|t| t.routes.iter().filter_map(move |r| Some((r.matches(host, path)?, (t, r)))))
            .max_by_key(|(score, _)| *score)
            .map(|(_, matched)| matched)
    }

    /// Checks the `Authorization` header against `tenant`'s keys: no or unknown key is
    /// `MissingKey`/`InvalidKey` (401), another tenant's key `WrongTenant` (403).
    pub fn authorize(&self, tenant: &Tenant, authorization: Option<&[u8]>) -> Result<(), AccessError> {
        if tenant.is_public() {
            return Ok(());
        }
        let key = authorization.and_then(bearer_token).ok_or(AccessError::MissingKey)?;
        let hash = KeyHash::of(key);
        // Every hash is compared, so the time taken says nothing about which one matched.
        let (mut own, mut other) = (subtle::Choice::from(0), subtle::Choice::from(0));
        for t in &self.tenants {
            for known in &t.key_hashes {
                let same = known.0.ct_eq(&hash.0);
                if std::ptr::eq(t, tenant) {
                    own |= same;
                } else {
                    other |= same;
                }
            }
        }
        match (bool::from(own), bool::from(other)) {
            (true, _) => Ok(()),
            (false, true) => Err(AccessError::WrongTenant { tenant: tenant.name.clone() }),
            (false, false) => Err(AccessError::InvalidKey),
        }
    }
}

/// Checks the `Authorization` header against `hashes` alone (the admin keys): no key is
/// `MissingKey`, any other key `InvalidKey`. Every hash is compared, in constant time.
pub fn check_key(hashes: &[KeyHash], authorization: Option<&[u8]>) -> Result<(), AccessError> {
    let key = authorization.and_then(bearer_token).ok_or(AccessError::MissingKey)?;
    let hash = KeyHash::of(key);
    let known = hashes.iter().fold(subtle::Choice::from(0), |found, known| found | known.0.ct_eq(&hash.0));
    if bool::from(known) { Ok(()) } else { Err(AccessError::InvalidKey) }
}

/// The key of `Bearer <key>` (the scheme is case-insensitive).
fn bearer_token(header: &[u8]) -> Option<&str> {
    let header = std::str::from_utf8(header).ok()?;
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str, routes: &[&str], keys: &[&str]) -> TenantConfig {
        TenantConfig {
            name: name.into(),
            wasm: "p.wasm".into(),
            config: serde_json::Value::Null,
            routes: routes.iter().map(|r| r.parse().unwrap()).collect(),
            model: "m".into(),
            keys: Vec::new(),
            key_hashes: keys.iter().map(|k| KeyHash::of(k)).collect(),
            limits: TenantLimits { max_concurrent: 2, max_body_bytes: 100, ..TenantLimits::default() },
            cache: None,
            reuse_instances: 0,
        }
    }

    fn tenants() -> Tenants {
        Tenants::new(&[
            tenant("a", &["/api"], &["key-a", "key-a2"]),
            tenant("b", &["b.example/api", "/api/b"], &["key-b"]),
            tenant("open", &["/public"], &[]),
        ])
    }

    #[test]
    fn the_most_specific_route_wins() {
        let t = tenants();
        let name = |host, path| t.route(host, path).map(|t| t.name.as_str());
        assert_eq!(name(None, "/api/predict"), Some("a"));
        assert_eq!(name(Some("B.Example:8080"), "/api/predict"), Some("b"), "host routes win at equal length");
        assert_eq!(name(Some("a.example"), "/api/b/x"), Some("b"), "longer paths win");
        assert_eq!(name(None, "/apix"), None);
        assert_eq!(name(None, "/public"), Some("open"));
    }

    #[test]
    fn keys_open_their_own_tenant_only() {
        let t = tenants();
        let (a, b, open) =
            (t.route(None, "/api").unwrap(), t.route(None, "/api/b").unwrap(), t.route(None, "/public").unwrap());
        assert!(t.authorize(a, Some(b"Bearer key-a")).is_ok());
        assert!(t.authorize(a, Some(b"bearer   key-a2 ")).is_ok());
        assert!(matches!(t.authorize(a, None), Err(AccessError::MissingKey)));
        assert!(matches!(t.authorize(a, Some(b"Basic key-a")), Err(AccessError::MissingKey)));
        assert!(matches!(t.authorize(a, Some(b"Bearer nope")), Err(AccessError::InvalidKey)));
        assert!(matches!(t.authorize(b, Some(b"Bearer key-a")), Err(AccessError::WrongTenant { .. })));
        assert!(t.authorize(open, None).is_ok());
        assert!(t.authorize(open, Some(b"Bearer key-b")).is_ok());
    }

    #[test]
    fn admin_keys_open_nothing_else_and_only_they_pass() {
        let hashes = [KeyHash::of("admin")];
        assert!(check_key(&hashes, Some(b"Bearer admin")).is_ok());
        assert!(matches!(check_key(&hashes, None), Err(AccessError::MissingKey)));
        assert!(matches!(check_key(&hashes, Some(b"Bearer key-a")), Err(AccessError::InvalidKey)));
        assert!(matches!(check_key(&[], Some(b"Bearer admin")), Err(AccessError::InvalidKey)));
        let t = tenants();
        assert!(matches!(
            t.authorize(t.route(None, "/api").unwrap(), Some(b"Bearer admin")),
            Err(AccessError::InvalidKey)
        ));
    }

    #[test]
    fn a_reload_keeps_counting_requests_in_flight_of_tenants_whose_quota_is_unchanged() {
        let old = tenants();
        let held = old.route(None, "/api").unwrap().admit().unwrap();
        let _also = old.route(None, "/api").unwrap().admit().unwrap();
        let mut changed = tenant("b", &["/api/b"], &[]);
        changed.limits.max_concurrent = 5;
        let new = Tenants::succeeding(&[tenant("a", &["/api"], &[]), changed], &old);
        let a = new.route(None, "/api").unwrap();
        assert!(a.admit().is_err(), "the old config's two requests still count against a's quota of 2");
        drop(held);
        assert!(a.admit().is_ok());
        let b = new.route(None, "/api/b").unwrap();
        let permits: Vec<_> = (0..5).map(|_| b.admit().unwrap()).collect();
        assert_eq!(permits.len(), 5, "a changed quota starts afresh");
    }

    #[test]
    fn concurrency_and_body_quotas_name_themselves() {
        let t = tenants();
        let a = t.route(None, "/api").unwrap();
        let (first, _second) = (a.admit().unwrap(), a.admit().unwrap());
        let err = a.admit().unwrap_err().to_string();
        assert!(err.contains("max_concurrent"), "{err}");
        drop(first);
        assert!(a.admit().is_ok(), "a finished request frees its place");
        assert!(a.check_body(100).is_ok());
        assert!(a.check_body(101).unwrap_err().to_string().contains("max_body_bytes"));
    }
}
