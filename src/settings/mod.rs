//! One typed configuration, loaded once: built-in defaults, then the config
//! file, then `LEADSCORE__SECTION__KEY` environment variables. Every problem
//! is collected and reported together, each under its setting's name.
//! Nothing else in leadscore reads the environment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::decode::Format;
use crate::engine::Rules;
use crate::event::Source;

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Kafka connection, topics and client properties.
    pub kafka: KafkaSettings,
    /// State store.
    pub redis: RedisSettings,
    /// In-memory state: limits, retention, de-duplication.
    pub state: StateSettings,
    /// Event time across the input topics: the watermark.
    pub event_time: EventTimeSettings,
    /// Processing threads.
    pub processing: ProcessingSettings,
    /// Scoring rules.
    pub scoring: ScoringSettings,
    /// Confluent Schema Registry (for `avro-registry` topics).
    pub schema_registry: SchemaRegistrySettings,
    /// HTTP server.
    pub http: HttpSettings,
    /// Shutdown and rebalance draining.
    pub shutdown: ShutdownSettings,
    /// Logging.
    pub log: LogSettings,
}

/// Kafka settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Consumer group id.
    pub group_id: String,
    /// Topic names.
    pub topics: TopicSettings,
    /// Wire format per input topic and for the outputs.
    pub formats: FormatSettings,
    /// Most messages handled per poll batch.
    pub batch_max_messages: usize,
    /// Largest payload copied into a dead letter; longer ones are cut, with
    /// their original size and hash in headers.
    pub dead_letter_max_bytes: usize,
    /// Extra librdkafka properties for the consumer (e.g. `"security.protocol" = "SASL_SSL"`).
    /// From the environment, `_` in the key becomes `.`.
    pub consumer: BTreeMap<String, String>,
    /// Extra librdkafka properties for the producer.
    pub producer: BTreeMap<String, String>,
}

/// librdkafka's default `session.timeout.ms`.
const SESSION_TIMEOUT_MS: u64 = 45_000;

impl KafkaSettings {
    /// A consumer timeout in ms as set in `kafka.consumer`, else `default`
    /// (librdkafka's).
    pub fn consumer_ms(&self, name: &str, default: u64) -> u64 {
        self.consumer
            .get(name)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(default)
    }

    /// The consumer's `session.timeout.ms`.
    pub fn session_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.consumer_ms("session.timeout.ms", SESSION_TIMEOUT_MS))
    }
}

impl Default for KafkaSettings {
    fn default() -> Self {
        KafkaSettings {
            brokers: "127.0.0.1:9092".into(),
            group_id: "leadscore".into(),
            topics: TopicSettings::default(),
            formats: FormatSettings::default(),
            batch_max_messages: 8192,
            dead_letter_max_bytes: 65_536,
            consumer: BTreeMap::new(),
            producer: BTreeMap::new(),
        }
    }
}

/// Topic names.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSettings {
    /// Website events.
    pub web: String,
    /// Ad-pixel events.
    pub adpixel: String,
    /// Email engagement events.
    pub email: String,
    /// CRM events.
    pub crm: String,
    /// Output: segment changes.
    pub segment_changes: String,
    /// Output: hand-offs to sales.
    pub handoffs: String,
    /// Output: rejected input.
    pub dead_letter: String,
}

impl Default for TopicSettings {
    fn default() -> Self {
        TopicSettings {
            web: "events.web".into(),
            adpixel: "events.adpixel".into(),
            email: "events.email".into(),
            crm: "events.crm".into(),
            segment_changes: "leads.segment-changes".into(),
            handoffs: "leads.sales-handoffs".into(),
            dead_letter: "leads.dead-letter".into(),
        }
    }
}

impl TopicSettings {
    /// The input topic of each source family.
    pub fn inputs(&self) -> [(Source, &str); 4] {
        [
            (Source::Web, &self.web),
            (Source::Adpixel, &self.adpixel),
            (Source::Email, &self.email),
            (Source::Crm, &self.crm),
        ]
    }

    /// The three output topics.
    pub fn outputs(&self) -> [&str; 3] {
        [&self.segment_changes, &self.handoffs, &self.dead_letter]
    }
}

/// Wire formats.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FormatSettings {
    /// Format of the web topic.
    pub web: Format,
    /// Format of the ad-pixel topic.
    pub adpixel: Format,
    /// Format of the email topic.
    pub email: Format,
    /// Format of the CRM topic.
    pub crm: Format,
    /// Format of the segment-change and hand-off topics.
    pub outputs: Format,
}

impl FormatSettings {
    /// The format of a source family's topic.
    pub fn of(&self, source: Source) -> Format {
        match source {
            Source::Web => self.web,
            Source::Adpixel => self.adpixel,
            Source::Email => self.email,
            Source::Crm => self.crm,
        }
    }
}

/// Redis settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// Connection URL, `redis://[user:password@]host:port/db` (`rediss://` for
    /// TLS). In cluster mode, the seed nodes, comma-separated.
    pub url: String,
    /// `single` (one server, or a primary behind a failover proxy) or `cluster` (Redis Cluster).
    pub mode: RedisMode,
    /// TLS: a PEM file of the CA that signed the server's certificate.
    pub tls_ca_file: Option<PathBuf>,
    /// TLS: a PEM client certificate, for servers that ask for one.
    pub tls_cert_file: Option<PathBuf>,
    /// TLS: the PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Start even if Redis may evict keys (`maxmemory-policy` other than
    /// `noeviction`): evicted state is lost state. Off by default.
    pub allow_eviction: bool,
    /// Prefix of every key leadscore writes.
    pub key_prefix: String,
    /// Write changed state at least this often (and then commit the offsets
    /// it covers). Longer: a lead changed several times in between is
    /// written once; a crash re-reads more (never counting it twice).
    pub flush_interval_ms: u64,
    /// Also write as soon as this many leads are changed (per worker thread).
    /// A shard over its share of the memory limit writes at once.
    pub flush_max_dirty: usize,
    /// Keys per Redis command or script call (reads; single-server writes).
    pub pipeline_batch: usize,
    /// Give up one Redis call after this long (it is retried).
    pub timeout_ms: u64,
    /// Timers read per page when a shard's clock reaches the end of those in memory.
    pub timer_page: usize,
}

/// How leadscore talks to Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "String")]
pub enum RedisMode {
    /// One server.
    Single,
    /// A Redis Cluster (each shard's keys share one hash slot).
    Cluster,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            url: "redis://127.0.0.1:6379/0".into(),
            mode: RedisMode::Single,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            allow_eviction: false,
            key_prefix: "leadscore:".into(),
            flush_interval_ms: 1000,
            flush_max_dirty: 200_000,
            pipeline_batch: 1000,
            timeout_ms: 5000,
            timer_page: 10_000,
        }
    }
}

/// In-memory state settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSettings {
    /// Where state is kept: `redis`, or `memory` (lost on restart; demo and tests).
    pub backend: Backend,
    /// How many recent event ids each lead remembers for de-duplication (0–255).
    pub dedup_window: usize,
    /// How many recent counted events each lead keeps for `/explain` (0–255).
    pub explain_window: usize,
    /// Most leads held in memory per instance; beyond it, clean leads are
    /// evicted and reloaded from Redis on their next event.
    pub max_leads_in_memory: usize,
    /// Most megabytes of lead state held in memory per instance.
    pub max_memory_mb: usize,
    /// Leads (and anonymous visitors) with no event for this long, and decayed
    /// below `expire_below`, are deleted (`0s`: never). Opt-outs, customers,
    /// opportunities and suppressed leads are kept.
    #[serde(with = "days")]
    pub retention: std::time::Duration,
    /// "Decayed to nothing": engagement below this many points.
    pub expire_below: f64,
    /// Binary format lead states are written in: 5 (this release's), or 4
    /// or 3 while a rolling upgrade still runs members of a release that
    /// reads only up to that. All three are always read.
    pub format_version: u8,
}

impl Default for StateSettings {
    fn default() -> Self {
        StateSettings {
            backend: Backend::Redis,
            dedup_window: 16,
            explain_window: 16,
            max_leads_in_memory: 2_000_000,
            max_memory_mb: 1024,
            retention: std::time::Duration::from_secs(180 * 86_400),
            expire_below: 1.0,
            format_version: crate::engine::codec::FORMAT_VERSION,
        }
    }
}

/// Event time across a shard's input topics.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventTimeSettings {
    /// Disorder tolerated within one input partition: events up to this much
    /// older than their topic's newest are still merged in event-time order.
    /// Transitions wait this long behind the slowest input.
    pub allowed_lateness_ms: u64,
    /// An input with nothing pending and nothing new for this long stops
    /// holding the others back; when all of a shard's inputs are idle its
    /// clock follows the wall clock (less the allowed lateness), so quiet
    /// leads still decay. 0: an input stops holding them back as soon as it
    /// is caught up (nothing queued, nothing left in the broker).
    pub idle_timeout_ms: u64,
    /// Events dated further than this after their message's broker timestamp
    /// are dead-lettered (`contract`), and no shard clock runs further ahead
    /// of the wall clock.
    pub future_tolerance_ms: u64,
}

impl Default for EventTimeSettings {
    fn default() -> Self {
        EventTimeSettings {
            allowed_lateness_ms: 0,
            idle_timeout_ms: 1_000,
            future_tolerance_ms: 300_000,
        }
    }
}

/// Processing threads.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessingSettings {
    /// Worker threads; each owns a share of the shards (0: one per CPU core).
    pub workers: usize,
}

/// The Confluent Schema Registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaRegistrySettings {
    /// Base URL, e.g. `http://schema-registry:8081` (required for `avro-registry` topics).
    pub url: Option<String>,
    /// Basic-auth user.
    pub username: Option<String>,
    /// Basic-auth password.
    pub password: Option<String>,
    /// A PEM CA file for an `https://` registry with a private CA.
    pub ca_file: Option<PathBuf>,
    /// Give up one registry call after this long (it is retried).
    pub timeout_ms: u64,
}

impl Default for SchemaRegistrySettings {
    fn default() -> Self {
        SchemaRegistrySettings {
            url: None,
            username: None,
            password: None,
            ca_file: None,
            timeout_ms: 5000,
        }
    }
}

/// State backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "String")]
pub enum Backend {
    /// Redis, write-behind.
    Redis,
    /// Memory only.
    Memory,
}

/// Scoring settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoringSettings {
    /// Rules file; omitted: the built-in default rules.
    pub rules_file: Option<PathBuf>,
}

/// HTTP settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Listen address for /metrics, /healthz, /readyz and /v1/leads.
    pub listen: String,
    /// When set, `/v1/*` requires `Authorization: Bearer <token>`
    /// (`/metrics`, `/healthz`, `/readyz` and `/openapi.json` stay open).
    pub auth_token: Option<String>,
    /// Most open connections; more wait in the listen queue.
    pub max_connections: usize,
    /// A connection that sends no complete request header for this long
    /// (including an idle keep-alive connection) is closed.
    pub header_read_timeout_ms: u64,
    /// Longest time one request may take.
    pub request_timeout_ms: u64,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            listen: "0.0.0.0:8080".into(),
            auth_token: None,
            max_connections: 4096,
            header_read_timeout_ms: 5_000,
            request_timeout_ms: 10_000,
        }
    }
}

/// Shutdown settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    /// Longest a drain (on shutdown or partition revoke) may take: below the
    /// consumer's `session.timeout.ms` (45 s by default) and at most half its
    /// `max.poll.interval.ms` (300 s by default), since a revocation drains
    /// inside the rebalance callback.
    pub drain_timeout_ms: u64,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        ShutdownSettings {
            drain_timeout_ms: 20_000,
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// Filter, in `tracing` env-filter syntax (e.g. `info,leadscore=debug`).
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "String")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A duration written as whole days when it is (`180days`, as the README
/// writes the retention, not humantime's `5months 27days 19h 12m`), else as
/// humantime writes it; read by humantime either way.
mod days {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        let secs = d.as_secs();
        if d.subsec_nanos() == 0 && secs > 0 && secs.is_multiple_of(86_400) {
            s.serialize_str(&format!("{}days", secs / 86_400))
        } else {
            humantime_serde::serialize(d, s)
        }
    }

    /// humantime's own reason (`time unit needed, for example 3600sec or
    /// 3600ms`), which serde's `expected a duration` leaves out.
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration: {e} (write it as, e.g., \"180days\" or \"12h\")"
            ))
        })
    }
}

/// The environment variable that set the setting a problem is about (the
/// setting's path before the first `: `), if one did. Names are compared
/// with every `_` and `__` read as a level, so that a librdkafka property
/// (`kafka.consumer.no.such.prop`) matches the variable that set it
/// (`LEADSCORE__KAFKA__CONSUMER__NO_SUCH_PROP`).
fn set_by<'a>(problem: &str, env_names: &'a [String]) -> Option<&'a String> {
    let path = problem.split(": ").next()?.split(' ').next()?;
    let dotted = |s: &str| s.to_ascii_lowercase().replace("__", ".").replace('_', ".");
    let want = dotted(&format!("leadscore.{path}"));
    env_names.iter().find(|name| {
        let have = dotted(name);
        have == want || have.starts_with(&format!("{want}."))
    })
}

/// The value named `name` among `options` (a setting's possible values, as
/// written in the configuration), or an error that lists them: the
/// configuration reader's own message names the Rust type instead.
pub(crate) fn one_of<T: Copy>(name: &str, options: &[(&str, T)]) -> Result<T, String> {
    options
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            format!("{name:?} is not one of: {}", names.join(", "))
        })
}

impl TryFrom<String> for LogFormat {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        one_of(&s, &[("text", LogFormat::Text), ("json", LogFormat::Json)])
    }
}

impl TryFrom<String> for Backend {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        one_of(
            &s,
            &[("redis", Backend::Redis), ("memory", Backend::Memory)],
        )
    }
}

impl TryFrom<String> for RedisMode {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        one_of(
            &s,
            &[
                ("single", RedisMode::Single),
                ("cluster", RedisMode::Cluster),
            ],
        )
    }
}

/// Every problem found while loading settings.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct SettingsError(pub Vec<String>);

/// Settings plus the compiled rules they name.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The settings.
    pub settings: Settings,
    /// The rules.
    pub rules: Arc<Rules>,
}

const ENV_PREFIX: &str = "LEADSCORE__";

impl Settings {
    /// Loads defaults → `file` → environment (`vars`, usually `std::env::vars()`),
    /// then validates everything, including the rules file.
    pub fn load(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Loaded, SettingsError> {
        let mut problems = Vec::new();
        // Layers, lowest first: built-in defaults, the file, the environment.
        let defaults = toml::to_string(&Settings::default()).expect("defaults serialize");
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(&defaults, config::FileFormat::Toml));
        if let Some(path) = file {
            let unreadable = match std::fs::metadata(path) {
                Err(e) => Some(e.to_string()),
                Ok(m) if m.is_dir() => Some("it is a directory".into()),
                Ok(_) => std::fs::File::open(path).err().map(|e| e.to_string()),
            };
            if let Some(why) = unreadable {
                return Err(SettingsError(vec![format!(
                    "{}: cannot read the config file: {why}",
                    path.display()
                )]));
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        let mut env = config::Map::new();
        for (key, value) in vars {
            if !key.starts_with(ENV_PREFIX) {
                continue;
            }
            if key[ENV_PREFIX.len()..].split("__").any(str::is_empty) {
                problems.push(format!("{key}: malformed variable name"));
                continue;
            }
            env.insert(key, value);
        }
        let env_names: Vec<String> = env.keys().cloned().collect();
        // `__` separates levels; values stay strings (a group id "123" stays
        // a string) and are converted only where a setting is a number or a
        // boolean.
        builder = builder.add_source(
            config::Environment::with_prefix("LEADSCORE")
                .prefix_separator("__")
                .separator("__")
                .source(Some(env)),
        );
        let sections: BTreeMap<String, config::Value> =
            match builder.build().and_then(|c| c.try_deserialize()) {
                Ok(m) => m,
                Err(e) => return Err(SettingsError(vec![e.to_string()])),
            };

        let default_sections: BTreeMap<String, config::Value> = config::Config::builder()
            .add_source(config::File::from_str(&defaults, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .unwrap_or_default();
        let mut settings = Settings::default();
        for (section, value) in sections {
            let at = section.as_str();
            let v = value;
            let d = default_sections.get(at);
            let result = match at {
                "kafka" => section_into(v, d, at, &mut settings.kafka),
                "redis" => section_into(v, d, at, &mut settings.redis),
                "state" => section_into(v, d, at, &mut settings.state),
                "event_time" => section_into(v, d, at, &mut settings.event_time),
                "processing" => section_into(v, d, at, &mut settings.processing),
                "scoring" => section_into(v, d, at, &mut settings.scoring),
                "schema_registry" => section_into(v, d, at, &mut settings.schema_registry),
                "http" => section_into(v, d, at, &mut settings.http),
                "shutdown" => section_into(v, d, at, &mut settings.shutdown),
                "log" => section_into(v, d, at, &mut settings.log),
                other => Err(vec![format!(
                    "{other}: unknown section (expected kafka, redis, state, event_time, processing, scoring, schema_registry, http, shutdown, log)"
                )]),
            };
            if let Err(e) = result {
                problems.extend(e);
            }
        }
        // librdkafka properties set from the environment arrive with `_`
        // where the property has `.` (LEADSCORE__KAFKA__CONSUMER__SASL_PASSWORD).
        for map in [&mut settings.kafka.consumer, &mut settings.kafka.producer] {
            *map = std::mem::take(map)
                .into_iter()
                .map(|(k, v)| {
                    if k.contains('.') {
                        (k, v)
                    } else {
                        (k.replace('_', "."), v)
                    }
                })
                .collect();
        }
        problems.extend(settings.check());
        // A problem with a value from the environment names its variable:
        // the reader merged it with the file's and lost where it came from.
        for p in &mut problems {
            if let Some(var) = set_by(p, &env_names) {
                p.push_str(&format!(" (set by {var})"));
            }
        }
        let rules = match &settings.scoring.rules_file {
            None => Some(Rules::default_rules()),
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => match Rules::from_toml(&text) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        problems.extend(
                            e.0.into_iter()
                                .map(|p| format!("scoring.rules_file ({}): {p}", path.display())),
                        );
                        None
                    }
                },
                Err(e) => {
                    problems.push(format!("scoring.rules_file: {}: {e}", path.display()));
                    None
                }
            },
        };
        match rules {
            Some(rules) if problems.is_empty() => Ok(Loaded {
                settings,
                rules: Arc::new(rules),
            }),
            _ => Err(SettingsError(problems)),
        }
    }

    /// Cross-field checks.
    fn check(&self) -> Vec<String> {
        let mut p = Vec::new();
        let k = &self.kafka;
        if k.brokers.trim().is_empty() {
            p.push("kafka.brokers: must not be empty".into());
        }
        if k.group_id.trim().is_empty() {
            p.push("kafka.group_id: must not be empty".into());
        }
        let mut names: Vec<&str> = k.topics.inputs().iter().map(|(_, t)| *t).collect();
        names.extend(k.topics.outputs());
        for (i, n) in names.iter().enumerate() {
            if n.is_empty() {
                p.push("kafka.topics: topic names must not be empty".into());
            } else if names[..i].contains(n) {
                p.push(format!("kafka.topics: {n:?} is used twice"));
            }
        }
        if !(1..=1_000_000).contains(&k.batch_max_messages) {
            p.push("kafka.batch_max_messages: must be 1..=1000000".into());
        }
        let mut each_valid = true;
        for (map, name) in [(&k.consumer, "consumer"), (&k.producer, "producer")] {
            for (key, value) in map {
                if OWNED_PROPERTIES.contains(&key.as_str()) {
                    p.push(format!(
                        "kafka.{name}.{key}: set by leadscore itself and cannot be overridden"
                    ));
                } else if let Some((_, why)) = REFUSED_PROPERTIES.iter().find(|(k, _)| k == key) {
                    p.push(format!("kafka.{name}.{key}: {why}"));
                } else if let Some(why) = librdkafka_refuses(key, value) {
                    p.push(format!("kafka.{name}.{key}: {why}"));
                } else {
                    continue;
                }
                each_valid = false;
            }
        }
        // Properties librdkafka takes one by one but not together (acks=0
        // with leadscore's idempotent producer, a SASL mechanism this build
        // has no provider for) fail only as the client is made.
        if each_valid {
            for (config, name) in [
                (crate::kafka::consumer_config(k), "consumer"),
                (crate::kafka::producer_config(k), "producer"),
            ] {
                if let Some(why) = client_refuses(config, name == "consumer") {
                    // Not "kafka.{name}: …": no one variable set this.
                    p.push(format!("the kafka.{name} properties together: {why}"));
                }
            }
        }
        if !(64..=16 * 1024 * 1024).contains(&k.dead_letter_max_bytes) {
            p.push("kafka.dead_letter_max_bytes: must be 64..=16777216".into());
        }
        let r = &self.redis;
        let urls: Vec<&str> = match r.mode {
            RedisMode::Single => vec![r.url.as_str()],
            RedisMode::Cluster => r.url.split(',').map(str::trim).collect(),
        };
        // A list, not a comma in a password (RFC 3986 allows one there).
        let listed = r.url.split(',').skip(1).any(|u| {
            let u = u.trim_start();
            ["redis://", "rediss://", "unix://"]
                .iter()
                .any(|scheme| u.starts_with(scheme))
        });
        if r.mode == RedisMode::Single && listed {
            p.push(
                "redis.url: a comma-separated list of URLs is a cluster's nodes: set redis.mode = \"cluster\" (single mode takes one URL)"
                    .into(),
            );
        }
        for url in &urls {
            let ok = url.starts_with("redis://")
                || url.starts_with("rediss://")
                || (r.mode == RedisMode::Single
                    && (url.starts_with("unix://") || url.starts_with("redis+unix://")));
            if !ok {
                p.push(format!(
                    "redis.url: {:?} is not a {}",
                    mask_url(url),
                    if r.mode == RedisMode::Cluster {
                        "redis:// or rediss:// URL (cluster mode takes a comma-separated list of them)"
                    } else {
                        "redis://, rediss:// or unix:// URL"
                    }
                ));
            }
        }
        for (name, file) in [
            ("redis.tls_ca_file", &r.tls_ca_file),
            ("redis.tls_cert_file", &r.tls_cert_file),
            ("redis.tls_key_file", &r.tls_key_file),
            ("schema_registry.ca_file", &self.schema_registry.ca_file),
        ] {
            if let Some(f) = file
                && std::fs::metadata(f).is_err()
            {
                p.push(format!("{name}: cannot read {}", f.display()));
            }
        }
        if r.tls_cert_file.is_some() != r.tls_key_file.is_some() {
            p.push("redis.tls_cert_file and redis.tls_key_file go together".into());
        }
        let tls_files = r.tls_ca_file.is_some() || r.tls_cert_file.is_some();
        if tls_files && urls.iter().any(|u| !u.starts_with("rediss://")) {
            p.push(
                "redis.tls_ca_file / tls_cert_file: TLS needs rediss:// URLs in redis.url".into(),
            );
        }
        if r.key_prefix.contains(['{', '}']) {
            p.push(
                "redis.key_prefix: must not contain { or } (leadscore adds a hash tag per shard)"
                    .into(),
            );
        }
        if !(1..=1_000_000).contains(&r.timer_page) {
            p.push("redis.timer_page: must be 1..=1000000".into());
        }
        if r.flush_interval_ms == 0 || r.flush_interval_ms > 60_000 {
            p.push("redis.flush_interval_ms: must be 1..=60000".into());
        }
        if r.flush_max_dirty == 0 {
            p.push("redis.flush_max_dirty: must be at least 1".into());
        }
        if r.pipeline_batch == 0 || r.pipeline_batch > 100_000 {
            p.push("redis.pipeline_batch: must be 1..=100000".into());
        }
        if r.timeout_ms == 0 {
            p.push("redis.timeout_ms: must be at least 1".into());
        }
        if self.state.dedup_window > 255 {
            p.push("state.dedup_window: at most 255".into());
        }
        if self.state.explain_window > 255 {
            p.push("state.explain_window: at most 255".into());
        }
        if !crate::engine::codec::supported(self.state.format_version) {
            p.push(format!(
                "state.format_version: must be {}, {} or {} (got {})",
                crate::engine::codec::FORMAT_V3,
                crate::engine::codec::FORMAT_V4,
                crate::engine::codec::FORMAT_VERSION,
                self.state.format_version
            ));
        }
        if self.state.max_leads_in_memory == 0 {
            p.push("state.max_leads_in_memory: must be at least 1".into());
        }
        if !(1..=1 << 24).contains(&self.state.max_memory_mb) {
            // Above 16 TiB it can only be a unit mistake (bytes for megabytes).
            p.push("state.max_memory_mb: must be 1..=16777216 (16 TiB)".into());
        }
        if !(self.state.expire_below.is_finite() && self.state.expire_below >= 0.0) {
            p.push("state.expire_below: must be a finite number ≥ 0".into());
        }
        let e = &self.event_time;
        if e.future_tolerance_ms > 7 * 86_400_000 {
            p.push("event_time.future_tolerance_ms: at most 7 days".into());
        }
        if e.allowed_lateness_ms > 7 * 86_400_000 {
            p.push("event_time.allowed_lateness_ms: at most 7 days".into());
        }
        // Beyond that a quiet partition would not decay for days: a unit
        // mistake (seconds written as milliseconds × 1000), not a choice.
        if e.idle_timeout_ms > 86_400_000 {
            p.push("event_time.idle_timeout_ms: at most 1 day".into());
        }
        if !(1..=300_000).contains(&self.schema_registry.timeout_ms) {
            // 0 timed every request out at once: every Avro input held.
            p.push("schema_registry.timeout_ms: must be 1..=300000".into());
        }
        if self.processing.workers > 256 {
            p.push("processing.workers: at most 256".into());
        }
        let registry_needed = Source::ALL
            .iter()
            .map(|s| k.formats.of(*s))
            .chain([k.formats.outputs])
            .any(|f| f == Format::AvroRegistry);
        match &self.schema_registry.url {
            None if registry_needed => p.push(
                "schema_registry.url: required when a topic's format is avro-registry".into(),
            ),
            Some(u) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                p.push(format!(
                    "schema_registry.url: {:?} is not an http(s) URL",
                    mask_url(u)
                ));
            }
            _ => {}
        }
        let h = &self.http;
        if h.max_connections == 0 {
            p.push("http.max_connections: must be at least 1".into());
        }
        for (name, ms) in [
            ("header_read_timeout_ms", h.header_read_timeout_ms),
            ("request_timeout_ms", h.request_timeout_ms),
        ] {
            if ms < 100 {
                p.push(format!("http.{name}: at least 100"));
            }
        }
        if h.auth_token.as_deref().is_some_and(|t| t.trim() != t) {
            // A client cannot send it (a header value is trimmed): every
            // request would get 401. Typically a Secret made with `echo`.
            p.push(
                "http.auth_token: starts or ends with whitespace (a trailing newline?), which no client can send"
                    .into(),
            );
        } else if h.auth_token.as_deref().is_some_and(|t| t.len() < 16) {
            p.push("http.auth_token: use at least 16 characters".into());
        }
        if self.http.listen.parse::<SocketAddr>().is_err() {
            p.push(format!(
                "http.listen: {:?} is not an address like 0.0.0.0:8080",
                self.http.listen
            ));
        }
        let session = k.session_timeout().as_millis() as u64;
        if self.shutdown.drain_timeout_ms == 0 || self.shutdown.drain_timeout_ms >= session {
            p.push(format!(
                "shutdown.drain_timeout_ms: must be above 0 and below the consumer session.timeout.ms ({session})"
            ));
        }
        // A revocation drains inside the rebalance callback: a drain that
        // outlasts the poll interval gets the member dropped from the group.
        let poll = k.consumer_ms("max.poll.interval.ms", 300_000);
        if self.shutdown.drain_timeout_ms.saturating_mul(2) > poll {
            p.push(format!(
                "shutdown.drain_timeout_ms ({}): must be at most half the consumer max.poll.interval.ms ({poll}); \
                 a revocation waits up to the drain timeout inside the rebalance callback",
                self.shutdown.drain_timeout_ms
            ));
        }
        if let Some(why) = log_level_problem(&self.log.level) {
            p.push(format!("log.level: {why}"));
        }
        p
    }

    /// The settings as TOML with secrets masked (for `check-config`).
    pub fn to_masked_toml(&self) -> String {
        let mut copy = self.clone();
        copy.redis.url = copy
            .redis
            .url
            .split(',')
            .map(mask_url)
            .collect::<Vec<_>>()
            .join(",");
        let hide = |v: &mut Option<String>| {
            if v.is_some() {
                *v = Some("********".into());
            }
        };
        hide(&mut copy.http.auth_token);
        hide(&mut copy.schema_registry.password);
        copy.schema_registry.url = copy.schema_registry.url.as_deref().map(mask_url);
        for map in [&mut copy.kafka.consumer, &mut copy.kafka.producer] {
            for (k, v) in map.iter_mut() {
                if is_secret(k) {
                    *v = "********".into();
                }
            }
        }
        toml::to_string_pretty(&copy).unwrap_or_else(|e| format!("# cannot print: {e}"))
    }
}

/// Why librdkafka would refuse a property (unknown, or a value it cannot
/// take), found without connecting anywhere, so that `check-config` says so
/// rather than the client's creation at start.
fn librdkafka_refuses(key: &str, value: &str) -> Option<String> {
    match rdkafka::ClientConfig::new()
        .set(key, value)
        .create_native_config()
    {
        Ok(_) => None,
        Err(rdkafka::error::KafkaError::ClientConfig(_, why, ..)) => Some(why),
        Err(e) => Some(e.to_string()),
    }
}

/// Why a `log.level` filter would not log what it says, if it would not. A
/// directive without `=` must be a level: `tracing`'s filter reads any other
/// word (`warning`, `verbose`) as a target to log at every level, which
/// leaves every other target, leadscore's own errors included, silent.
fn log_level_problem(filter: &str) -> Option<String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    if tracing_subscriber::EnvFilter::try_new(filter).is_err() {
        return Some(format!("{filter:?} is not a valid filter"));
    }
    filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty() && !d.contains('=') && !d.contains('['))
        // tracing also reads 0 (off) to 5 (trace).
        .find(|d| {
            !LEVELS.contains(&d.to_ascii_lowercase().as_str())
                && !matches!(*d, "0" | "1" | "2" | "3" | "4" | "5")
        })
        .map(|d| {
            format!(
                "{d:?} is not a level ({}); a target's level is written target=level",
                LEVELS.join(", ")
            )
        })
}

/// librdkafka properties leadscore sets itself for correctness.
pub const OWNED_PROPERTIES: [&str; 6] = [
    "enable.auto.commit",
    "enable.auto.offset.store",
    "group.id",
    "bootstrap.servers",
    "enable.idempotence",
    "partition.assignment.strategy",
];

/// librdkafka properties leadscore refuses, and why.
const REFUSED_PROPERTIES: [(&str, &str); 1] = [(
    "transactional.id",
    "leadscore does not use Kafka transactions (state and positions are made atomic in Redis), \
     and a transactional producer refuses its sends",
)];

/// Why librdkafka would refuse to make a client of `config` (checks across
/// properties), found without connecting anywhere: the client is made with
/// no brokers and dropped at once.
fn client_refuses(mut config: rdkafka::ClientConfig, consumer: bool) -> Option<String> {
    /// Keeps the unconnected client's log ("no bootstrap.servers") quiet.
    struct Quiet;
    impl rdkafka::ClientContext for Quiet {
        fn log(&self, _: rdkafka::config::RDKafkaLogLevel, _: &str, _: &str) {}
        fn error(&self, _: rdkafka::error::KafkaError, _: &str) {}
    }
    impl rdkafka::consumer::ConsumerContext for Quiet {}
    impl rdkafka::producer::ProducerContext for Quiet {
        type DeliveryOpaque = ();
        fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: ()) {}
    }
    config.set("bootstrap.servers", "");
    let made = if consumer {
        config
            .create_with_context::<_, rdkafka::consumer::BaseConsumer<Quiet>>(Quiet)
            .map(drop)
    } else {
        config
            .create_with_context::<_, rdkafka::producer::BaseProducer<Quiet>>(Quiet)
            .map(drop)
    };
    match made {
        Ok(()) => None,
        Err(rdkafka::error::KafkaError::ClientCreation(why)) => Some(why),
        Err(rdkafka::error::KafkaError::ClientConfig(_, why, ..)) => Some(why),
        Err(e) => Some(e.to_string()),
    }
}

/// Whether a librdkafka property holds a secret.
fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "oauthbearer.config",
        "jaas",
        "key.pem",
        "credential",
        "sasl.kerberos.keytab",
    ]
    .iter()
    .any(|s| k.contains(s))
}

/// Hides the credentials in a URL: user and password before `@`, and
/// `password`/`pass` query parameters (unix-socket URLs).
pub fn mask_url(url: &str) -> String {
    let mut out = match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://********{}", &url[..scheme], &url[at..])
        }
        _ => url.to_owned(),
    };
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let masked: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _))
                    if ["pass", "password", "passwd", "user"]
                        .contains(&k.to_ascii_lowercase().as_str()) =>
                {
                    format!("{k}=********")
                }
                _ => kv.to_owned(),
            })
            .collect();
        out = format!("{head}{}", masked.join("&"));
    }
    out
}

/// Deserializes one section. A bad key (unknown, or a value of the wrong
/// type) is reported and replaced by its default (an unknown one dropped),
/// and the section is tried again, so that every bad key of a section is
/// reported at once and the good ones still reach the cross-field checks.
fn section_into<T: DeserializeOwned>(
    value: config::Value,
    defaults: Option<&config::Value>,
    at: &str,
    target: &mut T,
) -> Result<(), Vec<String>> {
    let mut table = match value.clone().into_table() {
        Ok(t) => t,
        Err(_) => return deserialize_section(value, at, target).map_err(|(p, _)| vec![p]),
    };
    let defaults = defaults
        .and_then(|d| d.clone().into_table().ok())
        .unwrap_or_default();
    let mut problems = Vec::new();
    for (key, value) in table.iter_mut() {
        if let Some(problem) = fraction_for_integer(at, key, value, defaults.get(key)) {
            problems.push(problem);
            if let Some(d) = defaults.get(key) {
                *value = d.clone();
            }
        }
    }
    for _ in 0..=table.len() {
        let value = config::Value::new(None, config::ValueKind::Table(table.clone()));
        match deserialize_section(value, at, target) {
            Ok(()) => break,
            Err((problem, key)) => {
                problems.push(problem);
                let Some(key) = key.filter(|k| table.contains_key(k)) else {
                    break;
                };
                match defaults.get(&key) {
                    Some(d) => table.insert(key, d.clone()),
                    None => table.remove(&key),
                };
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// A number with a fraction where the setting is a whole number: the
/// `config` crate would round `timeout_ms = 1.5` to 2 without a word.
fn fraction_for_integer(
    at: &str,
    key: &str,
    value: &config::Value,
    default: Option<&config::Value>,
) -> Option<String> {
    use config::ValueKind::{Float, I64, I128, U64, U128};
    let (Float(f), Some(I64(_) | I128(_) | U64(_) | U128(_))) =
        (&value.kind, default.map(|d| &d.kind))
    else {
        return None;
    };
    (f.fract() != 0.0 || !f.is_finite())
        .then(|| format!("{at}.{key}: must be a whole number, got {f}"))
}

/// One attempt: the problem and the section key it is about, if known.
fn deserialize_section<T: DeserializeOwned>(
    value: config::Value,
    at: &str,
    target: &mut T,
) -> Result<(), (String, Option<String>)> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => {
            *target = v;
            Ok(())
        }
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            let inner = inner.lines().next().unwrap_or_default().to_owned();
            if path == "." || path.is_empty() {
                // deny_unknown_fields: "unknown field `x`, expected …"
                let key = inner
                    .strip_prefix("unknown field `")
                    .and_then(|r| r.split('`').next())
                    .map(str::to_owned);
                let problem = match &key {
                    Some(k) => format!("{at}.{k}: unknown setting ({inner})"),
                    None => format!("{at}: {inner}"),
                };
                Err((problem, key))
            } else {
                let key = path.split(['.', '[']).next().map(str::to_owned);
                Err((format!("{at}.{path}: {inner}"), key))
            }
        }
    }
}

#[cfg(test)]
mod tests;
