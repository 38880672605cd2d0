//! The Confluent Schema Registry wire format, for topics whose format is
//! `avro-registry`: each message is magic byte 0, the writer schema's id as
//! 4 big-endian bytes, then the Avro datum.
//!
//! On input the writer schema is fetched from the registry by id (once; cached)
//! and the datum is resolved against leadscore's reader schema, so compatible
//! upstream changes keep decoding. An id the registry does not know, or a
//! writer schema leadscore cannot read, makes the message poison (dead-lettered
//! with its reason); any other answer (none, a failure, a refusal such as a
//! rotated credential, a 404 that is not the registry's "schema not found",
//! a page that is not the registry's) is retryable — the worker holds that
//! input and retries, and nothing is dead-lettered. On
//! output, leadscore registers (or finds) its schemas under `<topic>-value`
//! and frames what it produces.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apache_avro::Schema;
use parking_lot::RwLock;

use crate::settings::SchemaRegistrySettings;

/// Why the registry could not give a schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The registry cannot be reached or failed (retryable: hold and retry).
    #[error("schema registry unavailable: {0}")]
    Unavailable(String),
    /// The registry does not know this schema id (poison).
    #[error("schema id {0} is not in the schema registry")]
    UnknownId(u32),
    /// The writer schema cannot be parsed, or leadscore cannot read data
    /// written with it (poison).
    #[error("schema id {id}: {reason}")]
    Unreadable {
        /// The schema id.
        id: u32,
        /// Why.
        reason: String,
    },
    /// The registry refused a request (bad credentials, an incompatible schema).
    #[error("schema registry refused {what}: HTTP {status}: {body}")]
    Refused {
        /// What was asked.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The registry's answer.
        body: String,
    },
}

impl RegistryError {
    /// Whether retrying later may help.
    pub fn retryable(&self) -> bool {
        matches!(self, RegistryError::Unavailable(_))
    }
}

/// The framing's magic byte.
pub const MAGIC: u8 = 0;

/// Frames an Avro datum written with schema `id`.
pub fn frame(id: u32, datum: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + datum.len());
    out.push(MAGIC);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(datum);
    out
}

/// Splits a framed message into its schema id and datum.
pub fn unframe(bytes: &[u8]) -> Result<(u32, &[u8]), String> {
    match bytes {
        [MAGIC, a, b, c, d, rest @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), rest)),
        [m, ..] if *m != MAGIC => Err(format!(
            "unknown magic byte {m} (a Schema Registry frame starts with 0; is the topic's format right?)"
        )),
        _ => Err("shorter than a Schema Registry frame (5 bytes)".into()),
    }
}

/// A client of the registry's REST API, caching schemas by id.
pub struct Registry {
    base: String,
    agent: ureq::Agent,
    auth: Option<String>,
    by_id: RwLock<HashMap<u32, Result<Arc<Schema>, RegistryError>>>,
    /// Ids the registry said it does not know, and when it said so.
    unknown: RwLock<HashMap<u32, Instant>>,
}

/// How long an id the registry does not know is taken as unknown before
/// it is asked again (at most one request a second per such id, however
/// many messages carry it).
pub const UNKNOWN_RETRY: Duration = Duration::from_secs(1);

/// Most unknown ids remembered at once (beyond them, an unknown id is
/// asked for each time it comes).
const UNKNOWN_HELD: usize = 1024;

/// The registry's error code for "schema not found" (Confluent's, also
/// answered by Karapace, Redpanda and Apicurio's compatible API).
const SCHEMA_NOT_FOUND: u64 = 40403;

/// The `error_code` of a registry's error answer, if it is one.
fn error_code(body: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()?
        .get("error_code")?
        .as_u64()
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("base", &crate::settings::mask_url(&self.base))
            .finish_non_exhaustive()
    }
}

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

impl Registry {
    /// A client for the configured registry.
    pub fn new(s: &SchemaRegistrySettings) -> Result<Registry, RegistryError> {
        let base = s
            .url
            .clone()
            .ok_or_else(|| RegistryError::Unavailable("schema_registry.url is not set".into()))?
            .trim_end_matches('/')
            .to_owned();
        let mut config = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(s.timeout_ms)))
            .http_status_as_error(false);
        if let Some(ca) = &s.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| RegistryError::Unavailable(format!("{}: {e}", ca.display())))?;
            let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)))
                    .build(),
            );
        }
        let auth = match (&s.username, &s.password) {
            (Some(u), p) => {
                use base64::Engine as _;
                let token = base64::engine::general_purpose::STANDARD
                    .encode(format!("{u}:{}", p.as_deref().unwrap_or("")));
                Some(format!("Basic {token}"))
            }
            _ => None,
        };
        Ok(Registry {
            base,
            agent: config.build().into(),
            auth,
            by_id: RwLock::new(HashMap::new()),
            unknown: RwLock::new(HashMap::new()),
        })
    }

    fn get(&self, path: &str) -> Result<(u16, String), RegistryError> {
        let mut req = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Accept", CONTENT_TYPE);
        if let Some(a) = &self.auth {
            req = req.header("Authorization", a);
        }
        let mut resp = req
            .call()
            .map_err(|e| RegistryError::Unavailable(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| RegistryError::Unavailable(e.to_string()))?;
        Ok((status, body))
    }

    fn post(&self, path: &str, body: &serde_json::Value) -> Result<(u16, String), RegistryError> {
        let mut req = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Accept", CONTENT_TYPE)
            .header("Content-Type", CONTENT_TYPE);
        if let Some(a) = &self.auth {
            req = req.header("Authorization", a);
        }
        let mut resp = req
            .send(body.to_string().as_bytes())
            .map_err(|e| RegistryError::Unavailable(e.to_string()))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| RegistryError::Unavailable(e.to_string()))?;
        Ok((status, text))
    }

    /// The writer schema of `id`, parsed. A schema, or a schema leadscore
    /// cannot read, is remembered; an id the registry says it does not know
    /// (404 with its error code 40403) is asked again after
    /// [`UNKNOWN_RETRY`] (a registry replica a moment behind, a schema
    /// registered just after its first event). Any other answer says
    /// nothing of the schema — no answer, a failure, a refusal (a rotated
    /// credential), a 404 without the registry's error code (a wrong base
    /// URL), a page that is not JSON (a proxy's) — and is retried: the
    /// message waits, nothing is dead-lettered.
    pub fn schema(&self, id: u32) -> Result<Arc<Schema>, RegistryError> {
        if let Some(found) = self.by_id.read().get(&id) {
            return found.clone();
        }
        if self
            .unknown
            .read()
            .get(&id)
            .is_some_and(|asked| asked.elapsed() < UNKNOWN_RETRY)
        {
            return Err(RegistryError::UnknownId(id));
        }
        let answer = |status: u16, body: &str| {
            format!(
                "schema {id}: HTTP {status}: {}",
                crate::event::truncate(body, 200)
            )
        };
        let result = match self.get(&format!("/schemas/ids/{id}"))? {
            (200, body) => {
                let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| {
                    RegistryError::Unavailable(format!(
                        "{} (not JSON: {e}; is schema_registry.url the registry's?)",
                        answer(200, &body)
                    ))
                })?;
                let Some(text) = v["schema"].as_str() else {
                    return Err(RegistryError::Unavailable(format!(
                        "{} (no schema in it; is schema_registry.url the registry's?)",
                        answer(200, &body)
                    )));
                };
                let kind = v["schemaType"].as_str().unwrap_or("AVRO");
                if kind != "AVRO" {
                    Err(RegistryError::Unreadable {
                        id,
                        reason: format!("schema type {kind}, not AVRO"),
                    })
                } else {
                    Schema::parse_str(text)
                        .map(Arc::new)
                        .map_err(|e| RegistryError::Unreadable {
                            id,
                            reason: e.to_string(),
                        })
                }
            }
            (404, body) if error_code(&body) == Some(SCHEMA_NOT_FOUND) => {
                let mut unknown = self.unknown.write();
                // Bounded however many ids a producer makes up.
                if unknown.len() >= UNKNOWN_HELD {
                    unknown.retain(|_, asked| asked.elapsed() < UNKNOWN_RETRY);
                }
                if unknown.len() < UNKNOWN_HELD {
                    unknown.insert(id, Instant::now());
                }
                return Err(RegistryError::UnknownId(id));
            }
            (404, body) => {
                return Err(RegistryError::Unavailable(format!(
                    "{} (not the registry's 'schema not found', {SCHEMA_NOT_FOUND}: is schema_registry.url its base URL?)",
                    answer(404, &body)
                )));
            }
            (status, body) => return Err(RegistryError::Unavailable(answer(status, &body))),
        };
        self.by_id.write().insert(id, result.clone());
        result
    }

    /// Registers the schema `text` under `subject` (or finds it there) and
    /// returns its id. The text as shipped, not its canonical form, which
    /// drops logical types (a consumer would read `timestamp-millis` fields
    /// as plain longs), defaults, namespaces and docs.
    pub fn register(&self, subject: &str, text: &str) -> Result<u32, RegistryError> {
        let body = serde_json::json!({ "schema": text, "schemaType": "AVRO" });
        let path = format!("/subjects/{}/versions", urlencode(subject));
        match self.post(&path, &body)? {
            (200, text) => {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                v["id"]
                    .as_u64()
                    .map(|id| id as u32)
                    .ok_or_else(|| RegistryError::Refused {
                        what: format!("registering {subject}"),
                        status: 200,
                        body: crate::event::truncate(&text, 200),
                    })
            }
            (status, text) if status >= 500 || status == 408 || status == 429 => {
                Err(RegistryError::Unavailable(format!(
                    "HTTP {status}: {}",
                    crate::event::truncate(&text, 200)
                )))
            }
            (status, text) => Err(RegistryError::Refused {
                what: format!("registering {subject}"),
                status,
                body: crate::event::truncate(&text, 200),
            }),
        }
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_unframes() {
        let f = frame(7, b"abc");
        assert_eq!(f, vec![0, 0, 0, 0, 7, b'a', b'b', b'c']);
        assert_eq!(unframe(&f), Ok((7, &b"abc"[..])));
        assert!(unframe(&[0, 1]).unwrap_err().contains("shorter"));
        assert!(unframe(b"{\"json\"").unwrap_err().contains("magic byte"));
        assert_eq!(urlencode("events.web-value"), "events.web-value");
        assert_eq!(urlencode("a b/c"), "a%20b%2Fc");
    }

    /// A registry that answers "schema not found" to everything, on a
    /// loopback port, counting the requests.
    fn not_found() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&count);
        std::thread::spawn(move || {
            let body = r#"{"error_code":40403,"message":"Schema not found"}"#;
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = write!(
                    stream,
                    "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (url, count)
    }

    /// An id the registry does not know is taken as unknown for a second,
    /// then asked again; no more such ids are remembered than the bound,
    /// however many a producer makes up.
    #[test]
    fn unknown_ids_are_asked_again_and_held_within_a_bound() {
        use std::sync::atomic::Ordering::SeqCst;
        let (url, requests) = not_found();
        let registry = Registry::new(&SchemaRegistrySettings {
            url: Some(url),
            ..SchemaRegistrySettings::default()
        })
        .unwrap();
        assert_eq!(registry.schema(7), Err(RegistryError::UnknownId(7)));
        assert_eq!(registry.schema(7), Err(RegistryError::UnknownId(7)));
        assert_eq!(requests.load(SeqCst), 1, "remembered");
        std::thread::sleep(UNKNOWN_RETRY);
        assert_eq!(registry.schema(7), Err(RegistryError::UnknownId(7)));
        assert_eq!(requests.load(SeqCst), 2, "asked again");
        for id in 0..UNKNOWN_HELD as u32 + 50 {
            assert_eq!(registry.schema(id), Err(RegistryError::UnknownId(id)));
        }
        assert!(registry.unknown.read().len() <= UNKNOWN_HELD);
    }
}
