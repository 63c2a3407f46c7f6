//! The vault on a real broker: keys made by one service's vault, records opened by
//! another's (the privacy flows end to end are in `privacy.rs`).

use tessera_common::topics::Topics;
use tessera_tests::*;

/// Two vaults following a fresh platform's keys topic: one that seals (it makes keys),
/// one that only opens, as another service's.
async fn sealer_and_reader(
    shutdown: &tokio_util::sync::CancellationToken,
) -> (
    std::sync::Arc<tessera_common::vault::Vault>,
    std::sync::Arc<tessera_common::vault::Vault>,
) {
    use std::sync::Arc;
    use tessera_common::kafka::Producer;
    use tessera_common::vault::{Keeping, Vault};

    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path());
    let topics = Topics::new(&cfg.topics);
    tessera_common::kafka::ensure_topics(
        &cfg.kafka,
        &cfg.topics,
        &tessera_common::service::shared_topics(&topics),
    )
    .await
    .unwrap();
    let follow = |name: &'static str, producer: Option<Arc<Producer>>| {
        let (kafka, keys, shutdown) = (cfg.kafka.clone(), topics.keys(), shutdown.clone());
        async move { Vault::follow(&kafka, keys, name, producer, Keeping::in_memory(), shutdown).await }
    };
    let producer = Arc::new(Producer::new(&cfg.kafka, "sealer").unwrap());
    let sealer = follow("sealer", Some(producer)).await.unwrap();
    let reader = follow("reader", None).await.unwrap();
    (sealer, reader)
}

/// A record sealed with a key made a moment ago names how far the keys topic must be
/// read to hold it: another service's vault opens it by reading that far, without
/// asking the broker where the keys topic ends (a round trip on every new person's
/// first record at each hop, issue 26).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_subjects_record_opens_elsewhere_without_asking_where_the_keys_end() {
    use tessera_common::ids::subject_hash;
    use tessera_common::vault::Opened;

    let shutdown = tokio_util::sync::CancellationToken::new();
    let (sealer, reader) = sealer_and_reader(&shutdown).await;
    let asked = reader.end_questions();

    for n in 0..20 {
        let subject = subject_hash(&format!("new-visitor-{n}"));
        let plain = format!("event {n}").into_bytes();
        let sealed = sealer.seal(&subject, &plain).await.unwrap();
        assert_eq!(reader.open(&sealed).await.unwrap(), Opened::Plain(plain));
    }
    assert_eq!(
        reader.end_questions(),
        asked,
        "the reader asked the broker where the keys topic ends"
    );

    shutdown.cancel();
}

/// A new visitor's first page sends several requests at once. Each sealed its event for
/// the same new subject, and each made the subject a key of its own: one key record and
/// one round trip to the broker per request. One key is made, and every record opens
/// elsewhere with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_at_once_for_a_new_subject_make_it_one_key() {
    use tessera_common::ids::subject_hash;
    use tessera_common::vault::Opened;

    let shutdown = tokio_util::sync::CancellationToken::new();
    let (sealer, reader) = sealer_and_reader(&shutdown).await;

    let subject = subject_hash("a-visitor-s-first-page");
    let sealed = futures::future::join_all((0..8).map(|n| {
        let sealer = sealer.clone();
        tokio::spawn(async move { sealer.seal(&subject, format!("event {n}").as_bytes()).await })
    }))
    .await;
    sealer.catch_up().await.unwrap();
    assert_eq!(sealer.keys_of(&[subject]).unwrap().len(), 1, "one key");
    for (n, s) in sealed.into_iter().enumerate() {
        let s = s.unwrap().unwrap();
        assert_eq!(
            reader.open(&s).await.unwrap(),
            Opened::Plain(format!("event {n}").into_bytes())
        );
    }
    shutdown.cancel();
}
