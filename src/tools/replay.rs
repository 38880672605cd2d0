//! `leadscore replay`: scores a file of events with no Kafka and no Redis,
//! through the same shard as the service (one shard, its event-time merge,
//! an in-memory store), and prints the outputs as NDJSON. With `--compare`,
//! scores the same file under a second rules file and reports the leads
//! whose segment differs.
//!
//! Input: one JSON event per line, as on the input topics, plus a `source`
//! field (`web`, `adpixel`, `email` or `crm`) naming its topic family.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;

use leadscore::decode::{Contract, Decoder, Format};
use leadscore::engine::{Engine, EngineConfig, Kind, LeadState, Rules, Segment};
use leadscore::event::Source;
use leadscore::output::{Encoder, Record};
use leadscore::settings::{Settings, SettingsError};
use leadscore::shard::cache::LeadKey;
use leadscore::shard::{Ctx, InMessage, Shard, ShardConfig, StepStats};
use leadscore::sink::MemorySink;
use leadscore::store::Store;
use leadscore::store::memory::MemoryStore;

/// Replay options.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Config file (its `scoring.rules_file` and `state.*` settings apply).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// NDJSON events, one per line, each with a `source` field; `-` reads
    /// standard input.
    #[arg(long)]
    pub input: PathBuf,
    /// A second rules file: report which leads land in a different segment under it.
    #[arg(long)]
    pub compare: Option<PathBuf>,
}

/// The outcome of scoring a file under one set of rules.
pub struct Scored {
    /// Output records in order.
    pub records: Vec<Record>,
    /// Rejected lines: (line number, reason).
    pub rejected: Vec<(usize, String)>,
    /// Final segment name per lead.
    pub segments: BTreeMap<String, String>,
}

#[derive(serde::Deserialize)]
struct SourceOnly {
    source: Option<String>,
}

/// Scores `lines` (NDJSON with a `source` field) under `rules`.
pub fn score(lines: &[String], rules: Arc<Rules>, config: EngineConfig) -> Scored {
    let engine = Engine::new(Arc::clone(&rules), config);
    let store = MemoryStore::default();
    let meta = store.take_shard(0).expect("the memory store does not fail");
    let topics: Arc<[Arc<str>]> = Source::ALL
        .iter()
        .map(|s| Arc::from(format!("replay.{s}")))
        .collect();
    let sources: Arc<[Source]> = Source::ALL.into();
    let mut shard = Shard::new(
        0,
        &meta,
        Arc::clone(&topics),
        Arc::clone(&sources),
        ShardConfig {
            // A file is history: nothing in it is "from the future".
            future_tolerance_ms: i64::MAX / 4,
            ..ShardConfig::default()
        },
    );
    let contract = Contract {
        channels: rules.channels.clone().into(),
        future_tolerance_ms: i64::MAX / 4,
    };
    let decoders: Vec<Decoder> = Source::ALL
        .iter()
        .map(|s| Decoder::new(*s, Format::Json, contract.clone()))
        .collect();
    let mut rejected = Vec::new();
    let mut line_of: HashMap<(usize, i64), usize> = HashMap::new();
    let mut next = [0i64; 4];
    let mut stats = StepStats::default();
    for (n, line) in lines.iter().enumerate() {
        let number = n + 1;
        let source = match serde_json::from_str::<SourceOnly>(line) {
            Err(e) => {
                rejected.push((number, format!("invalid JSON: {e}")));
                continue;
            }
            Ok(SourceOnly { source: None }) => {
                rejected.push((
                    number,
                    "missing \"source\": one of web, adpixel, email, crm".into(),
                ));
                continue;
            }
            Ok(SourceOnly { source: Some(s) }) => match Source::parse(&s) {
                Some(s) => s,
                None => {
                    rejected.push((
                        number,
                        format!("\"source\" is {s:?}: must be one of web, adpixel, email, crm"),
                    ));
                    continue;
                }
            },
        };
        let input = Source::ALL.iter().position(|s| *s == source).unwrap_or(0);
        let offset = next[input];
        next[input] += 1;
        line_of.insert((input, offset), number);
        let msg = InMessage {
            input,
            offset,
            key: None,
            payload: Some(line.as_bytes()),
            timestamp: None,
        };
        shard.push(&msg, decoders[input].decode(msg.payload, None), &mut stats);
    }
    let mut sink = MemorySink::default();
    let encoder = Encoder::new(Format::Json);
    loop {
        // Everything is read: an input that ran dry never holds the others back.
        for input in 0..topics.len() {
            shard.set_idle(input, true);
        }
        let mut ctx = Ctx {
            engine: &engine,
            store: &store,
            sink: &mut sink,
            encoder: &encoder,
            stats: &mut stats,
        };
        match shard.step(&mut ctx, 1 << 20) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                rejected.push((0, format!("replay stopped: {e}")));
                break;
            }
        }
    }
    for (topic, _, offset, reason, _) in sink.dead.lock().iter() {
        let input = topics.iter().position(|t| **t == **topic).unwrap_or(0);
        rejected.push((
            line_of.get(&(input, *offset)).copied().unwrap_or(0),
            reason.clone(),
        ));
    }
    rejected.sort();
    let mut segments = BTreeMap::new();
    let cache = shard.cache().lock();
    let mut state = LeadState::new(Kind::Lead);
    for key in cache.keys() {
        let Some(id) = LeadKey::lead_id(key) else {
            continue;
        };
        if let Some(blob) = cache.peek(key)
            && engine.decode_into(&blob, &mut state).is_ok()
            && !state.is_new()
        {
            segments.insert(id.to_owned(), Segment::of(&state).name(&rules).to_owned());
        }
    }
    drop(cache);
    let records = std::mem::take(&mut *sink.records.lock());
    Scored {
        records,
        rejected,
        segments,
    }
}

/// Runs `leadscore replay`.
pub fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let loaded = Settings::load(args.config.as_deref(), std::env::vars())?;
    let reader: Box<dyn BufRead> = if args.input.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(&args.input)
            .with_context(|| format!("{}", args.input.display()))?;
        Box::new(std::io::BufReader::new(file))
    };
    let mut lines: Vec<String> = reader
        .lines()
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {}", args.input.display()))?;
    // A file saved by an editor that marks UTF-8 with a byte order mark:
    // the mark is not part of the first event.
    if let Some(first) = lines.first_mut()
        && let Some(rest) = first.strip_prefix('\u{feff}')
    {
        *first = rest.to_owned();
    }
    // The rules to compare with are read before anything is scored: a
    // mistake in them fails at once, not after the whole file.
    let other = match &args.compare {
        // A rules file that cannot be read or compiled is invalid
        // configuration (exit 2), as `scoring.rules_file`'s is.
        Some(path) => {
            let invalid = |e: &dyn std::fmt::Display| {
                SettingsError(vec![format!("--compare: {}: {e}", path.display())])
            };
            let text = std::fs::read_to_string(path).map_err(|e| invalid(&e))?;
            Some(Arc::new(Rules::from_toml(&text).map_err(|e| invalid(&e))?))
        }
        None => None,
    };
    let config = leadscore::service::engine_config(&loaded.settings);
    let base = score(&lines, Arc::clone(&loaded.rules), config);
    let mut out = std::io::stdout().lock();
    for r in &base.records {
        out.write_all(&r.payload)?;
        out.write_all(b"\n")?;
    }
    for (line, reason) in &base.rejected {
        eprintln!("line {line}: rejected: {reason}");
    }
    let rejected: std::collections::HashSet<usize> =
        base.rejected.iter().map(|(n, _)| *n).collect();
    let mut events = (1..=lines.len()).filter(|n| !lines[n - 1].trim().is_empty());
    let none_scored = events.clone().next().is_some() && events.all(|n| rejected.contains(&n));
    if none_scored {
        anyhow::bail!(
            "no line of {} could be scored ({} rejected, reasons above)",
            args.input.display(),
            base.rejected.len()
        );
    }
    if let Some(rules) = other {
        let alt = score(&lines, Arc::clone(&rules), config);
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
            line("1", "a", "2026-11-22T10:00:00Z", "web", "page_view", "/pricing"),
            line("2", "a", "2026-11-22T10:01:00Z", "web", "booking_started", ""),
            line("3", "b", "2026-11-22T10:02:00Z", "web", "page_view", "/menu"),
            "not json".to_owned(),
            line("4", "c", "2026-11-22T10:03:00Z", "nowhere", "page_view", "/"),
            r#"{"event_id":"5","lead_id":"d","occurred_at":"2026-11-22T10:03:00Z","type":"page_view"}"#.to_owned(),
        ];
        let rules = Arc::new(Rules::default_rules());
        let scored = score(&lines, Arc::clone(&rules), EngineConfig::default());
        assert_eq!(scored.segments["a"], "warm");
        assert_eq!(scored.segments["b"], "cold");
        assert_eq!(scored.records.len(), 1);
        assert_eq!(scored.rejected.len(), 3, "{:?}", scored.rejected);
        assert_eq!(scored.rejected[0].0, 4);
        assert!(
            scored.rejected[2]
                .1
                .contains("missing \"source\": one of web, adpixel, email, crm")
        );
        let again = score(&lines, Arc::clone(&rules), EngineConfig::default());
        let bytes = |s: &Scored| {
            s.records
                .iter()
                .map(|r| r.payload.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(bytes(&scored), bytes(&again), "replay is deterministic");
        let strict =
            leadscore::engine::rules::DEFAULT_RULES.replace("enter = 25.0", "enter = 45.0");
        let other = score(
            &lines,
            Arc::new(Rules::from_toml(&strict).unwrap()),
            EngineConfig::default(),
        );
        assert_eq!(other.segments["a"], "cold");
    }

    /// The issue's crash: a visitor identifies, then keeps browsing with only
    /// the cookie, in one batch.
    #[test]
    fn identify_then_anonymous_in_one_batch_scores_the_lead() {
        let lines = vec![
            r#"{"source":"web","event_id":"i","lead_id":"L","anonymous_id":"c","occurred_at":"2026-11-22T10:00:00Z","type":"identify"}"#.to_owned(),
            r#"{"source":"web","event_id":"p","anonymous_id":"c","occurred_at":"2026-11-22T10:01:00Z","type":"page_view","attributes":{"url":"/pricing"}}"#.to_owned(),
        ];
        let scored = score(
            &lines,
            Arc::new(Rules::default_rules()),
            EngineConfig::default(),
        );
        assert!(scored.rejected.is_empty(), "{:?}", scored.rejected);
        assert_eq!(scored.segments.get("L").map(String::as_str), Some("cold"));
    }
}
