//! Kafka plumbing: client configuration and topic creation here; the
//! consumer group and its rebalances ([`consumer`]), the worker threads that
//! read partition queues and step shards ([`worker`]), what they share
//! ([`runtime`]), the producer ([`sink`]), and partition queues read a
//! batch at a time ([`batch`], the crate's only unsafe code); what the
//! clients report is logged once per cause and interval ([`client_log`]).

pub mod batch;
pub mod client_log;
pub mod consumer;
pub mod runtime;
pub mod sink;
pub mod worker;

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;

use crate::settings::KafkaSettings;

/// Consumer properties: leadscore's own, then the user's pass-through ones.
///
/// Offsets: workers store the offset each durable write covers
/// (`enable.auto.offset.store=false`); the consumer loop commits the stored
/// offsets every second, and the revocation callback commits synchronously
/// before partitions are released (`enable.auto.commit=false`, so that
/// librdkafka has no commit of its own in flight when a member leaves the
/// group and sends LeaveGroup at once). Positions in Redis, written with
/// the state, are what leadscore resumes from.
pub fn consumer_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers)
        .set("group.id", &k.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "1000")
        // librdkafka backs a partition's fetching off for a whole second
        // (the default) once its local queue is "full", which starves a
        // consumer that works in batches; keep it short.
        .set("fetch.queue.backoff.ms", "10")
        .set("client.id", "leadscore");
    for (key, value) in &k.consumer {
        c.set(key, value);
    }
    c
}

/// Producer properties: idempotent, small linger; then the user's pass-through ones.
pub fn producer_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("client.id", "leadscore");
    for (key, value) in &k.producer {
        c.set(key, value);
    }
    c
}

/// Creates topics that do not exist yet (used by the demo, the load generator and tests).
pub async fn create_topics(brokers: &str, topics: &[&str], partitions: i32) -> anyhow::Result<()> {
    create_topics_with(
        ClientConfig::new().set("bootstrap.servers", brokers),
        topics,
        partitions,
    )
    .await
}

/// Creates topics with an admin client of `config`.
pub async fn create_topics_with(
    config: &ClientConfig,
    topics: &[&str],
    partitions: i32,
) -> anyhow::Result<()> {
    let admin: AdminClient<client_log::Quiet> = config.create_with_context(client_log::Quiet)?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    // The request's own timeout too: without it an unreachable broker kept
    // the call waiting for a connection with nothing said (a user probe).
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(15)));
    let results = admin.create_topics(&new, &options).await.map_err(|e| {
        let brokers = config.get("bootstrap.servers").unwrap_or("?");
        anyhow::anyhow!("cannot create topics on {brokers} (is the broker there?): {e}")
    })?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("cannot create topic {topic}: {code}"),
        }
    }
    Ok(())
}
