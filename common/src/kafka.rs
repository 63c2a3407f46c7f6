//! Kafka clients, configured once: the idempotent producer every service uses (rebuilt
//! after a fatal error), consumer settings, and topic creation.

use std::sync::{Arc, OnceLock, RwLock};

use prometheus::{IntCounter, Registry};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use tracing::{info, warn};

use crate::config::{KafkaConfig, TopicsConfig};
use crate::{Error, Result};

/// Settings shared by every client: bootstrap servers, client id, and the extra
/// librdkafka properties from configuration (TLS, SASL, ...).
pub fn client_config(cfg: &KafkaConfig, client_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.bootstrap)
        .set("client.id", client_id);
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

/// Consumer settings: manual offsets (the runner decides when work is durable),
/// earliest reset, and the fetch wait from configuration.
pub fn consumer_config(cfg: &KafkaConfig, client_id: &str, group_id: &str) -> ClientConfig {
    let mut c = client_config(cfg, client_id);
    c.set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", cfg.fetch_wait_max_ms.to_string())
        .set("fetch.min.bytes", "1")
        .set("partition.assignment.strategy", "range")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("statistics.interval.ms", "5000")
        // Notice new topics and partitions within seconds, not librdkafka's 5 minutes.
        .set("topic.metadata.refresh.interval.ms", "10000");
    if let Some(instance) = &cfg.group_instance_id {
        c.set("group.instance.id", format!("{instance}-{group_id}"));
    }
    c
}

/// Producer settings: idempotent, acks from all in-sync replicas, the configured
/// linger and delivery timeout.
pub fn producer_config(cfg: &KafkaConfig, client_id: &str) -> ClientConfig {
    let mut c = client_config(cfg, client_id);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", cfg.linger_ms.to_string())
        .set("message.timeout.ms", cfg.message_timeout_ms.to_string())
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "200000")
        // Pinned (a `partitioner` in [kafka.properties] does not apply): services that
        // keep state per key compute where a key lives with [`partition_of`].
        .set("partitioner", "consistent_random");
    c
}

/// The partition a keyed record goes to among `partitions`: librdkafka's
/// `consistent_random` partitioner, which every Tessera producer uses (CRC-32 of the
/// key, modulo the partition count). Profiles uses it to know which profiles belong to
/// the partitions it owns.
pub fn partition_of(key: &[u8], partitions: i32) -> i32 {
    (crc32fast::hash(key) % partitions.max(1) as u32) as i32
}

/// The number of partitions of `topic`, from the brokers' metadata.
pub async fn partition_count(cfg: &KafkaConfig, topic: &str) -> Result<i32> {
    use rdkafka::consumer::Consumer as _;
    let consumer: rdkafka::consumer::BaseConsumer =
        client_config(cfg, "tessera-metadata").create()?;
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        match md.topics().first().map(|t| t.partitions().len()) {
            Some(n) if n > 0 => Ok(n as i32),
            _ => Err(Error::Broker(format!("topic {topic} has no partitions"))),
        }
    })
    .await
    .map_err(|e| Error::Broker(format!("metadata: {e}")))?
}

/// Why a produce did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// The local queue is full: back off (HTTP 429).
    #[error("producer queue is full")]
    QueueFull,
    /// Not acknowledged by the broker (down, timed out, fatal producer error): HTTP 503.
    #[error("not acknowledged by kafka: {0}")]
    Unavailable(String),
}

/// The idempotent producer. After a fatal error (for instance a broken idempotence
/// sequence) librdkafka refuses every further send; this wrapper then builds a fresh
/// producer. Records the old one had not delivered fail back to their callers, which
/// answer 503 or retry: never reported as delivered.
pub struct Producer {
    config: ClientConfig,
    inner: RwLock<Arc<Client>>,
    rebuilds: AtomicU64,
    rebuilds_metric: OnceLock<IntCounter>,
}

/// What a record's acknowledgement (or its failure) is sent on.
type Acknowledgement = tokio::sync::oneshot::Sender<std::result::Result<(i32, i64), KafkaError>>;

/// Hands each delivery report to the record's waiting future.
struct Deliveries;

impl rdkafka::ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<Acknowledgement>;
    fn delivery(&self, report: &DeliveryResult<'_>, ack: Box<Acknowledgement>) {
        use rdkafka::Message as _;
        let _ = ack.send(match report {
            Ok(m) => Ok((m.partition(), m.offset())),
            Err((e, _)) => Err(e.clone()),
        });
    }
}

/// How long one poll of the delivery reports lasts. rust-rdkafka's own polling thread
/// (`FutureProducer`) polls in windows of 100 ms and spins for the last millisecond of
/// each (the time left is rounded down to 0 ms): about 1 % of a core per producer, busy
/// or idle. A longer window spins as long, ten times less often; a report still wakes
/// the poll at once.
const POLL_WINDOW: Duration = Duration::from_secs(1);

/// One librdkafka producer and the thread that serves its delivery reports (it stops
/// within [`POLL_WINDOW`] once the client is dropped).
struct Client {
    producer: Arc<BaseProducer<Deliveries>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Client {
    fn create(config: &ClientConfig) -> Result<Client> {
        let producer: Arc<BaseProducer<Deliveries>> =
            Arc::new(config.create_with_context(Deliveries)?);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, s) = (producer.clone(), stop.clone());
        std::thread::Builder::new()
            .name("kafka-deliveries".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    p.poll(POLL_WINDOW);
                }
            })?;
        Ok(Client { producer, stop })
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Producer {
    pub fn new(cfg: &KafkaConfig, client_id: &str) -> Result<Producer> {
        let config = producer_config(cfg, client_id);
        let inner = RwLock::new(Arc::new(Client::create(&config)?));
        Ok(Producer {
            config,
            inner,
            rebuilds: AtomicU64::new(0),
            rebuilds_metric: OnceLock::new(),
        })
    }

    /// Exports `tessera_<service>_producer_rebuilds_total` in `registry`.
    pub fn register_metrics(&self, registry: &Registry, service: &str) -> Result<()> {
        let counter = IntCounter::new(
            format!("tessera_{service}_producer_rebuilds_total"),
            "Kafka producers rebuilt after a fatal error",
        )
        .map_err(|e| Error::Internal(format!("metrics: {e}")))?;
        registry
            .register(Box::new(counter.clone()))
            .map_err(|e| Error::Internal(format!("metrics: {e}")))?;
        let _ = self.rebuilds_metric.set(counter);
        Ok(())
    }

    fn current(&self) -> Arc<Client> {
        self.inner.read().expect("producer lock").clone()
    }

    /// Sends one record and waits for the broker's acknowledgement. An empty payload is
    /// a tombstone (no value: compaction removes the key). Returns (partition, offset).
    pub async fn send(
        &self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
    ) -> Result<(i32, i64), ProduceError> {
        self.enqueue(topic, key, payload)?.await
    }

    /// Puts one record in the producer's queue, in the order of the calls, and gives
    /// what waits for its acknowledgement. [`ProduceError::QueueFull`] at once when the
    /// queue is full.
    pub fn enqueue(
        &self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
    ) -> Result<impl Future<Output = Result<(i32, i64), ProduceError>> + Send + '_, ProduceError>
    {
        let client = self.current();
        let (ack, delivery) = tokio::sync::oneshot::channel();
        let mut record = BaseRecord::with_opaque_to(topic, Box::new(ack)).key(key);
        if !payload.is_empty() {
            record = record.payload(payload);
        }
        match client.producer.send(record) {
            Ok(()) => {}
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                return Err(ProduceError::QueueFull);
            }
            Err((e, _)) => {
                self.rebuild_if_fatal(&client);
                return Err(ProduceError::Unavailable(e.to_string()));
            }
        }
        Ok(async move {
            match delivery.await {
                Ok(Ok(at)) => Ok(at),
                Ok(Err(e)) => {
                    self.rebuild_if_fatal(&client);
                    Err(ProduceError::Unavailable(e.to_string()))
                }
                Err(_dropped) => Err(ProduceError::Unavailable("producer was dropped".into())),
            }
        })
    }

    fn rebuild_if_fatal(&self, failed: &Client) {
        let Some((code, reason)) = failed.producer.client().fatal_error() else {
            return;
        };
        let mut guard = self.inner.write().expect("producer lock");
        // Another caller may have rebuilt it already.
        if guard.producer.client().fatal_error().is_none() {
            return;
        }
        warn!(?code, %reason, "kafka producer hit a fatal error, building a new one");
        match Client::create(&self.config) {
            Ok(p) => {
                *guard = Arc::new(p);
                self.rebuilds.fetch_add(1, Ordering::Relaxed);
                if let Some(c) = self.rebuilds_metric.get() {
                    c.inc();
                }
            }
            Err(e) => warn!(error = %e, "could not rebuild the kafka producer"),
        }
    }

    /// How many times a fatal error made this producer build a new client.
    pub fn rebuilds(&self) -> u64 {
        self.rebuilds.load(Ordering::Relaxed)
    }

    /// Waits for queued records to be delivered (used at shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.current().producer.flush(timeout) {
            warn!(error = %e, "kafka producer flush at shutdown did not complete");
        }
    }

    /// True when the brokers answer a metadata request.
    pub fn broker_reachable(&self, timeout: Duration) -> bool {
        self.current()
            .producer
            .client()
            .fetch_metadata(None, timeout)
            .is_ok()
    }
}

/// What a topic holds, which decides its retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    /// Event logs: kept `events_retention_ms`.
    Events,
    /// A table (definitions): one partition, so one order; compacted, so the latest
    /// record of each key is kept for ever.
    Table,
    /// The audit trail: one partition (one order), kept `audit_retention_ms`.
    Audit,
    /// A table whose deleted records must physically go soon (encryption keys, privacy
    /// reports): compacted like a table, with segments rolled every minute and cleaned
    /// as soon as they are dirty, and tombstones dropped after a minute.
    Erasable,
}

/// Remembers an authentication failure reported by librdkafka (a wrong SASL password,
/// a refused certificate), which otherwise shows only as requests timing out.
#[derive(Default)]
struct LoginContext {
    refused: std::sync::Mutex<Option<String>>,
}

impl rdkafka::ClientContext for LoginContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Authentication) {
            *self.refused.lock().expect("login context") = Some(reason.to_string());
        }
    }
}

impl rdkafka::producer::ProducerContext for LoginContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: ()) {}
}

/// Asks the brokers for metadata once with these settings: refused credentials are an
/// error that says so; anything else (brokers not up yet) is left to the retries.
async fn check_login(kafka: &KafkaConfig) -> Result<()> {
    let producer: rdkafka::producer::BaseProducer<LoginContext> =
        client_config(kafka, "tessera-login-check").create_with_context(LoginContext::default())?;
    tokio::task::spawn_blocking(move || {
        if producer
            .client()
            .fetch_metadata(None, Duration::from_secs(5))
            .is_ok()
        {
            return Ok(());
        }
        // The error events are served by polling.
        for _ in 0..10 {
            producer.poll(Duration::from_millis(100));
            if let Some(reason) = producer
                .context()
                .refused
                .lock()
                .expect("login context")
                .clone()
            {
                return Err(Error::Config(format!(
                    "kafka refused this client's credentials ([kafka.properties]): {reason}"
                )));
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| Error::Broker(format!("login check: {e}")))?
}

/// With `topics.create`: creates the topics that do not exist yet (partitions,
/// replication and retention from configuration), then checks the settings of the
/// compacted ones, created here or before ([`check_compacted`]). Refused credentials
/// stop here with an error that says so. Without it, nothing is asked of the brokers
/// here: see [`check_topic_settings`].
pub async fn ensure_topics(
    kafka: &KafkaConfig,
    cfg: &TopicsConfig,
    names: &[(String, TopicKind)],
) -> Result<()> {
    if !cfg.create || names.is_empty() {
        return Ok(());
    }
    let admin = admin_client(kafka).await?;
    create_topics(&admin, cfg, names).await?;
    check_compacted(&admin, cfg, names).await
}

/// The settings check of [`ensure_topics`] alone, for topics created by someone else
/// (`topics.create = false`): a compacted topic with unsafe settings is refused.
pub async fn check_topic_settings(
    kafka: &KafkaConfig,
    cfg: &TopicsConfig,
    names: &[(String, TopicKind)],
) -> Result<()> {
    let admin = admin_client(kafka).await?;
    check_compacted(&admin, cfg, names).await
}

/// An admin client, once the brokers accept this configuration's credentials.
async fn admin_client(kafka: &KafkaConfig) -> Result<Arc<AdminClient<DefaultClientContext>>> {
    check_login(kafka).await?;
    Ok(Arc::new(client_config(kafka, "tessera-admin").create()?))
}

/// The compacted topics (tables, subject keys) hold state whose loss is silent: a key
/// removed by retention looks like an erased one. Each existing one must be compacted
/// only (no `delete` in `cleanup.policy`), have at least `topics.replication_factor`
/// replicas, and with several replicas need at least two in sync for a write. A topic
/// that does not is refused with what to change.
///
/// A topic just created reaches the brokers one after another, and the broker asked for
/// its settings may not know it yet: that answer is waited out (up to 30 s), never read
/// as a setting.
async fn check_compacted(
    admin: &Arc<AdminClient<DefaultClientContext>>,
    cfg: &TopicsConfig,
    names: &[(String, TopicKind)],
) -> Result<()> {
    let compacted: Vec<&str> = names
        .iter()
        .filter(|(_, k)| matches!(k, TopicKind::Table | TopicKind::Erasable))
        .map(|(n, _)| n.as_str())
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let unknown = check_compacted_once(admin, cfg, &compacted).await?;
        if unknown.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(Error::Broker(format!(
                "the brokers did not describe the settings of topics {unknown:?} within 30 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One pass of [`check_compacted`]: the topics whose settings the answering broker did
/// not know yet, or the refusal.
async fn check_compacted_once(
    admin: &Arc<AdminClient<DefaultClientContext>>,
    cfg: &TopicsConfig,
    compacted: &[&str],
) -> Result<Vec<String>> {
    use rdkafka::admin::ResourceSpecifier;
    if compacted.is_empty() {
        return Ok(Vec::new());
    }
    let md = {
        let a = admin.clone();
        tokio::task::spawn_blocking(move || a.inner().fetch_metadata(None, Duration::from_secs(10)))
            .await
            .map_err(|e| Error::Broker(format!("reading the topics' metadata: {e}")))??
    };
    let specs: Vec<ResourceSpecifier<'_>> = compacted
        .iter()
        .filter(|n| md.topics().iter().any(|t| t.name() == **n))
        .map(|n| ResourceSpecifier::Topic(n))
        .collect();
    if specs.is_empty() {
        return Ok(Vec::new());
    }
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let mut unknown = Vec::new();
    for described in admin.describe_configs(specs.iter(), &opts).await? {
        let resource = described
            .map_err(|code| Error::Broker(format!("reading a topic's settings: {code}")))?;
        let rdkafka::admin::OwnedResourceSpecifier::Topic(name) = &resource.specifier else {
            continue;
        };
        let Some((policy, min_isr)) = described_settings(&resource) else {
            unknown.push(name.clone());
            continue;
        };
        let replicas = md
            .topics()
            .iter()
            .find(|t| t.name() == name)
            .and_then(|t| t.partitions().iter().map(|p| p.replicas().len()).min())
            .unwrap_or(0);
        problem_of_compacted(
            name,
            policy.as_deref(),
            replicas,
            min_isr,
            cfg.replication_factor.max(1) as usize,
        )?;
    }
    Ok(unknown)
}

/// A topic's `cleanup.policy` and `min.insync.replicas` as a broker described them, or
/// `None` when it described nothing: a broker that does not know the topic (yet)
/// answers "unknown topic", which librdkafka hands over as a description without
/// entries rather than as an error. Read as settings, it looked like `delete`.
fn described_settings(
    resource: &rdkafka::admin::ConfigResource,
) -> Option<(Option<String>, Option<usize>)> {
    if resource.entries.is_empty() {
        return None;
    }
    let value = |key: &str| resource.get(key).and_then(|e| e.value.clone());
    Some((
        value("cleanup.policy"),
        value("min.insync.replicas").and_then(|v| v.parse::<usize>().ok()),
    ))
}

/// What is wrong with a compacted topic's settings, as the refusal to start.
fn problem_of_compacted(
    name: &str,
    cleanup_policy: Option<&str>,
    replicas: usize,
    min_isr: Option<usize>,
    wanted_replicas: usize,
) -> Result<()> {
    let refuse = |what: String| {
        Err(Error::Config(format!(
            "topic {name} holds state whose loss is silent (subject keys, tables), and {what}. \
             Fix the topic (docs/operations.md, \"Topic settings refused\") and start again"
        )))
    };
    let policy = cleanup_policy.unwrap_or("delete");
    if policy.split(',').any(|p| p.trim() != "compact") {
        return refuse(format!(
            "its cleanup.policy is {policy:?}: retention would delete its records. It must be \
             \"compact\" only (kafka-configs --alter --entity-type topics --entity-name {name} \
             --add-config cleanup.policy=compact)"
        ));
    }
    if replicas < wanted_replicas {
        return refuse(format!(
            "it has {replicas} replica(s) where topics.replication_factor asks for \
             {wanted_replicas}: reassign its partitions to more brokers"
        ));
    }
    if replicas >= 2 && min_isr.unwrap_or(1) < 2 {
        return refuse(format!(
            "its min.insync.replicas is {}: with {replicas} replicas, a write acknowledged by \
             one broker alone can be lost. Set it to 2 or more",
            min_isr.unwrap_or(1)
        ));
    }
    Ok(())
}

/// Creates the topics that do not exist yet. Existing topics are left as they are.
async fn create_topics(
    admin: &Arc<AdminClient<DefaultClientContext>>,
    cfg: &TopicsConfig,
    names: &[(String, TopicKind)],
) -> Result<()> {
    let retention = cfg.events_retention_ms.to_string();
    // Segments roll daily at most, so a record is deleted at most a day after its
    // retention: the subject keys that sealed events expire on that promise.
    let segment = if cfg.events_retention_ms > 0 {
        cfg.events_retention_ms.min(86_400_000)
    } else {
        86_400_000
    }
    .to_string();
    let audit_retention = cfg.audit_retention_ms.to_string();
    let new: Vec<NewTopic<'_>> = names
        .iter()
        .map(|(name, kind)| {
            let partitions = match kind {
                TopicKind::Events => cfg.partitions,
                TopicKind::Table | TopicKind::Audit | TopicKind::Erasable => 1,
            };
            let t = NewTopic::new(
                name,
                partitions,
                TopicReplication::Fixed(cfg.replication_factor),
            );
            match kind {
                TopicKind::Events => t
                    .set("retention.ms", &retention)
                    .set("segment.ms", &segment),
                TopicKind::Table => t.set("cleanup.policy", "compact"),
                TopicKind::Audit => t.set("retention.ms", &audit_retention),
                TopicKind::Erasable => t
                    .set("cleanup.policy", "compact")
                    .set("segment.ms", "60000")
                    .set("min.cleanable.dirty.ratio", "0.01")
                    .set("delete.retention.ms", "60000"),
            }
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let mut last_err = None;
    for attempt in 0..10 {
        match admin.create_topics(new.iter(), &opts).await {
            Ok(results) => {
                for r in results {
                    match r {
                        Ok(name) => info!(topic = %name, "created topic"),
                        Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((name, code)) => {
                            return Err(Error::Broker(format!("creating topic {name}: {code}")));
                        }
                    }
                }
                return wait_for_metadata(
                    admin.clone(),
                    names.iter().map(|(n, _)| n.clone()).collect(),
                )
                .await;
            }
            Err(e) => {
                warn!(attempt, error = %e, "creating topics failed, retrying");
                last_err = Some(e);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Err(Error::Kafka(last_err.expect("at least one attempt failed")))
}

/// Topic creation is asynchronous in Kafka: waits until the brokers' metadata shows every
/// topic with a leader for each partition. A consumer that subscribed earlier would not
/// see a missing topic until its next metadata refresh.
async fn wait_for_metadata(
    admin: Arc<AdminClient<DefaultClientContext>>,
    names: Vec<String>,
) -> Result<()> {
    for _ in 0..120 {
        let (a, wanted) = (admin.clone(), names.clone());
        let ready = tokio::task::spawn_blocking(move || {
            match a.inner().fetch_metadata(None, Duration::from_secs(5)) {
                Ok(md) => wanted.iter().all(|name| {
                    md.topics().iter().any(|t| {
                        t.name() == name.as_str()
                            && t.error().is_none()
                            && !t.partitions().is_empty()
                            && t.partitions().iter().all(|p| p.leader() >= 0)
                    })
                }),
                Err(_) => false,
            }
        })
        .await
        .unwrap_or(false);
        if ready {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(Error::Broker(format!(
        "topics {names:?} did not appear in the brokers' metadata within 30 s"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The audit's finding: a pre-created keys topic with `delete` retention loses
    /// subject keys silently. Such topics are refused at start.
    #[test]
    fn compacted_topics_with_unsafe_settings_are_refused() {
        let ok = |p, r, isr, want| problem_of_compacted("t.privacy.keys", p, r, isr, want);
        ok(Some("compact"), 1, Some(1), 1).unwrap();
        ok(Some("compact"), 3, Some(2), 3).unwrap();
        for (policy, replicas, isr, want, says) in [
            (Some("delete"), 1, Some(1), 1, "cleanup.policy"),
            (Some("compact,delete"), 1, Some(1), 1, "cleanup.policy"),
            (None, 1, Some(1), 1, "cleanup.policy"),
            (Some("compact"), 1, Some(1), 3, "replica"),
            (Some("compact"), 3, Some(1), 3, "min.insync.replicas"),
        ] {
            let err = ok(policy, replicas, isr, want).unwrap_err().to_string();
            assert!(
                err.contains(says) && err.contains("t.privacy.keys"),
                "{err}"
            );
        }
    }

    /// CI's failover run: a broker that did not know the just-created definitions
    /// topic yet answered with no settings, and start-up refused the topic as
    /// `cleanup.policy = "delete"`. No settings is "ask again", not a setting.
    #[test]
    fn a_description_without_settings_is_not_read_as_a_policy() {
        use rdkafka::admin::{ConfigEntry, ConfigResource, ConfigSource, OwnedResourceSpecifier};
        let described = |entries: Vec<(&str, &str)>| ConfigResource {
            specifier: OwnedResourceSpecifier::Topic("t.profiles.definitions".into()),
            entries: entries
                .into_iter()
                .map(|(name, value)| ConfigEntry {
                    name: name.into(),
                    value: Some(value.into()),
                    source: ConfigSource::DynamicTopic,
                    is_read_only: false,
                    is_default: false,
                    is_sensitive: false,
                })
                .collect(),
        };
        assert_eq!(described_settings(&described(vec![])), None);
        assert_eq!(
            described_settings(&described(vec![
                ("cleanup.policy", "delete"),
                ("min.insync.replicas", "2"),
            ])),
            Some((Some("delete".to_string()), Some(2)))
        );
    }
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    /// Settings for librdkafka's mock cluster, with one extra property.
    fn mock_config(
        mock: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
        (key, value): (&str, &str),
    ) -> KafkaConfig {
        KafkaConfig {
            bootstrap: mock.bootstrap_servers(),
            fetch_wait_max_ms: 10,
            linger_ms: 0,
            message_timeout_ms: 5000,
            group_instance_id: None,
            properties: [(key.to_string(), value.to_string())].into(),
        }
    }

    /// Keyed records land where [`partition_of`] says: profiles relies on it to know
    /// which profiles its partitions hold.
    #[tokio::test]
    async fn keyed_records_land_on_the_partition_partition_of_computes() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("placed", 7, 1).unwrap();
        let cfg = mock_config(&mock, ("partitioner", "murmur2"));
        let producer = Producer::new(&cfg, "placement-test").unwrap();
        assert_eq!(partition_count(&cfg, "placed").await.unwrap(), 7);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..200 {
            let key = format!("{:032x}", (i as u128).wrapping_mul(0x9e3779b97f4a7c15));
            let (partition, _) = producer.send("placed", key.as_bytes(), b"x").await.unwrap();
            assert_eq!(partition, partition_of(key.as_bytes(), 7), "key {key}");
            seen.insert(partition);
        }
        assert_eq!(seen.len(), 7, "keys spread over every partition");
    }

    /// A fatal producer error (forced here with librdkafka's mock cluster and the
    /// gapless guarantee) is never reported as delivered, and the next send goes
    /// through a rebuilt producer.
    #[tokio::test]
    async fn a_fatal_error_fails_the_send_and_the_producer_is_rebuilt() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("t", 1, 1).unwrap();
        let cfg = mock_config(&mock, ("enable.gapless.guarantee", "true"));
        let producer = Producer::new(&cfg, "fatal-test").unwrap();
        let registry = Registry::new();
        producer.register_metrics(&registry, "test").unwrap();
        producer
            .send("t", b"k", b"ok")
            .await
            .expect("the first send is delivered");

        mock.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_PRODUCER_EPOCH],
        );
        let err = producer.send("t", b"k", b"lost?").await.unwrap_err();
        assert!(matches!(err, ProduceError::Unavailable(_)), "{err:?}");
        assert_eq!(
            producer.rebuilds(),
            1,
            "the fatal error made it build a new producer"
        );
        assert!(producer.current().producer.client().fatal_error().is_none());
        let exported = registry
            .gather()
            .iter()
            .find(|m| m.name() == "tessera_test_producer_rebuilds_total")
            .map(|m| m.get_metric()[0].get_counter().get_value());
        assert_eq!(exported, Some(1.0), "the rebuild is exported");

        mock.clear_request_errors(RDKafkaApiKey::Produce);
        producer
            .send("t", b"k", b"again")
            .await
            .expect("the rebuilt producer delivers");
    }
}
