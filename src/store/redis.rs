//! The Redis store, on one server or a Redis Cluster.
//!
//! Layout (under `redis.key_prefix`, `leadscore:` by default; `N` is the shard):
//! * `{pN}:meta` — hash: `epoch` (owner epoch), `pos:<topic>` (next offset to
//!   read), `seen:<topic>` (largest event time applied), `clock`,
//!   `released`, `pop:<segment>` (leads per segment);
//! * `{pN}:timers` — sorted set of lead keys by the instant of their next timer;
//! * `{pN}:l:<lead id>` and `{pN}:a:<anonymous id>` — a lead's or visitor's
//!   state in its compact binary form;
//! * `layouts` — hash of rules layouts by hash (how to read states written
//!   under earlier rules).
//!
//! The `{pN}` hash tag puts all of a shard in one hash slot, so every shard
//! write is one Lua script — atomic on a single server and on a cluster —
//! that first checks the owner epoch and that no position moves backwards.
//! Scripts are idempotent (absolute values only), since a cluster client may
//! send one again after a timeout.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::cluster::{ClusterClient, ClusterConnection};
use redis::{Client, Connection, ConnectionLike, Script, TlsCertificates, Value};

use super::resp::{self, Packed};
use super::{
    Health, LeadWrite, Loaded, ShardId, ShardMeta, ShardWrite, Store, StoreError, TimerWrite,
    Written,
};
use crate::engine::layout::Layout;
use crate::event::Millis;
use crate::settings::{RedisMode, RedisSettings};
use crate::shard::cache::LeadKey;

const TAKE: &str = r"
redis.call('HINCRBY', KEYS[1], 'epoch', 1)
return redis.call('HGETALL', KEYS[1])
";

// KEYS: the shard record, its timers, then the leads; ARGV: the epoch, then
// the leads' timer members. Replies each lead's state and stored timer,
// read with one MGET and one ZMSCORE per 500 leads (a command per lead from
// Lua doubled Redis's time in loads; unpack is bounded by Lua's stack).
const LOAD: &str = r"
local e = redis.call('HGET', KEYS[1], 'epoch')
if not e then return {0} end
if e ~= ARGV[1] then return {1, e} end
local out = {3}
for i = 3, #KEYS, 500 do
  local j = math.min(i + 499, #KEYS)
  local states = redis.call('MGET', unpack(KEYS, i, j))
  local timers = redis.call('ZMSCORE', KEYS[2], unpack(ARGV, i - 1, j - 1))
  for n = 1, j - i + 1 do
    out[#out + 1] = states[n] or false
    out[#out + 1] = timers[n] or false
  end
end
return out
";

const WRITE: &str = r"
local e = redis.call('HGET', KEYS[1], 'epoch')
if not e then return {0} end
if e ~= ARGV[1] then return {1, e} end
local nd, nw, nm = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local a = 5
local m = a + nd + 3 * nw
for i = 0, nm - 1 do
  local f, v = ARGV[m + 2 * i], ARGV[m + 2 * i + 1]
  if string.sub(f, 1, 4) == 'pos:' then
    local cur = redis.call('HGET', KEYS[1], f)
    if cur and tonumber(cur) > tonumber(v) then return {2, f} end
  elseif f == 'seq' then
    local cur = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
    if cur ~= tonumber(v) and cur ~= tonumber(v) - 1 then return {4, tostring(cur)} end
  end
end
-- Many keys per command, in chunks that stay within Lua's stack.
local CHUNK = 500
local k = 3
local i = 0
while i < nd do
  local n = math.min(CHUNK, nd - i)
  local keys, members = {}, {}
  for j = 1, n do
    keys[j] = KEYS[k + i + j - 1]
    members[j] = ARGV[a + i + j - 1]
  end
  redis.call('DEL', unpack(keys))
  redis.call('ZREM', KEYS[2], unpack(members))
  i = i + n
end
k = k + nd
a = a + nd
i = 0
while i < nw do
  local n = math.min(CHUNK, nw - i)
  local kv, zadd, zrem = {}, {}, {}
  for j = 0, n - 1 do
    local ai = a + 3 * (i + j)
    kv[#kv + 1] = KEYS[k + i + j]
    kv[#kv + 1] = ARGV[ai + 1]
    -- The timer: '' removes it, 'k' keeps the stored one, a number sets it.
    if ARGV[ai + 2] == '' then
      zrem[#zrem + 1] = ARGV[ai]
    elseif ARGV[ai + 2] ~= 'k' then
      zadd[#zadd + 1] = ARGV[ai + 2]
      zadd[#zadd + 1] = ARGV[ai]
    end
  end
  redis.call('MSET', unpack(kv))
  if #zadd > 0 then redis.call('ZADD', KEYS[2], unpack(zadd)) end
  if #zrem > 0 then redis.call('ZREM', KEYS[2], unpack(zrem)) end
  i = i + n
end
if nm > 0 then
  -- An empty value removes the field.
  local hv, hd = {}, {}
  for j = 0, nm - 1 do
    if ARGV[m + 2 * j + 1] == '' then
      hd[#hd + 1] = ARGV[m + 2 * j]
    else
      hv[#hv + 1] = ARGV[m + 2 * j]
      hv[#hv + 1] = ARGV[m + 2 * j + 1]
    end
  end
  if #hv > 0 then redis.call('HSET', KEYS[1], unpack(hv)) end
  if #hd > 0 then redis.call('HDEL', KEYS[1], unpack(hd)) end
end
return {3}
";

enum Clients {
    Single(Client),
    Cluster(ClusterClient),
}

// One per store's thread, made once: the larger variant costs nothing
// worth a box.
#[allow(clippy::large_enum_variant)]
enum Conn {
    Single(Connection),
    Cluster(ClusterConnection),
}

impl Conn {
    fn get(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Conn::Single(c) => c,
            Conn::Cluster(c) => c,
        }
    }
}

/// Redis store over one connection (re-opened after errors). Each thread
/// that needs one builds its own with [`RedisStore::connect`].
pub struct RedisStore {
    clients: Arc<Clients>,
    conn: Mutex<Option<Conn>>,
    prefix: String,
    timeout: Duration,
    /// Keys per command (`redis.pipeline_batch`): reads are split into
    /// calls of this many keys, and a single-server write into commands of
    /// this many keys inside its one transaction.
    batch: usize,
    /// The last write's commands: its buffer is reused by the next one.
    packed: Mutex<Packed>,
    take: Script,
    load: Script,
    write: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn read_pem(path: &std::path::Path) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path)
        .map_err(|e| StoreError::Config(format!("cannot read {}: {e}", path.display())))
}

impl RedisStore {
    /// A store as configured; connects lazily.
    pub fn connect(r: &RedisSettings) -> Result<Self, StoreError> {
        // rustls needs a process-wide crypto provider before the first TLS connection.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certs = match (&r.tls_ca_file, &r.tls_cert_file, &r.tls_key_file) {
            (None, None, None) => None,
            (ca, cert, key) => Some(TlsCertificates {
                client_tls: match (cert, key) {
                    (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                        client_cert: read_pem(c)?,
                        client_key: read_pem(k)?,
                    }),
                    _ => None,
                },
                root_cert: ca.as_deref().map(read_pem).transpose()?,
            }),
        };
        let timeout = Duration::from_millis(r.timeout_ms);
        let clients = match r.mode {
            RedisMode::Single => Clients::Single(match certs {
                Some(c) => Client::build_with_tls(r.url.as_str(), c)?,
                None => Client::open(r.url.as_str())?,
            }),
            RedisMode::Cluster => {
                let nodes: Vec<&str> = r
                    .url
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect();
                let mut b = ClusterClient::builder(nodes)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(8);
                if let Some(c) = certs {
                    b = b.certs(c);
                }
                Clients::Cluster(b.build()?)
            }
        };
        Ok(RedisStore::with_clients(
            Arc::new(clients),
            &r.key_prefix,
            timeout,
            r.pipeline_batch,
        ))
    }

    fn with_clients(clients: Arc<Clients>, prefix: &str, timeout: Duration, batch: usize) -> Self {
        RedisStore {
            clients,
            batch: batch.max(1),
            conn: Mutex::new(None),
            packed: Mutex::new(Packed::default()),
            prefix: prefix.to_owned(),
            timeout,
            take: Script::new(TAKE),
            load: Script::new(LOAD),
            write: Script::new(WRITE),
        }
    }

    /// Another store on the same servers with a connection of its own.
    pub fn sibling(&self) -> Self {
        RedisStore::with_clients(
            Arc::clone(&self.clients),
            &self.prefix,
            self.timeout,
            self.batch,
        )
    }

    fn open(&self) -> Result<Conn, StoreError> {
        Ok(match &*self.clients {
            Clients::Single(c) => {
                let conn = c.get_connection_with_timeout(self.timeout)?;
                // get_connection_with_timeout clears them: set them again.
                conn.set_read_timeout(Some(self.timeout))?;
                conn.set_write_timeout(Some(self.timeout))?;
                Conn::Single(conn)
            }
            Clients::Cluster(c) => Conn::Cluster(c.get_connection()?),
        })
    }

    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut dyn ConnectionLike) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let mut guard = self.conn.lock();
        if guard.is_none() {
            *guard = Some(self.open()?);
        }
        let conn = guard.as_mut().expect("connected above");
        match f(conn.get()) {
            Ok(v) => Ok(v),
            Err(e) => {
                // Its protocol state (or slot map, after a failover) is unknown: start again.
                *guard = None;
                Err(e.into())
            }
        }
    }

    /// [`RedisStore::with_conn`] for a read, which may be sent again: a
    /// kept connection that the server (its `timeout`) or a proxy closed
    /// while idle fails its next call with "unexpected end of file"; such a
    /// read is retried once on a new connection (a user probe: a third of
    /// HTTP lookups after idle spells got 503 from Redis's `timeout 2`).
    /// Not after a timeout: a server that did not answer gets no second wait.
    fn with_read<T>(
        &self,
        f: impl Fn(&mut dyn ConnectionLike) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let kept = self.conn.lock().is_some();
        match self.with_conn(&f) {
            Err(StoreError::Redis(e)) if kept && e.is_connection_dropped() && !e.is_timeout() => {
                self.with_conn(&f)
            }
            other => other,
        }
    }

    /// Configuration values (`CONFIG GET`) of the single server, or of each
    /// primary of a cluster (named by its address; a single server's name
    /// is empty). Values that cannot be read are missing.
    fn config_everywhere(&self, names: &[&str]) -> Vec<(String, HashMap<String, String>)> {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg(names);
        let pairs = |v: &Value| -> HashMap<String, String> {
            // RESP3 answers a map, RESP2 a flat list of names and values.
            redis::from_redis_value::<HashMap<String, String>>(v)
                .or_else(|_| {
                    redis::from_redis_value::<Vec<String>>(v).map(|flat| {
                        flat.chunks_exact(2)
                            .map(|kv| (kv[0].clone(), kv[1].clone()))
                            .collect()
                    })
                })
                .unwrap_or_default()
        };
        let mut guard = self.conn.lock();
        if guard.is_none() {
            *guard = self.open().ok();
        }
        let reply = match guard.as_mut() {
            None => Err((redis::ErrorKind::IoError, "no connection").into()),
            Some(Conn::Single(c)) => cmd.query::<Value>(c).map(|v| vec![(String::new(), v)]),
            Some(Conn::Cluster(c)) => {
                use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
                c.route_command(
                    &cmd,
                    RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
                )
                .map(|v| match v {
                    Value::Map(nodes) => nodes
                        .into_iter()
                        .map(|(node, v)| (redis::from_redis_value(&node).unwrap_or_default(), v))
                        .collect(),
                    other => vec![(String::new(), other)],
                })
            }
        };
        if reply.is_err() {
            *guard = None;
        }
        let mut nodes: Vec<(String, HashMap<String, String>)> = match reply {
            Ok(nodes) => nodes.iter().map(|(n, v)| (n.clone(), pairs(v))).collect(),
            Err(_) => vec![(String::new(), HashMap::new())],
        };
        nodes.sort_by(|a, b| a.0.cmp(&b.0));
        nodes
    }

    /// One shard's write as a transaction fenced by `WATCH` on its record:
    /// the epoch and positions are checked, then everything is written in
    /// one `MULTI`/`EXEC`, which Redis refuses if the record changed since
    /// (another member took the shard). Commands carry many keys each, so
    /// Redis parses each state once and runs no script per lead.
    fn write_watched(
        &self,
        w: &ShardWrite,
        meta: &[(String, String)],
    ) -> Result<Written, StoreError> {
        let meta_key = self.shard_key(w.shard, "meta");
        let positions: Vec<&(String, String)> =
            meta.iter().filter(|(f, _)| f.starts_with("pos:")).collect();
        self.with_conn(|c| {
            redis::cmd("WATCH").arg(&meta_key).exec(c)?;
            let mut get = redis::cmd("HMGET");
            get.arg(&meta_key).arg("epoch").arg("seq");
            for (f, _) in &positions {
                get.arg(f);
            }
            let stored: Vec<Option<String>> = get.query(c)?;
            let stored_seq: u64 = stored
                .get(1)
                .and_then(|s| s.as_deref()?.parse().ok())
                .unwrap_or(0);
            let refusal = match stored.first().cloned().flatten() {
                None => Some(Written::Lost),
                Some(e) if e != w.epoch.to_string() => {
                    Some(Written::Fenced(e.parse().unwrap_or(0)))
                }
                Some(_) if !super::takes_write(stored_seq, w.seq) => {
                    Some(Written::Diverged(stored_seq))
                }
                Some(_) => positions
                    .iter()
                    .zip(&stored[2..])
                    .find_map(|((f, v), cur)| {
                        let behind = cur
                            .as_deref()
                            .and_then(|c| c.parse::<i64>().ok())
                            .zip(v.parse::<i64>().ok())
                            .is_some_and(|(cur, new)| cur > new);
                        behind.then(|| Written::Backwards(f.trim_start_matches("pos:").to_owned()))
                    }),
            };
            if let Some(refusal) = refusal {
                redis::cmd("UNWATCH").exec(c)?;
                return Ok(refusal);
            }
            let mut packed = self.packed.lock();
            let keys = self.shard_key(w.shard, "");
            resp::transaction(&mut packed, |p| {
                pack_write(p, w, keys.as_bytes(), meta, self.batch)
            });
            let mut reply = c.req_packed_commands(packed.bytes(), packed.commands() - 1, 1)?;
            packed.shrink(KEEP_PACKED);
            drop(packed);
            match reply.pop() {
                // Each command's own error (none is expected) fails the write.
                Some(done @ Value::Array(_)) => {
                    done.extract_error()?;
                    return Ok(Written::Ok);
                }
                Some(Value::Nil) => {}
                other => {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::ResponseError,
                        "EXEC answered neither results nor nil",
                        format!("{other:?}"),
                    )));
                }
            }
            // EXEC refused: the record changed under the watch.
            let epoch: Option<String> = redis::cmd("HGET").arg(&meta_key).arg("epoch").query(c)?;
            Ok(match epoch {
                None => Written::Lost,
                Some(e) => Written::Fenced(e.parse().unwrap_or(0)),
            })
        })
    }

    /// One shard's write as one Lua script (Redis Cluster: a transaction
    /// there is a script on the shard's slot).
    fn write_scripted(
        &self,
        w: &ShardWrite,
        meta: &[(String, String)],
    ) -> Result<Written, StoreError> {
        let mut inv = self.write.prepare_invoke();
        inv.key(self.shard_key(w.shard, "meta"));
        inv.key(self.shard_key(w.shard, "timers"));
        for d in &w.deletes {
            inv.key(self.lead_key(w.shard, d));
        }
        for lead in &w.leads {
            inv.key(self.lead_key(w.shard, &lead.key));
        }
        inv.arg(w.epoch)
            .arg(w.deletes.len())
            .arg(w.leads.len())
            .arg(meta.len());
        for d in &w.deletes {
            inv.arg(d.as_str());
        }
        for lead in &w.leads {
            let timer = match lead.timer {
                TimerWrite::Set(t) => t.to_string(),
                TimerWrite::Clear => String::new(),
                TimerWrite::Keep => "k".to_owned(),
            };
            inv.arg(lead.key.as_str()).arg(w.state(lead)).arg(timer);
        }
        for (f, v) in meta {
            inv.arg(f).arg(v);
        }
        let reply: Vec<Value> = self.with_conn(|c| inv.invoke(c))?;
        Ok(refused(&reply).unwrap_or(Written::Ok))
    }

    fn shard_key(&self, shard: ShardId, suffix: &str) -> String {
        format!("{}{{p{shard}}}:{suffix}", self.prefix)
    }

    fn lead_key(&self, shard: ShardId, key: &LeadKey) -> String {
        self.shard_key(shard, key.as_str())
    }
}

/// The largest packed write a store keeps its buffer after (64 MiB: a
/// flush of `redis.flush_max_dirty` typical leads fits).
const KEEP_PACKED: usize = 64 << 20;

/// A single server's shard write, as commands of at most `batch` keys each:
/// the deleted leads and their timers, the changed leads' states and
/// timers, then the shard record's fields. `keys` is the shard's key prefix
/// (`leadscore:{pN}:`).
fn pack_write(
    p: &mut Packed,
    w: &ShardWrite,
    keys: &[u8],
    meta: &[(String, String)],
    batch: usize,
) {
    let timers: &[&[u8]] = &[keys, b"timers"];
    for chunk in w.deletes.chunks(batch) {
        p.command(1 + chunk.len()).arg(b"DEL");
        for d in chunk {
            p.arg_parts(&[keys, d.as_str().as_bytes()]);
        }
        p.command(2 + chunk.len()).arg(b"ZREM").arg_parts(timers);
        for d in chunk {
            p.arg(d.as_str().as_bytes());
        }
    }
    for chunk in w.leads.chunks(batch) {
        p.command(1 + 2 * chunk.len()).arg(b"MSET");
        for lead in chunk {
            p.arg_parts(&[keys, lead.key.as_str().as_bytes()])
                .arg(w.state(lead));
        }
        let set = |l: &&LeadWrite| matches!(l.timer, TimerWrite::Set(_));
        let adds = chunk.iter().filter(set).count();
        if adds > 0 {
            p.command(2 + 2 * adds).arg(b"ZADD").arg_parts(timers);
            for lead in chunk {
                if let TimerWrite::Set(t) = lead.timer {
                    p.arg_int(t).arg(lead.key.as_str().as_bytes());
                }
            }
        }
        let clear = |l: &&LeadWrite| matches!(l.timer, TimerWrite::Clear);
        let rems = chunk.iter().filter(clear).count();
        if rems > 0 {
            p.command(2 + rems).arg(b"ZREM").arg_parts(timers);
            for lead in chunk.iter().filter(clear) {
                p.arg(lead.key.as_str().as_bytes());
            }
        }
    }
    // An empty value removes the field.
    let sets = meta.iter().filter(|(_, v)| !v.is_empty()).count();
    if sets > 0 {
        p.command(2 + 2 * sets)
            .arg(b"HSET")
            .arg_parts(&[keys, b"meta"]);
        for (f, v) in meta.iter().filter(|(_, v)| !v.is_empty()) {
            p.arg(f.as_bytes()).arg(v.as_bytes());
        }
    }
    let removes = meta.len() - sets;
    if removes > 0 {
        p.command(2 + removes)
            .arg(b"HDEL")
            .arg_parts(&[keys, b"meta"]);
        for (f, _) in meta.iter().filter(|(_, v)| v.is_empty()) {
            p.arg(f.as_bytes());
        }
    }
}

fn parse_meta(flat: Vec<(String, Vec<u8>)>) -> ShardMeta {
    let mut meta = ShardMeta::default();
    for (field, value) in flat {
        let text = String::from_utf8_lossy(&value);
        let int = || text.parse::<i64>().ok();
        if field == "epoch" {
            meta.epoch = int().unwrap_or(0) as u64;
        } else if field == "seq" {
            meta.seq = int().unwrap_or(0) as u64;
        } else if field == "clock" {
            meta.clock = int();
        } else if field == "released" {
            meta.released = int();
        } else if let Some(topic) = field.strip_prefix("pos:") {
            if let Some(v) = int() {
                meta.positions.insert(topic.to_owned(), v);
            }
        } else if let Some(topic) = field.strip_prefix("seen:") {
            if let Some(v) = int() {
                meta.seen.insert(topic.to_owned(), v);
            }
        } else if let Some(segment) = field.strip_prefix("pop:") {
            if let Some(v) = int() {
                meta.population.insert(segment.to_owned(), v);
            }
        } else if let Some(hash) = field.strip_prefix("erased:")
            && let (Ok(h), Some(at)) = (u64::from_str_radix(hash, 16), int())
        {
            meta.erased.insert(h, at);
        }
    }
    meta.fresh = meta.positions.is_empty();
    meta
}

/// The shard record's fields a write sets: positions, merge progress,
/// clock, population.
fn meta_fields(w: &ShardWrite) -> Vec<(String, String)> {
    // The new sequence; the writes check the stored one is `seq` (or already
    // `seq + 1`: the same write sent again after an unanswered call).
    let mut meta: Vec<(String, String)> = vec![("seq".into(), (w.seq + 1).to_string())];
    for (topic, p) in &w.positions {
        meta.push((format!("pos:{topic}"), p.to_string()));
    }
    for (topic, t) in &w.seen {
        meta.push((format!("seen:{topic}"), t.to_string()));
    }
    if let Some(c) = w.clock {
        meta.push(("clock".into(), c.to_string()));
    }
    if let Some(r) = w.released {
        meta.push(("released".into(), r.to_string()));
    }
    for (segment, n) in &w.population {
        meta.push((format!("pop:{segment}"), n.to_string()));
    }
    // An empty value removes the field (HDEL).
    for (hash, at) in &w.erasures {
        let value = at.map(|t| t.to_string()).unwrap_or_default();
        meta.push((super::erasure_field(*hash), value));
    }
    meta
}

/// A sorted-set score as Redis replies it (timers are whole milliseconds).
fn score(v: &Value) -> Option<Millis> {
    let text = match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok()?,
        Value::SimpleString(s) => s.as_str(),
        Value::Double(d) => return Some(*d as Millis),
        _ => return None,
    };
    text.parse::<f64>().ok().map(|t| t as Millis)
}

fn refused(reply: &[Value]) -> Option<Written> {
    let code = match reply.first() {
        Some(Value::Int(c)) => *c,
        _ => return Some(Written::Lost),
    };
    let text = |v: Option<&Value>| match v {
        Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
        Some(Value::SimpleString(s)) => s.clone(),
        _ => String::new(),
    };
    match code {
        0 => Some(Written::Lost),
        1 => Some(Written::Fenced(text(reply.get(1)).parse().unwrap_or(0))),
        4 => Some(Written::Diverged(text(reply.get(1)).parse().unwrap_or(0))),
        2 => Some(Written::Backwards(
            text(reply.get(1)).trim_start_matches("pos:").to_owned(),
        )),
        _ => None,
    }
}

impl Store for RedisStore {
    fn take_shard(&self, shard: ShardId) -> Result<ShardMeta, StoreError> {
        let key = self.shard_key(shard, "meta");
        let flat: Vec<(String, Vec<u8>)> = self.with_conn(|c| self.take.key(&key).invoke(c))?;
        Ok(parse_meta(flat))
    }

    fn load(
        &self,
        shard: ShardId,
        epoch: u64,
        keys: &[&LeadKey],
    ) -> Result<Result<Vec<Option<Loaded>>, Written>, StoreError> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(self.batch) {
            let mut inv = self.load.prepare_invoke();
            inv.key(self.shard_key(shard, "meta"));
            inv.key(self.shard_key(shard, "timers"));
            for k in chunk {
                inv.key(self.lead_key(shard, k));
            }
            inv.arg(epoch);
            for k in chunk {
                inv.arg(k.as_str());
            }
            let reply: Vec<Value> = self.with_read(|c| inv.invoke(c))?;
            if let Some(r) = refused(&reply) {
                return Ok(Err(r));
            }
            let before = out.len();
            let mut fields = reply.into_iter().skip(1);
            while let Some(state) = fields.next() {
                let timer = fields.next().and_then(|t| score(&t));
                out.push(match state {
                    Value::BulkString(state) => Some(Loaded { state, timer }),
                    _ => None,
                });
            }
            // Trailing missing keys may be cut from the reply: pad the chunk.
            out.resize(before + chunk.len(), None);
        }
        out.resize(keys.len(), None);
        Ok(Ok(out))
    }

    fn timers(
        &self,
        shard: ShardId,
        after: Millis,
        limit: usize,
    ) -> Result<Vec<(LeadKey, Millis)>, StoreError> {
        let key = self.shard_key(shard, "timers");
        let min = if after == Millis::MIN {
            "-inf".to_owned()
        } else {
            format!("({after}")
        };
        let raw: Vec<(String, f64)> = self.with_read(|c| {
            redis::cmd("ZRANGEBYSCORE")
                .arg(&key)
                .arg(&min)
                .arg("+inf")
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .query(c)
        })?;
        Ok(raw
            .into_iter()
            .filter_map(|(k, t)| LeadKey::parse(&k).map(|k| (k, t as Millis)))
            .collect())
    }

    fn write(&self, writes: &[ShardWrite]) -> Result<Vec<Written>, StoreError> {
        let mut out = Vec::with_capacity(writes.len());
        for w in writes {
            let meta = meta_fields(w);
            out.push(match &*self.clients {
                Clients::Single(_) => self.write_watched(w, &meta)?,
                Clients::Cluster(_) => self.write_scripted(w, &meta)?,
            });
        }
        Ok(out)
    }

    fn find(
        &self,
        key: &LeadKey,
        shards: &[ShardId],
    ) -> Result<Vec<(ShardId, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for shard in shards {
            let k = self.lead_key(*shard, key);
            let v: Option<Vec<u8>> = self.with_read(|c| redis::cmd("GET").arg(&k).query(c))?;
            if let Some(v) = v {
                out.push((*shard, v));
            }
        }
        Ok(out)
    }

    fn layouts(&self) -> Result<Vec<Layout>, StoreError> {
        let key = format!("{}layouts", self.prefix);
        let all: Vec<(String, String)> =
            self.with_read(|c| redis::cmd("HGETALL").arg(&key).query(c))?;
        Ok(all
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_str(&v).ok())
            .collect())
    }

    fn register_layout(&self, layout: &Layout) -> Result<(), StoreError> {
        let key = format!("{}layouts", self.prefix);
        let text = serde_json::to_string(layout).map_err(|e| StoreError::Reply(e.to_string()))?;
        self.with_conn(|c| {
            redis::cmd("HSETNX")
                .arg(&key)
                .arg(format!("{:08x}", layout.hash()))
                .arg(&text)
                .query::<i64>(c)
        })?;
        Ok(())
    }

    fn ping(&self) -> Result<(), StoreError> {
        self.with_read(|c| redis::cmd("PING").query::<String>(c).map(|_| ()))
    }

    fn check(&self) -> Result<Health, StoreError> {
        let mut h = Health::default();
        let cluster = matches!(&*self.clients, Clients::Cluster(_));
        match self.ping() {
            Err(StoreError::Redis(e))
                if cluster && e.kind() == redis::ErrorKind::ClusterConnectionNotFound =>
            {
                return Err(StoreError::Config(format!(
                    "no Redis Cluster answers at redis.url ({e}); for a single server, set redis.mode = \"single\""
                )));
            }
            other => other?,
        }
        // A cluster node in single mode answers PING, then MOVED to most keys.
        if !cluster {
            let info: Option<String> = self
                .with_conn(|c| redis::cmd("INFO").arg("cluster").query(c))
                .ok();
            if info.is_some_and(|i| i.contains("cluster_enabled:1")) {
                return Err(StoreError::Config(
                    "this Redis is a cluster node: set redis.mode = \"cluster\" (and list its nodes in redis.url)"
                        .into(),
                ));
            }
        }
        // Taking, loading and (on a cluster) writing shards are Lua scripts.
        if let Err(e) =
            self.with_conn(|c| redis::cmd("EVAL").arg("return 1").arg(0).query::<i64>(c))
        {
            return Err(StoreError::Config(format!(
                "this Redis user cannot run Lua scripts, which leadscore needs (EVAL and EVALSHA: ACL +@scripting): {e}"
            )));
        }
        // Each primary of a cluster holds shards of its own: every one is asked.
        for (node, config) in self.config_everywhere(&["maxmemory-policy", "appendonly", "save"]) {
            let get = |name: &str| config.get(name).cloned();
            let on = if node.is_empty() {
                String::new()
            } else {
                format!(" on {node}")
            };
            match get("maxmemory-policy") {
                Some(policy) if policy != "noeviction" => h.refuse.push(format!(
                    "Redis maxmemory-policy is {policy:?}{on}: Redis may evict leadscore's state (leads, \
                     positions, owner epochs) when it fills up, which silently loses scores. Set \
                     `maxmemory-policy noeviction` (leadscore then holds consumption while Redis is full), \
                     or set redis.allow_eviction = true to accept the risk."
                )),
                Some(_) => {}
                None => h.warn.push(format!(
                    "cannot read Redis's maxmemory-policy{on} (CONFIG is disabled?): make sure it is noeviction"
                )),
            }
            let (aof, save) = (get("appendonly"), get("save"));
            if aof.as_deref() == Some("no") && save.as_deref().is_some_and(str::is_empty) {
                h.warn.push(format!(
                    "Redis persistence is off{on} (appendonly no, no save points): a Redis restart loses every \
                     score; leadscore will then stop (state lost) until Redis is restored or the consumer \
                     group is replaced"
                ));
            }
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_and_refusals_parse() {
        let m = parse_meta(vec![
            ("epoch".into(), b"3".to_vec()),
            ("pos:events.web".into(), b"42".to_vec()),
            ("seen:events.web".into(), b"1700".to_vec()),
            ("pop:hot".into(), b"7".to_vec()),
            ("clock".into(), b"99".to_vec()),
        ]);
        assert_eq!(m.epoch, 3);
        assert!(!m.fresh);
        // Taken twice after a flush, never written: still fresh.
        assert!(parse_meta(vec![("epoch".into(), b"2".to_vec())]).fresh);
        assert_eq!(m.positions["events.web"], 42);
        assert_eq!(m.population["hot"], 7);
        assert_eq!(refused(&[Value::Int(3)]), None);
        assert_eq!(refused(&[Value::Int(0)]), Some(Written::Lost));
        assert_eq!(
            refused(&[Value::Int(4), Value::BulkString(b"2".to_vec())]),
            Some(Written::Diverged(2))
        );
        assert!(super::super::takes_write(0, 0) && super::super::takes_write(3, 3));
        assert!(super::super::takes_write(4, 3), "the same write sent again");
        assert!(!super::super::takes_write(2, 3) && !super::super::takes_write(5, 3));
        assert_eq!(
            refused(&[Value::Int(1), Value::BulkString(b"5".to_vec())]),
            Some(Written::Fenced(5))
        );
        assert_eq!(
            refused(&[Value::Int(2), Value::BulkString(b"pos:t".to_vec())]),
            Some(Written::Backwards("t".into()))
        );
    }
}
