//! `leadscore replay`: scores a file of events with no Kafka and no Redis,
//! through the same processor as the service (one shard, in-memory store),
//! and prints the outputs as NDJSON. With `--compare`, scores the same file
//! under a second rules file and reports the leads whose segment differs.
//!
//! Input: one JSON event per line, as on the input topics, plus a `source`
//! field (`web`, `adpixel`, `email` or `crm`) naming its topic family.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use parking_lot::Mutex;

use crate::decode::{DecodeError, Decoder, Format};
use crate::engine::{Engine, Rules, Segment};
use crate::event::Source;
use crate::metrics::Metrics;
use crate::output::{Encoder, Record};
use crate::pipeline::{Barrier, InMessage, LeadMap, Processor, ProcessorConfig, Sink, SinkError};
use crate::settings::Settings;
use crate::store::MemoryStore;

/// Replay options.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Config file (its `scoring.rules_file` and `state.dedup_window` apply).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// NDJSON events, one per line, each with a `source` field.
    #[arg(long)]
    pub input: PathBuf,
    /// A second rules file: report which leads land in a different segment under it.
    #[arg(long)]
    pub compare: Option<PathBuf>,
}

/// Collects output records.
#[derive(Clone, Default)]
struct Collect {
    records: Arc<Mutex<Vec<Record>>>,
    dead: Arc<Mutex<Vec<(i64, String)>>>,
}

impl Sink for Collect {
    fn send(&mut self, record: &Record) -> Result<(), SinkError> {
        self.records.lock().push(record.clone());
        Ok(())
    }
    fn dead_letter(&mut self, msg: &InMessage<'_>, error: &DecodeError) -> Result<(), SinkError> {
        self.dead.lock().push((msg.offset + 1, error.to_string()));
        Ok(())
    }
    fn barrier(&mut self) -> Barrier {
        Barrier::ready()
    }
}

/// The outcome of scoring a file under one set of rules.
pub struct Scored {
    /// Output records in order.
    pub records: Vec<Record>,
    /// Rejected lines: (line number, reason).
    pub rejected: Vec<(i64, String)>,
    /// Final segment name per lead.
    pub segments: BTreeMap<String, String>,
}

#[derive(serde::Deserialize)]
struct SourceOnly {
    source: Option<String>,
}

/// Scores `lines` (NDJSON with a `source` field) under `rules`.
pub fn score(lines: &[String], rules: Arc<Rules>, dedup_window: usize) -> Scored {
    let sink = Collect::default();
    let leads = Arc::new(LeadMap::default());
    let topic = |s: Source| format!("replay.{s}");
    let decoders = Source::ALL
        .iter()
        .map(|s| (topic(*s), Decoder::new(*s, Format::Json)))
        .collect();
    let mut processor = Processor::new(
        Engine::new(Arc::clone(&rules), dedup_window),
        Arc::clone(&leads),
        Arc::new(MemoryStore::default()),
        Box::new(sink.clone()),
        decoders,
        Encoder::new(Format::Json),
        Metrics::new(),
        ProcessorConfig {
            flush_interval: Duration::from_secs(3600),
            flush_max_dirty: usize::MAX,
            ack_timeout: Duration::from_secs(1),
        },
    );
    let topics: Vec<String> = lines
        .iter()
        .map(|l| {
            let source = serde_json::from_str::<SourceOnly>(l)
                .ok()
                .and_then(|s| s.source)
                .and_then(|s| Source::parse(&s));
            source.map_or_else(|| "replay.unknown".to_owned(), topic)
        })
        .collect();
    let messages: Vec<InMessage<'_>> = lines
        .iter()
        .zip(&topics)
        .enumerate()
        .map(|(i, (line, topic))| InMessage {
            topic,
            partition: 0,
            offset: i as i64,
            key: None,
            payload: Some(line.as_bytes()),
            timestamp: None,
        })
        .collect();
    for chunk in messages.chunks(8192) {
        processor
            .process(chunk)
            .expect("the in-memory store and sink cannot fail");
    }
    let segments = leads
        .iter()
        .filter(|l| !l.state.is_new())
        .map(|l| {
            (
                l.key().to_string(),
                Segment::of(&l.state).name(&rules).to_owned(),
            )
        })
        .collect();
    let records = std::mem::take(&mut *sink.records.lock());
    let rejected = std::mem::take(&mut *sink.dead.lock());
    Scored {
        records,
        rejected,
        segments,
    }
}

/// Runs `leadscore replay`.
pub fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let loaded = Settings::load(args.config.as_deref(), std::env::vars())?;
    let file =
        std::fs::File::open(&args.input).with_context(|| format!("{}", args.input.display()))?;
    let lines: Vec<String> = std::io::BufReader::new(file)
        .lines()
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {}", args.input.display()))?;
    let window = loaded.settings.state.dedup_window;
    let base = score(&lines, Arc::clone(&loaded.rules), window);
    let mut out = std::io::stdout().lock();
    for r in &base.records {
        out.write_all(&r.payload)?;
        out.write_all(b"\n")?;
    }
    for (line, reason) in &base.rejected {
        eprintln!("line {line}: rejected: {reason}");
    }
    if let Some(other) = &args.compare {
        let text =
            std::fs::read_to_string(other).with_context(|| format!("{}", other.display()))?;
        let rules = Arc::new(
            Rules::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", other.display()))?,
        );
        let alt = score(&lines, Arc::clone(&rules), window);
        let moved: Vec<(&String, &String, &str)> = base
            .segments
            .iter()
            .filter_map(|(lead, seg)| {
                let there = alt.segments.get(lead).map_or("cold", String::as_str);
                (there != seg).then_some((lead, seg, there))
            })
            .collect();
        let report = serde_json::json!({
            "compare": {
                "rules_version": loaded.rules.version,
                "other_rules_version": rules.version,
                "leads": base.segments.len(),
                "different_segment": moved.len(),
                "leads_moved": moved.iter().map(|(l, a, b)| serde_json::json!({"lead_id": l, "segment": a, "other_segment": b})).collect::<Vec<_>>(),
            }
        });
        writeln!(out, "{report}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: &str, lead: &str, at: &str, source: &str, kind: &str, url: &str) -> String {
        format!(
            r#"{{"source":"{source}","event_id":"{id}","lead_id":"{lead}","occurred_at":"{at}","type":"{kind}","attributes":{{"url":"{url}"}}}}"#
        )
    }

    #[test]
    fn replay_scores_a_file_and_compares_rules() {
        let lines = vec![
            line(
                "1",
                "a",
                "2026-11-22T10:00:00Z",
                "web",
                "page_view",
                "/pricing",
            ),
            line(
                "2",
                "a",
                "2026-11-22T10:01:00Z",
                "web",
                "booking_started",
                "",
            ),
            line(
                "3",
                "b",
                "2026-11-22T10:02:00Z",
                "web",
                "page_view",
                "/menu",
            ),
            "not json".to_owned(),
            line(
                "4",
                "c",
                "2026-11-22T10:03:00Z",
                "nowhere",
                "page_view",
                "/",
            ),
        ];
        let rules = Arc::new(Rules::default_rules());
        let scored = score(&lines, Arc::clone(&rules), 16);
        assert_eq!(scored.segments["a"], "warm");
        assert_eq!(scored.segments["b"], "cold");
        assert_eq!(scored.records.len(), 1);
        assert_eq!(scored.rejected.len(), 2);
        assert_eq!(scored.rejected[0].0, 4);
        // Same input, same output: replay is deterministic.
        let again = score(&lines, rules, 16);
        let bytes = |s: &Scored| {
            s.records
                .iter()
                .map(|r| r.payload.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(bytes(&scored), bytes(&again));
        // Stricter rules: warm needs 60.
        let strict = crate::engine::rules::DEFAULT_RULES.replace("enter = 25.0", "enter = 45.0");
        let other = score(&lines, Arc::new(Rules::from_toml(&strict).unwrap()), 16);
        assert_eq!(other.segments["a"], "cold");
    }
}
