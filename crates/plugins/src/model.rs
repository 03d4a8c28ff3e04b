//! What a plugin's host calls need of a model, as a trait: the runtime never names the model
//! type, so a test can hand it a fake, and a tenant's response cache stands in front of the
//! model without the host calls knowing.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use batchbox_model::cache::CachedModel;
use batchbox_model::{Encoding, Inference, Manifest, Model, ModelError, PairTruncation};
use batchbox_tenants::TenantConfig;

/// The future of one `infer` call.
pub type InferFuture<'a> = Pin<Box<dyn Future<Output = Result<Inference, ModelError>> + Send + 'a>>;

/// A model as plugins see it: `host.model`, `host.tokenize` and `host.infer`.
pub trait PluginModel: Send + Sync + 'static {
    /// What `host.model` describes: name, version, task, labels, max length.
    fn manifest(&self) -> &Manifest;
    /// `host.tokenize`: blocking, so the runtime calls it off the async workers.
    fn tokenize(&self, texts: &[String]) -> Result<Vec<Encoding>, ModelError>;
    /// `host.infer-pairs`' tokenizing (see [`Model::tokenize_pairs`]); blocking, like `tokenize`.
    fn tokenize_pairs(
        &self,
        pairs: &[(String, String)],
        truncation: PairTruncation,
    ) -> Result<Vec<Encoding>, ModelError>;
    /// `host.infer` for `tenant`: one output per sequence, or an error once `deadline` passes
    /// with sequences still waiting.
    fn infer<'a>(&'a self, tenant: &'a str, sequences: Vec<Vec<u32>>, deadline: Instant) -> InferFuture<'a>;
}

impl PluginModel for Model {
    fn manifest(&self) -> &Manifest {
        &self.info().manifest
    }

    fn tokenize(&self, texts: &[String]) -> Result<Vec<Encoding>, ModelError> {
        Model::tokenize(self, texts)
    }

    fn tokenize_pairs(
        &self,
        pairs: &[(String, String)],
        truncation: PairTruncation,
    ) -> Result<Vec<Encoding>, ModelError> {
        Model::tokenize_pairs(self, pairs, truncation)
    }

    fn infer<'a>(&'a self, tenant: &'a str, sequences: Vec<Vec<u32>>, deadline: Instant) -> InferFuture<'a> {
        Box::pin(self.infer_for(tenant, sequences, Some(deadline)))
    }
}

impl PluginModel for CachedModel {
    fn manifest(&self) -> &Manifest {
        &self.model().info().manifest
    }

    fn tokenize(&self, texts: &[String]) -> Result<Vec<Encoding>, ModelError> {
        self.model().tokenize(texts)
    }

    fn tokenize_pairs(
        &self,
        pairs: &[(String, String)],
        truncation: PairTruncation,
    ) -> Result<Vec<Encoding>, ModelError> {
        self.model().tokenize_pairs(pairs, truncation)
    }

    fn infer<'a>(&'a self, tenant: &'a str, sequences: Vec<Vec<u32>>, deadline: Instant) -> InferFuture<'a> {
        Box::pin(CachedModel::infer(self, tenant, sequences, Some(deadline)))
    }
}

/// Each tenant's model from the loaded `models` (by name), behind the tenant's own response
/// cache when its config has one: what [`crate::PluginRuntime::load`] takes.
pub fn with_caches(models: &HashMap<String, Arc<Model>>) -> impl Fn(&TenantConfig) -> Arc<dyn PluginModel> + '_ {
    move |tenant| {
        let model = models.get(&tenant.model).expect("the config names loaded models").clone();
        match tenant.cache {
            Some(cache) => Arc::new(CachedModel::new(model, cache.max_bytes)),
            None => model,
        }
    }
}
