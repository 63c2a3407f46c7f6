//! The privacy requests' reports (`privacy.reports`), as the privacy API answers them:
//! every service's report on each request, followed from the topic.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use tokio_util::sync::CancellationToken;

use tessera_common::config::KafkaConfig;
use tessera_common::message::Message;
use tessera_common::records::PrivacyReport;

/// The reports on `privacy.reports`, by request and service (as stored: an export's
/// are sealed).
#[derive(Clone, Default)]
pub struct Reports(Arc<RwLock<HashMap<String, ByService>>>);

/// One request's reports: service → the stored record.
pub(crate) type ByService = BTreeMap<String, Vec<u8>>;

impl Reports {
    pub async fn follow(
        kafka: &KafkaConfig,
        topic: &str,
        shutdown: CancellationToken,
    ) -> tessera_common::Result<Reports> {
        let r = Reports::default();
        let applied = r.clone();
        tessera_common::table::follow(
            kafka,
            topic,
            "tessera-identity-privacy-reports",
            move |m: &Message| applied.apply(m),
            shutdown,
        )
        .await?;
        Ok(r)
    }

    fn apply(&self, m: &Message) {
        let Some(key) = m.key.as_deref().map(String::from_utf8_lossy) else {
            return;
        };
        let Some((request, service)) = key.rsplit_once('/') else {
            return;
        };
        let mut all = self.0.write().expect("reports lock");
        match m.payload.as_deref() {
            None | Some([]) => {
                if let Some(r) = all.get_mut(request) {
                    r.remove(service);
                }
            }
            Some(bytes) => {
                all.entry(request.to_string())
                    .or_default()
                    .insert(service.to_string(), bytes.to_vec());
            }
        }
    }

    pub(crate) fn insert(&self, r: &PrivacyReport, bytes: Vec<u8>) {
        self.0
            .write()
            .expect("reports lock")
            .entry(r.request_id.clone())
            .or_default()
            .insert(r.service.clone(), bytes);
    }

    pub(crate) fn get(&self, request: &str) -> Option<ByService> {
        self.0.read().expect("reports lock").get(request).cloned()
    }
}
