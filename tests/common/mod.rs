//! Shared helpers for the integration tests: a real Kafka-protocol broker
//! (tansu) and a real Redis, each started per test on a free loopback port
//! and stopped when the test ends; the `leadscore` binary run as a process.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not listen on {port} within 20 s");
}

/// A random suffix for topic, group and key names.
pub fn unique(name: &str) -> String {
    format!("{name}-{:08x}", rand::random::<u32>())
}

fn tansu_binary() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return p.into();
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let cargo_bin = PathBuf::from(home).join(".cargo/bin/tansu");
    if cargo_bin.exists() {
        cargo_bin
    } else {
        "tansu".into()
    }
}

/// A Redis server for one test, or a Redis Cluster (see [`Redis::start_cluster`]).
pub struct Redis {
    child: Child,
    pub port: u16,
    /// `redis://` URL; for a cluster, every node's, comma-separated.
    pub url: String,
    dir: Option<tempfile::TempDir>,
    /// A cluster's nodes other than the first (`child`, `port`).
    others: Vec<(Child, u16)>,
}

/// The cluster node settings of the tests: a failed primary is replaced by
/// its replica after about two seconds.
const CLUSTER_NODE_TIMEOUT_MS: &str = "2000";

impl Redis {
    pub fn start() -> Redis {
        Self::spawn(free_port(), None)
    }

    /// A Redis whose data survives a restart (append-only file, fsync always).
    pub fn start_persistent() -> Redis {
        Self::spawn(free_port(), Some(tempfile::tempdir().unwrap()))
    }

    /// A Redis with extra server arguments (e.g. `--maxmemory-policy allkeys-lru`).
    pub fn start_with(extra: &[&str]) -> Redis {
        Self::spawn_with(free_port(), None, extra)
    }

    fn spawn(port: u16, dir: Option<tempfile::TempDir>) -> Redis {
        Self::spawn_with(port, dir, &[])
    }

    fn spawn_with(port: u16, dir: Option<tempfile::TempDir>, extra: &[&str]) -> Redis {
        let port_s = port.to_string();
        let mut args = vec!["--port", &port_s, "--bind", "127.0.0.1", "--save", ""];
        args.extend_from_slice(extra);
        let dir_s = dir.as_ref().map(|d| d.path().display().to_string());
        match &dir_s {
            Some(d) => args.extend([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                d.as_str(),
            ]),
            None => args.extend(["--appendonly", "no"]),
        }
        let mut child = Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (run scripts/test.sh, which installs it)");
        wait_for_port(port, "redis-server", &mut child);
        Redis {
            child,
            port,
            url: format!("redis://127.0.0.1:{port}/0"),
            dir,
            others: Vec::new(),
        }
    }

    /// A Redis Cluster of three primaries on loopback, each with one replica
    /// when `replicas`, created with `redis-cli --cluster create`; returns
    /// once every node reports `cluster_state:ok`.
    pub fn start_cluster(replicas: bool) -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let count = if replicas { 6 } else { 3 };
        let mut nodes: Vec<(Child, u16)> = Vec::new();
        for _ in 0..count {
            let port = free_port();
            let port_s = port.to_string();
            let conf = format!("nodes-{port}.conf");
            let mut child = Command::new("redis-server")
                .args([
                    "--port",
                    &port_s,
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--cluster-node-timeout",
                    CLUSTER_NODE_TIMEOUT_MS,
                    "--dir",
                ])
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server on PATH (run scripts/test.sh, which installs it)");
            wait_for_port(port, "redis-server (cluster node)", &mut child);
            nodes.push((child, port));
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|(_, p)| format!("127.0.0.1:{p}"))
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create").args(&addrs);
        if replicas {
            create.args(["--cluster-replicas", "1"]);
        }
        let out = create
            .arg("--cluster-yes")
            .output()
            .expect("redis-cli on PATH (package redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let url = addrs
            .iter()
            .map(|a| format!("redis://{a}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = nodes.into_iter();
        let (child, port) = nodes.next().unwrap();
        let redis = Redis {
            child,
            port,
            url,
            dir: Some(dir),
            others: nodes.collect(),
        };
        redis.wait_cluster_ok(Duration::from_secs(30));
        redis
    }

    /// Whether this is a cluster.
    pub fn is_cluster(&self) -> bool {
        !self.others.is_empty()
    }

    /// Ports of every node still running.
    pub fn node_ports(&self) -> Vec<u16> {
        std::iter::once(self.port)
            .chain(self.others.iter().map(|(_, p)| *p))
            .filter(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
            .collect()
    }

    /// A connection to one node.
    pub fn node_conn(&self, port: u16) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap()
    }

    /// Ports of the running primaries (every server, when not a cluster).
    pub fn primaries(&self) -> Vec<u16> {
        self.node_ports()
            .into_iter()
            .filter(|p| {
                let role: Vec<redis::Value> = redis::cmd("ROLE")
                    .query(&mut self.node_conn(*p))
                    .unwrap_or_default();
                matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master")
            })
            .collect()
    }

    /// Waits until every running node reports `cluster_state:ok`.
    pub fn wait_cluster_ok(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let ok = self.node_ports().iter().all(|p| {
                redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query::<String>(&mut self.node_conn(*p))
                    .is_ok_and(|i| i.contains("cluster_state:ok"))
            });
            if ok {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "cluster not ok");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The hash slot of a key, and the port of the primary serving it.
    pub fn slot_owner(&self, key: &str) -> (u16, u16) {
        let mut conn = self.node_conn(self.node_ports()[0]);
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut conn)
            .unwrap();
        let slots: Vec<(u16, u16, Vec<redis::Value>)> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query::<Vec<redis::Value>>(&mut conn)
            .unwrap()
            .into_iter()
            .map(|range| match range {
                redis::Value::Array(parts) => {
                    let int = |v: &redis::Value| match v {
                        redis::Value::Int(i) => *i as u16,
                        _ => 0,
                    };
                    let primary = match &parts[2] {
                        redis::Value::Array(p) => p.clone(),
                        _ => Vec::new(),
                    };
                    (int(&parts[0]), int(&parts[1]), primary)
                }
                _ => panic!("CLUSTER SLOTS: {range:?}"),
            })
            .collect();
        let (_, _, primary) = slots
            .iter()
            .find(|(lo, hi, _)| (*lo..=*hi).contains(&slot))
            .expect("slot served");
        let port = match &primary[1] {
            redis::Value::Int(p) => *p as u16,
            v => panic!("port {v:?}"),
        };
        (slot, port)
    }

    /// A node's cluster id.
    pub fn node_id(&self, port: u16) -> String {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut self.node_conn(port))
            .unwrap()
    }

    /// Moves one hash slot to another primary while clients use it, the way
    /// `redis-cli --cluster reshard` does: IMPORTING/MIGRATING, MIGRATE of its
    /// keys in small batches (clients get ASK meanwhile), then SETSLOT NODE on
    /// every primary.
    pub fn migrate_slot(&self, slot: u16, from: u16, to: u16) {
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let (mut src, mut dst) = (self.node_conn(from), self.node_conn(to));
        let _: () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("IMPORTING")
            .arg(&from_id)
            .query(&mut dst)
            .unwrap();
        let _: () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("MIGRATING")
            .arg(&to_id)
            .query(&mut src)
            .unwrap();
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(20)
                .query(&mut src)
                .unwrap();
            if keys.is_empty() {
                break;
            }
            let _: () = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query(&mut src)
                .unwrap();
            // Slowly, so that writers meet the slot half-moved.
            std::thread::sleep(Duration::from_millis(20));
        }
        for port in self.primaries() {
            let _: () = redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg("NODE")
                .arg(&to_id)
                .query(&mut self.node_conn(port))
                .unwrap();
        }
        self.wait_cluster_ok(Duration::from_secs(30));
    }

    /// Waits until every replica of the primary on `port` is online and has
    /// everything the primary had written when the wait began (writes after
    /// that may still be missing from it, as in any failover).
    pub fn wait_replicas_synced(&self, port: u16, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let info = || -> String {
            redis::cmd("INFO")
                .arg("replication")
                .query(&mut self.node_conn(port))
                .unwrap()
        };
        let field = |text: &str, name: &str| -> Option<i64> {
            text.split(',')
                .find_map(|kv| kv.strip_prefix(name)?.trim().parse().ok())
        };
        let first = info();
        let target = first
            .lines()
            .find_map(|l| field(l, "master_repl_offset:"))
            .expect("master_repl_offset in INFO replication");
        loop {
            let text = info();
            let replicas: Vec<&str> = text.lines().filter(|l| l.starts_with("slave")).collect();
            let synced = !replicas.is_empty()
                && replicas.iter().all(|l| {
                    l.contains("state=online") && field(l, "offset=").is_some_and(|o| o >= target)
                });
            if synced {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the replicas of {port} did not catch up:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILLs the node on `port`.
    pub fn kill_node(&mut self, port: u16) {
        if port == self.port {
            let _ = self.child.kill();
            let _ = self.child.wait();
            return;
        }
        for (child, p) in &mut self.others {
            if *p == port {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Starts a stopped persistent Redis again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        let dir = self.dir.take();
        *self = Self::spawn(self.port, dir);
    }

    /// Connections to every primary (the one server, when not a cluster).
    fn primary_conns(&self) -> Vec<redis::Connection> {
        if self.is_cluster() {
            self.primaries()
                .into_iter()
                .map(|p| self.node_conn(p))
                .collect()
        } else {
            vec![self.conn()]
        }
    }

    /// Every lead and visitor state under `prefix`, by key (`{pN}:l:<id>`).
    pub fn leads(&self, prefix: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
        let mut out = std::collections::BTreeMap::new();
        for mut conn in self.primary_conns() {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}{{p*}}:[la]:*"))
                .query(&mut conn)
                .unwrap();
            for k in keys {
                let v: Vec<u8> = redis::cmd("GET").arg(&k).query(&mut conn).unwrap();
                out.insert(k[prefix.len()..].to_owned(), v);
            }
        }
        out
    }

    /// The state of one lead, wherever its shard is.
    pub fn lead(&self, prefix: &str, id: &str) -> Option<Vec<u8>> {
        let suffix = format!(":l:{id}");
        self.leads(prefix)
            .into_iter()
            .find(|(k, _)| k.ends_with(&suffix))
            .map(|(_, v)| v)
    }

    /// Stored positions: `topic/partition` -> next offset.
    pub fn positions(&self, prefix: &str) -> std::collections::BTreeMap<String, i64> {
        let mut out = std::collections::BTreeMap::new();
        for (shard, fields) in self.shard_records(prefix) {
            let partition = shard.trim_start_matches('p');
            for (f, v) in fields {
                if let Some(topic) = f.strip_prefix("pos:") {
                    out.insert(format!("{topic}/{partition}"), v.parse().unwrap());
                }
            }
        }
        out
    }

    /// Every shard's stored record (`{prefix}{pN}:meta`) on every primary,
    /// as (shard name `pN`, its fields).
    pub fn shard_records(
        &self,
        prefix: &str,
    ) -> Vec<(String, std::collections::HashMap<String, String>)> {
        let mut out = Vec::new();
        for mut conn in self.primary_conns() {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}{{p*}}:meta"))
                .query(&mut conn)
                .unwrap();
            for k in keys {
                let shard = k[prefix.len()..]
                    .trim_start_matches('{')
                    .split('}')
                    .next()
                    .unwrap_or("")
                    .to_owned();
                let fields = redis::cmd("HGETALL").arg(&k).query(&mut conn).unwrap();
                out.push((shard, fields));
            }
        }
        out
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Sends a signal (`STOP`, `CONT`, …) to the server (the first node of a cluster).
    pub fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for (child, _) in &mut self.others {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A tansu broker for one test.
pub struct Broker {
    child: Child,
    pub port: u16,
    pub brokers: String,
    dir: tempfile::TempDir,
    storage: String,
    /// SCRAM credentials every client of this broker uses, if it requires them.
    pub sasl: Option<(String, String)>,
}

impl Broker {
    /// A broker storing in sqlite in its own directory, so its data survives
    /// [`Broker::restart`]. Not tansu's memory engine: in 0.6.0 it cannot serve
    /// a fetch from an offset inside a stored record batch (it answers with no
    /// records, or repeats a later batch under the wrong offsets), and every
    /// consumer that resumes from a committed position does exactly that.
    pub fn start() -> Broker {
        Self::start_with(
            free_port(),
            "sqlite://tansu.db".into(),
            tempfile::tempdir().unwrap(),
            false,
        )
    }

    /// A broker requiring SASL/SCRAM-SHA-256 from every client: `topics` are
    /// created and the user is made while it runs without authentication
    /// (tansu's own client cannot authenticate), then it restarts with it.
    pub fn start_sasl(topics: &[&str], partitions: i32, user: &str, password: &str) -> Broker {
        let open = Self::start();
        open.create_topics(topics, partitions);
        let status = Command::new(tansu_binary())
            .current_dir(open.dir.path())
            .args([
                "user",
                "create",
                "--broker",
                &format!("tcp://127.0.0.1:{}", open.port),
                "--mechanism",
                "scram256",
                user,
                password,
            ])
            .status()
            .unwrap();
        assert!(status.success(), "tansu user create");
        let mut me = open;
        let _ = me.child.kill();
        let _ = me.child.wait();
        let (port, storage) = (me.port, me.storage.clone());
        let dir = std::mem::replace(&mut me.dir, tempfile::tempdir().unwrap());
        let mut broker = Self::start_with(port, storage, dir, true);
        broker.sasl = Some((user.to_owned(), password.to_owned()));
        broker
    }

    /// Client properties for this broker (with SASL when it requires it).
    pub fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        if let Some((user, password)) = &self.sasl {
            c.set("security.protocol", "SASL_PLAINTEXT")
                .set("sasl.mechanism", "SCRAM-SHA-256")
                .set("sasl.username", user)
                .set("sasl.password", password);
        }
        c
    }

    fn start_with(port: u16, storage: String, dir: tempfile::TempDir, auth: bool) -> Broker {
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("broker.log"))
            .unwrap();
        let mut args = vec![
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            &storage,
        ];
        if auth {
            args.push("--authentication");
        }
        let mut child = Command::new(tansu_binary())
            .current_dir(dir.path())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tansu installed (run scripts/test.sh, which installs it)");
        wait_for_port(port, "tansu", &mut child);
        Broker {
            child,
            port,
            brokers: format!("127.0.0.1:{port}"),
            dir,
            storage,
            sasl: None,
        }
    }

    /// Kills the broker and starts it again on the same port and storage.
    pub fn restart(self) -> Broker {
        let mut me = self;
        let _ = me.child.kill();
        let _ = me.child.wait();
        let (port, storage, sasl) = (me.port, me.storage.clone(), me.sasl.clone());
        let dir = std::mem::replace(&mut me.dir, tempfile::tempdir().unwrap());
        let mut broker = Self::start_with(port, storage, dir, sasl.is_some());
        broker.sasl = sasl;
        broker
    }

    pub fn create_topics(&self, topics: &[&str], partitions: i32) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(leadscore::kafka::create_topics_with(
            &self.client(),
            topics,
            partitions,
        ))
        .expect("topics created");
    }

    pub fn producer(&self) -> ThreadedProducer<DefaultProducerContext> {
        self.client()
            .set("linger.ms", "1")
            .set("enable.idempotence", "true")
            .create()
            .unwrap()
    }

    /// Produces and waits for the acknowledgement.
    pub fn produce(&self, topic: &str, items: &[(&str, Vec<u8>)]) {
        let p = self.producer();
        for (key, payload) in items {
            let mut record = BaseRecord::to(topic).key(*key).payload(&payload[..]);
            loop {
                match p.send(record) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        record = r;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
        p.flush(Duration::from_secs(30)).unwrap();
    }

    /// Reads a topic from the beginning until `count` messages arrived or `timeout` passed.
    pub fn read(
        &self,
        topic: &str,
        partitions: i32,
        count: usize,
        timeout: Duration,
    ) -> Vec<OwnedMessage> {
        let consumer: BaseConsumer = self
            .client()
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + timeout;
        while out.len() < count && Instant::now() < deadline {
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                out.push(m.unwrap().detach());
            }
        }
        out
    }

    /// The group's committed offsets for a topic's partitions (-1 where none).
    pub fn committed(&self, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
        let consumer: BaseConsumer = self.client().set("group.id", group).create().unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
        let got = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .unwrap();
        (0..partitions)
            .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => -1,
            })
            .collect()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Topic, group and key names unique to one test.
#[derive(Clone, Debug)]
pub struct Names {
    pub web: String,
    pub adpixel: String,
    pub email: String,
    pub crm: String,
    pub changes: String,
    pub handoffs: String,
    pub dead: String,
    pub group: String,
    pub prefix: String,
}

impl Names {
    pub fn new() -> Names {
        let id = unique("t");
        Names {
            web: format!("{id}.web"),
            adpixel: format!("{id}.adpixel"),
            email: format!("{id}.email"),
            crm: format!("{id}.crm"),
            changes: format!("{id}.segment-changes"),
            handoffs: format!("{id}.handoffs"),
            dead: format!("{id}.dead-letter"),
            group: format!("{id}-group"),
            prefix: format!("{id}:"),
        }
    }

    pub fn all(&self) -> Vec<&str> {
        vec![
            &self.web,
            &self.adpixel,
            &self.email,
            &self.crm,
            &self.changes,
            &self.handoffs,
            &self.dead,
        ]
    }
}

/// The leadscore binary running as a process.
pub struct Service {
    child: Child,
    pub http: String,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Service {
    /// Starts `leadscore run` against the broker and Redis with `extra` environment.
    pub fn start(broker: &Broker, redis: &Redis, names: &Names, extra: &[(&str, &str)]) -> Service {
        let mut service = Self::spawn(broker, redis, names, extra);
        service.wait_ready();
        service
    }

    /// Starts the service without waiting for it to be ready.
    pub fn spawn_unready(
        broker: &Broker,
        redis: &Redis,
        names: &Names,
        extra: &[(&str, &str)],
    ) -> Service {
        Self::spawn(broker, redis, names, extra)
    }

    /// Runs the service expecting it to stop by itself: its exit status and log.
    pub fn run_to_exit(
        broker: &Broker,
        redis: &Redis,
        names: &Names,
        extra: &[(&str, &str)],
        timeout: Duration,
    ) -> (ExitStatus, String) {
        let mut service = Self::spawn(broker, redis, names, extra);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = service.child.try_wait().unwrap() {
                return (status, service.logs());
            }
            assert!(
                Instant::now() < deadline,
                "still running; log:\n{}",
                service.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn spawn(broker: &Broker, redis: &Redis, names: &Names, extra: &[(&str, &str)]) -> Service {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut env: HashMap<String, String> = [
            ("LEADSCORE__KAFKA__BROKERS", broker.brokers.clone()),
            ("LEADSCORE__KAFKA__GROUP_ID", names.group.clone()),
            ("LEADSCORE__KAFKA__TOPICS__WEB", names.web.clone()),
            ("LEADSCORE__KAFKA__TOPICS__ADPIXEL", names.adpixel.clone()),
            ("LEADSCORE__KAFKA__TOPICS__EMAIL", names.email.clone()),
            ("LEADSCORE__KAFKA__TOPICS__CRM", names.crm.clone()),
            (
                "LEADSCORE__KAFKA__TOPICS__SEGMENT_CHANGES",
                names.changes.clone(),
            ),
            ("LEADSCORE__KAFKA__TOPICS__HANDOFFS", names.handoffs.clone()),
            ("LEADSCORE__KAFKA__TOPICS__DEAD_LETTER", names.dead.clone()),
            ("LEADSCORE__KAFKA__CONSUMER__FETCH_WAIT_MAX_MS", "10".into()),
            // A member that leaves without the broker noticing holds the
            // group until its session times out: keep that short in tests.
            (
                "LEADSCORE__KAFKA__CONSUMER__SESSION_TIMEOUT_MS",
                "6000".into(),
            ),
            ("LEADSCORE__SHUTDOWN__DRAIN_TIMEOUT_MS", "5000".into()),
            ("LEADSCORE__REDIS__URL", redis.url.clone()),
            ("LEADSCORE__REDIS__KEY_PREFIX", names.prefix.clone()),
            ("LEADSCORE__REDIS__FLUSH_INTERVAL_MS", "50".into()),
            ("LEADSCORE__HTTP__LISTEN", format!("127.0.0.1:{port}")),
            ("LEADSCORE__LOG__LEVEL", "info,librdkafka=warn".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        if redis.is_cluster() {
            env.insert("LEADSCORE__REDIS__MODE".into(), "cluster".into());
        }
        if let Some((user, password)) = &broker.sasl {
            for side in ["CONSUMER", "PRODUCER"] {
                for (k, v) in [
                    ("SECURITY_PROTOCOL", "SASL_PLAINTEXT"),
                    ("SASL_MECHANISM", "SCRAM-SHA-256"),
                    ("SASL_USERNAME", user.as_str()),
                    ("SASL_PASSWORD", password.as_str()),
                ] {
                    env.insert(format!("LEADSCORE__KAFKA__{side}__{k}"), v.to_owned());
                }
            }
        }
        for (k, v) in extra {
            env.insert((*k).to_owned(), (*v).to_owned());
        }
        // For debugging a failing test: a chattier log, kept after the test.
        if let Ok(level) = std::env::var("LEADSCORE_TEST_LOG_LEVEL") {
            env.insert("LEADSCORE__LOG__LEVEL".into(), level);
        }
        let log = dir.path().join("service.log");
        let child = Command::new(env!("CARGO_BIN_EXE_leadscore"))
            .arg("run")
            .envs(env)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Service {
            child,
            http: format!("127.0.0.1:{port}"),
            log,
            _dir: dir,
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for `/readyz` to answer 200; a service that exits meanwhile
    /// (a settings error) fails at once with its log.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if matches!(self.get("/readyz"), Some((200, _))) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "service exited ({status}) before it was ready; log:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("service not ready in 30 s; log:\n{}", self.logs());
    }

    /// GET over plain HTTP/1.1: (status, body).
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(&self.http, path)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        self.sigterm()
    }

    /// Sends SIGTERM and checks that the service exits 0 and that its log
    /// has no ERROR line (`what` names the stop in the failure message):
    /// an SRE who alerts on errors is not paged by a rollout.
    /// Returns the log.
    pub fn stop_cleanly(mut self, what: &str) -> String {
        let status = self.sigterm();
        let log = self.logs();
        assert!(status.success(), "{what}: SIGTERM exits 0; log:\n{log}");
        let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
        assert!(errors.is_empty(), "{what}: errors logged: {errors:#?}");
        log
    }

    fn sigterm(&mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "service did not stop within 40 s of SIGTERM; log:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: a crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The sum of a counter's samples in /metrics.
    pub fn counter(&self, name: &str) -> u64 {
        let (_, body) = self.get("/metrics").expect("metrics");
        leadscore::metrics::sum_samples(&body, name)
    }

    /// Waits until `events_consumed + dead_lettered + duplicates` reaches `n`.
    pub fn wait_consumed(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.counter("leadscore_events_consumed_total")
                + self.counter("leadscore_dead_lettered_total")
                + self.counter("leadscore_duplicates_skipped_total");
            if got >= n {
                return;
            }
            if Instant::now() > deadline {
                panic!("consumed {got} of {n}; log:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Ok(dir) = std::env::var("LEADSCORE_TEST_KEEP_LOGS") {
            let to = PathBuf::from(dir).join(format!("service-{}.log", self.child.id()));
            let _ = std::fs::copy(&self.log, to);
        }
    }
}

pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// Event times a little before now, for tests whose outcome depends on the
/// order of events and timers. A shard whose inputs are all idle (after
/// `idle_timeout_ms`, 1 s by default) moves its clock with the wall clock, so
/// events dated days ago that arrive after that are late: the timers due
/// between them (decay crossings) fire first, and a hand-off can fail to
/// qualify. Fixed dates held only while the test produced within that second.
pub struct Recent(leadscore::event::Millis);

impl Recent {
    /// Half an hour ago, on the minute.
    pub fn new() -> Self {
        let ago = leadscore::event::wall_clock_ms() - 30 * 60_000;
        Self(ago - ago % 60_000)
    }

    /// `minutes` after the base, as the service renders it
    /// (`…:00.000Z`); inputs take the same form as `occurred_at`.
    pub fn at(&self, minutes: i64) -> String {
        leadscore::event::format_rfc3339(self.0 + minutes * 60_000)
    }
}

/// A JSON input event.
pub fn event(id: &str, lead: &str, at: &str, kind: &str, attrs: &[(&str, &str)]) -> Vec<u8> {
    let attrs: serde_json::Map<String, serde_json::Value> = attrs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::Value::String((*v).to_owned())))
        .collect();
    serde_json::json!({
        "event_id": id, "lead_id": lead, "occurred_at": at, "type": kind, "attributes": attrs
    })
    .to_string()
    .into_bytes()
}

pub fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    let headers = m.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

pub fn json(m: &OwnedMessage) -> serde_json::Value {
    serde_json::from_slice(m.payload().unwrap_or_default()).unwrap()
}

/// Asserts two sets of stored lead states are equal, showing the first
/// differing lead field by field.
pub fn assert_same_leads(
    got: &std::collections::BTreeMap<String, Vec<u8>>,
    want: &std::collections::BTreeMap<String, Vec<u8>>,
    what: &str,
) {
    if got == want {
        return;
    }
    let engine = leadscore::engine::Engine::new(
        std::sync::Arc::new(leadscore::engine::Rules::default_rules()),
        leadscore::engine::EngineConfig::default(),
    );
    let keys: std::collections::BTreeSet<&String> = got.keys().chain(want.keys()).collect();
    let differing: Vec<&&String> = keys
        .iter()
        .filter(|k| got.get(**k) != want.get(**k))
        .collect();
    let first = differing[0];
    let show = |b: Option<&Vec<u8>>| {
        b.map_or_else(
            || "absent".to_owned(),
            |b| format!("{:#?}", engine.decode(b)),
        )
    };
    let mut by_shard = std::collections::BTreeMap::<&str, usize>::new();
    for k in &differing {
        *by_shard
            .entry(k.split('}').next().unwrap_or(""))
            .or_default() += 1;
    }
    panic!(
        "{what}: {} of {} leads differ (by shard: {by_shard:?}; got {}, want {}); first {first}:\n got: {}\nwant: {}",
        differing.len(),
        want.len(),
        got.len(),
        want.len(),
        show(got.get(*first)),
        show(want.get(*first)),
    );
}

/// Asserts that each shard's stored segment populations (the `pop:` fields
/// of its record, which `leadscore_segment_population_leads` reports) equal
/// a recount of the leads stored in that shard by segment, under the
/// default rules. Segments stored with a count of 0 are left out.
pub fn assert_populations_match(redis: &Redis, prefix: &str) {
    use leadscore::engine::{Engine, EngineConfig, Kind, Rules, Segment};
    use std::collections::BTreeMap;
    let engine = Engine::new(
        std::sync::Arc::new(Rules::default_rules()),
        EngineConfig::default(),
    );
    let shard_of = |key: &str| {
        key.trim_start_matches('{')
            .split('}')
            .next()
            .unwrap_or("")
            .to_owned()
    };
    let mut counted: BTreeMap<(String, String), i64> = BTreeMap::new();
    for (key, bytes) in redis.leads(prefix) {
        let state = engine.decode(&bytes).unwrap();
        if matches!(state.kind, Kind::Lead) {
            let segment = Segment::of(&state).name(engine.rules()).to_owned();
            *counted.entry((shard_of(&key), segment)).or_default() += 1;
        }
    }
    let mut stored: BTreeMap<(String, String), i64> = BTreeMap::new();
    for (shard, fields) in redis.shard_records(prefix) {
        for (f, v) in fields {
            if let Some(segment) = f.strip_prefix("pop:") {
                let n: i64 = v.parse().unwrap();
                if n != 0 {
                    stored.insert((shard.clone(), segment.to_owned()), n);
                }
            }
        }
    }
    assert!(!counted.is_empty(), "no leads stored under {prefix}");
    assert_eq!(
        stored, counted,
        "stored segment populations (left) against a recount of the stored leads (right), by (shard, segment)"
    );
}

/// How many stored states are anonymous visitors, and how many are visitors
/// merged into a lead (aliases).
pub fn visitors_and_aliases(
    states: &std::collections::BTreeMap<String, Vec<u8>>,
) -> (usize, usize) {
    let engine = leadscore::engine::Engine::new(
        std::sync::Arc::new(leadscore::engine::Rules::default_rules()),
        leadscore::engine::EngineConfig::default(),
    );
    let mut counts = (0, 0);
    for bytes in states.values() {
        match engine.decode(bytes).map(|s| s.kind) {
            Ok(leadscore::engine::Kind::Visitor) => counts.0 += 1,
            Ok(leadscore::engine::Kind::Alias(_)) => counts.1 += 1,
            _ => {}
        }
    }
    counts
}

/// One message of a workload: input index (web, adpixel, email, crm), partition, key, payload.
pub type Msg = (usize, i32, String, Vec<u8>);

/// A workload over the four input topics with the skew production has:
/// web events in time order (a couple of seconds of jitter), ad-pixel events
/// a minute behind, email engagement up to an hour behind web (provider
/// webhooks, a lag that drifts between 0 and 60 minutes), and CRM updates in
/// nightly syncs, up to a day behind. Two in a hundred events are produced
/// twice (a producer retry). Returned in production order. Event times start
/// on 2025-01-06, so every decay timer is long due by the time a run ends.
///
/// A quarter of the leads also browse with a cookie, as a web tracker sends
/// them: half of their web events carry only the cookie (`anonymous_id`, no
/// lead id, keyed by the cookie), before and after they identify, and their
/// form submits and booking starts carry both ids (the identifying events).
/// For half of those leads the tracker sends the cookie-only events to the
/// lead's partition, so the visitor is stitched into the lead when it
/// identifies and later cookie-only events follow the alias; for the other
/// half, to another partition, where the visitor stays a separate, silent
/// visitor (README, known limitations). Anonymous and identified events
/// share every web batch. A fifth of the events are page views with what a
/// web tracker sends beside the URL (title, referrer, three UTM
/// parameters): more attributes than a waiting event keeps inline.
pub fn skewed_workload(events: usize, leads: usize, partitions: i32, seed: u64) -> Vec<Msg> {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    let mut rng = SmallRng::seed_from_u64(seed);
    let start = 1_736_121_600_000_i64; // 2025-01-06T00:00:00Z
    const DAY: i64 = 86_400_000;
    let mut out: Vec<(i64, usize, i32, String, Vec<u8>)> = Vec::with_capacity(events + events / 40);
    for i in 0..events {
        let at = start + i as i64 * 30_000;
        let lead = rng.random_range(0..leads);
        let key = format!("lead-{lead}");
        let partition = (lead % partitions as usize) as i32;
        let pick = rng.random_range(0..100);
        let (input, kind, attrs, channel): (usize, &str, serde_json::Value, Option<&str>) =
            match pick {
                0..20 => (
                    0,
                    "page_view",
                    serde_json::json!({
                        "url": "/menu", "title": "Menu", "referrer": "https://www.google.com/",
                        "utm_source": "google", "utm_medium": "cpc", "utm_campaign": "spring",
                    }),
                    None,
                ),
                20..32 => (0, "page_view", serde_json::json!({"url": "/pricing"}), None),
                32..36 => (0, "page_view", serde_json::json!({"url": "/careers"}), None),
                36..42 => (0, "booking_started", serde_json::json!({}), None),
                42..46 => (0, "booking_abandoned", serde_json::json!({}), None),
                46..50 => (
                    0,
                    "chat_message",
                    serde_json::json!({"intent": "booking"}),
                    None,
                ),
                50..52 => (0, "form_submit", serde_json::json!({}), None),
                52 => (0, "booking_completed", serde_json::json!({}), None),
                53..60 => (
                    1,
                    "impression",
                    serde_json::json!({"campaign_id": "c1"}),
                    None,
                ),
                60..65 => (1, "click", serde_json::json!({"ad_id": "a1"}), None),
                65..67 => (1, "add_to_cart", serde_json::json!({}), None),
                67..77 => (
                    2,
                    "delivered",
                    serde_json::json!({}),
                    if pick % 3 == 0 { Some("sms") } else { None },
                ),
                77..84 => (2, "open", serde_json::json!({}), None),
                84..89 => (
                    2,
                    "click",
                    serde_json::json!({"link_url": "/pricing"}),
                    None,
                ),
                89..91 => (2, "reply", serde_json::json!({}), Some("zalo")),
                91 => (2, "unsubscribe", serde_json::json!({}), None),
                92..96 => (
                    3,
                    "profile_updated",
                    serde_json::json!({"industry": "catering", "company_size": "120", "budget": "5000"}),
                    None,
                ),
                96..98 => (
                    3,
                    "lifecycle_changed",
                    serde_json::json!({"stage": "not_ready"}),
                    None,
                ),
                98 => (
                    3,
                    "lifecycle_changed",
                    serde_json::json!({"stage": "opportunity_open"}),
                    None,
                ),
                _ => (
                    3,
                    "lifecycle_changed",
                    serde_json::json!({"stage": "opportunity_lost"}),
                    None,
                ),
            };
        let tracked = lead % 4 == 0;
        let identifying = matches!(kind, "form_submit" | "booking_started");
        let anonymous = tracked && input == 0 && !identifying && rng.random_range(0..2) == 0;
        let cookie = format!("cookie-{lead}");
        let (key, partition) = if !anonymous {
            (key, partition)
        } else if (lead / 4) % 2 == 0 {
            (cookie.clone(), partition)
        } else {
            (cookie.clone(), (partition + 1) % partitions)
        };
        let produce_at = match input {
            0 => at + rng.random_range(0..2_000),
            1 => at + 60_000 + rng.random_range(0..1_000),
            2 => {
                // A webhook lag drifting between 0 and 60 minutes; slow enough
                // that the email topic stays in event-time order.
                let phase = (at - start) as f64 / (6.0 * 3_600_000.0) * std::f64::consts::TAU;
                at + (1_800_000.0 * (1.0 + phase.sin())) as i64 + rng.random_range(0..1_000)
            }
            // The nightly sync after the day ends (at least an hour after the event), in event order.
            _ => {
                let night = (at + 3_600_000).div_euclid(DAY) * DAY + DAY;
                night + (at - night + DAY) / 1000
            }
        };
        let mut payload = serde_json::json!({
            "event_id": format!("e-{seed}-{i}"), "occurred_at": leadscore::event::format_rfc3339(at),
            "type": kind, "attributes": attrs,
        });
        if anonymous {
            payload["anonymous_id"] = cookie.into();
        } else {
            payload["lead_id"] = format!("lead-{lead}").into();
            if tracked && identifying {
                payload["anonymous_id"] = cookie.into();
            }
        }
        if let Some(c) = channel {
            payload["channel"] = c.into();
        }
        let bytes = payload.to_string().into_bytes();
        if rng.random_range(0..100) < 2 {
            out.push((
                produce_at + 5_000,
                input,
                partition,
                key.clone(),
                bytes.clone(),
            ));
        }
        out.push((produce_at, input, partition, key, bytes));
    }
    out.sort_by_key(|(p, input, ..)| (*p, *input));
    out.into_iter()
        .map(|(_, i, p, k, b)| (i, p, k, b))
        .collect()
}

impl Names {
    /// The input topic of input index `i` (web, adpixel, email, crm).
    pub fn input(&self, i: usize) -> &str {
        [&self.web, &self.adpixel, &self.email, &self.crm][i]
    }
}

impl Broker {
    /// Produces workload messages to their topics and partitions, waiting for acks.
    pub fn produce_msgs(&self, names: &Names, items: &[Msg]) {
        let p = self.producer();
        for (input, partition, key, payload) in items {
            let mut record = BaseRecord::to(names.input(*input))
                .partition(*partition)
                .key(key.as_str())
                .payload(&payload[..]);
            loop {
                match p.send(record) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        record = r;
                        p.poll(Duration::from_millis(1));
                    }
                }
            }
        }
        p.flush(Duration::from_secs(60)).unwrap();
    }

    /// Committed offsets summed over every input topic's partitions.
    pub fn committed_inputs(&self, names: &Names, partitions: i32) -> i64 {
        (0..4)
            .map(|i| {
                self.committed(&names.group, names.input(i), partitions)
                    .iter()
                    .filter(|c| **c > 0)
                    .sum::<i64>()
            })
            .sum()
    }
}

impl Service {
    /// The service's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`STOP`, `CONT`, …).
    pub fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
    }

    /// Whether the process has exited; its status if so.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }
}

impl Service {
    /// Waits until the service is quiet: every owned shard's clock has caught
    /// up with the wall clock (so every due timer fired), nothing waits to be
    /// written, and its counts stopped moving.
    pub fn wait_settled(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        let mut stable_since = Instant::now();
        loop {
            let metrics = self.get("/metrics").map(|m| m.1).unwrap_or_default();
            let value = |name: &str| -> Vec<f64> {
                metrics
                    .lines()
                    .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
                    .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
                    .collect()
            };
            let caught_up = value("leadscore_shard_watermark_lag_seconds")
                .iter()
                .all(|lag| *lag < 120.0);
            let clean = value("leadscore_dirty_leads").iter().all(|d| *d == 0.0)
                && value("leadscore_merge_buffered_events")
                    .iter()
                    .all(|d| *d == 0.0);
            let counts = format!(
                "{:?} {:?} {:?}",
                value("leadscore_segment_changes_total"),
                value("leadscore_events_consumed_total"),
                value("leadscore_outputs_produced_total")
            );
            if counts != last {
                last = counts;
                stable_since = Instant::now();
            }
            if caught_up && clean && stable_since.elapsed() >= Duration::from_millis(1500) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not settled in {timeout:?}; log:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Service {
    /// Any request over plain HTTP/1.1 with extra headers: (status, body).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(&self.http).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let mut req = format!(
            "{method} {path} HTTP/1.0\r\nHost: {}\r\nConnection: close\r\nContent-Length: 0\r\n",
            self.http
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let status = text.split(' ').nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Some((status, body))
    }
}

/// The Python interpreter of the test virtualenv (confluent-kafka[avro],
/// jsonschema), which `scripts/test.sh` creates: `LEADSCORE_TEST_PYTHON`, else
/// `.tmp/test-venv/bin/python`. Panics with how to get it when neither exists.
pub fn python() -> PathBuf {
    let path = std::env::var_os("LEADSCORE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tmp/test-venv/bin/python")
        });
    assert!(
        path.exists(),
        "{} is missing: run ./scripts/test.sh once (it creates the test virtualenv), \
         or set LEADSCORE_TEST_PYTHON to a python with tests/support/requirements.txt \
         and scripts/requirements-tests.txt installed",
        path.display()
    );
    path
}

/// Runs a Python script of the repository with the test interpreter: its
/// exit code, stdout and stderr.
pub fn run_python(args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
    let mut child = Command::new(python())
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        input.write_all(bytes).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A Confluent-compatible Schema Registry for one test
/// (`tests/support/registry.py`, in memory; it stops with the test).
pub struct SchemaRegistry {
    child: Child,
    pub url: String,
}

impl SchemaRegistry {
    pub fn start() -> SchemaRegistry {
        use std::io::BufRead;
        let mut child = Command::new(python())
            .args([
                "tests/support/registry.py",
                "--port",
                "0",
                "--exit-on-stdin-eof",
                "--quiet",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .strip_prefix("LISTENING ")
            .unwrap_or_else(|| panic!("registry.py said {line:?}"))
            .trim()
            .parse()
            .unwrap();
        SchemaRegistry {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    fn addr(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// A JSON request to the registry: status and body.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        http_request(self.addr(), method, path, body)
    }

    /// The requests it served so far, as (method, path).
    pub fn requests(&self) -> Vec<(String, String)> {
        let (_, body) = self.call("GET", "/__test/requests", None);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["method"].as_str().unwrap().to_owned(),
                    r["path"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }
}

impl Drop for SchemaRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request with an optional JSON body: status and body.
pub fn http_request(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
