#!/usr/bin/env python3
"""Produce / consume Confluent-framed Avro with confluent-kafka's own serializers.

This is the "real upstream client" side of leadscore's Avro interop tests: records are
written by confluent_kafka.schema_registry.avro.AvroSerializer and read by
AvroDeserializer, so leadscore is checked against Confluent's behaviour, not ours.

  produce --brokers B --registry URL --topic T --schema FILE.avsc --input FILE.ndjson
          [--evolve] [--no-auto-register] [--timeout S]
      One JSON input event per line (leadscore's JSON contract: event_id, lead_id,
      anonymous_id, occurred_at as RFC 3339 or int ms, type, attributes, channel...).
      Control fields, removed before encoding: "partition" (int, explicit partition),
      "key" (string, overrides the message key). Key = key or lead_id or anonymous_id,
      as plain UTF-8 bytes (not Avro). Subject: "<topic>-value" (TopicNameStrategy),
      auto.register.schemas=true unless --no-auto-register (then lookup only).
      --evolve: write with the schema plus one optional field
      {"name": "user_agent", "type": ["null","string"], "default": null}; its value is
      the line's "user_agent", else "avro-interop/evolved" (non-null, so the bytes
      really differ from the old schema's); and one more symbol, "scroll_depth", at the
      end of the "type" enum.
      Prints one line per message on stdout: {"partition","offset","schema_id","key"}.

  consume --brokers B --registry URL --topic T --count N --timeout S
          [--reader-schema FILE.avsc] [--timestamps millis|rfc3339] [--meta]
      Reads every partition from the beginning (assign, fresh group id, no commits),
      decodes with AvroDeserializer (writer schema only, unless --reader-schema) and
      prints each record as one JSON line. timestamp-millis fields are printed as integer
      milliseconds since the epoch (default) or RFC 3339 UTC with millisecond precision.
      With --meta each line is {"topic","partition","offset","key","schema_id","value"}.
      Stops after N records.

Exit codes: 0 ok; 1 consume: fewer than N records within the timeout / produce: not
every message was delivered within the timeout; 2 bad arguments or bad input line;
3 registry or (de)serialization error (e.g. a message that is not Confluent-framed).
Registry basic auth: put it in the URL, http://user:pass@127.0.0.1:PORT.
"""

from __future__ import annotations

import argparse
import base64
import copy
import datetime as dt
import json
import re
import sys
import time
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
CONTROL_FIELDS = ("partition", "key")
EVOLVED_FIELD = {
    "name": "user_agent",
    "type": ["null", "string"],
    "default": None,
    "doc": "Added by avro_interop.py --evolve (an optional field with a default).",
}
EVOLVED_DEFAULT = "avro-interop/evolved"
# --evolve also adds an event type upstream, as a tracker does when it ships a new one.
EVOLVED_SYMBOL = "scroll_depth"

RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})$"
)


class InputError(Exception):
    pass


def die(code: int, message: str) -> "NoReturn":  # noqa: F821
    print(f"avro_interop: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


# ---------------------------------------------------------------------------------------
# RFC 3339 <-> ms
def rfc3339_to_millis(text: str) -> int:
    """Like leadscore's parse_rfc3339: exact, then truncated toward zero to ms."""
    m = RFC3339.match(text)
    if not m:
        raise InputError(f"not an RFC 3339 timestamp: {text!r}")
    y, mo, d, h, mi, s = (int(x) for x in m.group(1, 2, 3, 4, 5, 6))
    frac, zone = m.group(7) or "", m.group(8)
    try:
        base = dt.datetime(y, mo, d, h, mi, s, tzinfo=dt.timezone.utc)
    except ValueError as e:
        raise InputError(f"bad timestamp {text!r}: {e}")
    offset = 0
    if zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        offset = sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    seconds = (base - EPOCH) // dt.timedelta(seconds=1) - offset
    nanos = seconds * 1_000_000_000 + int((frac + "000000000")[:9])
    return int(nanos / 1_000_000) if nanos < 0 else nanos // 1_000_000  # toward zero


def millis_to_rfc3339(ms: int) -> str:
    t = EPOCH + dt.timedelta(milliseconds=ms)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


# ---------------------------------------------------------------------------------------
# JSON line -> Avro datum (driven by the writer schema)
def _named(schema, names: dict):
    if isinstance(schema, str) and schema in names:
        return names[schema]
    return schema


def _collect_names(schema, names: dict, namespace: str | None = None):
    if isinstance(schema, list):
        for s in schema:
            _collect_names(s, names, namespace)
    elif isinstance(schema, dict):
        t = schema.get("type")
        if t in ("record", "enum", "fixed"):
            ns = schema.get("namespace", namespace)
            name = schema["name"]
            names[name] = schema
            if ns and "." not in name:
                names[f"{ns}.{name}"] = schema
            for f in schema.get("fields", []):
                _collect_names(f["type"], names, ns)
        elif t == "array":
            _collect_names(schema["items"], names, namespace)
        elif t == "map":
            _collect_names(schema["values"], names, namespace)


def to_avro(value, schema, names: dict, where: str):
    schema = _named(schema, names)
    if isinstance(schema, list):  # union: null or the first branch that accepts it
        if value is None:
            if "null" in schema:
                return None
            raise InputError(f"{where}: null is not allowed")
        errors = []
        for branch in schema:
            if branch == "null":
                continue
            try:
                return to_avro(value, branch, names, where)
            except InputError as e:
                errors.append(str(e))
        raise InputError("; ".join(errors) or f"{where}: no union branch fits")
    t = schema.get("type") if isinstance(schema, dict) else schema
    logical = schema.get("logicalType") if isinstance(schema, dict) else None
    if t == "long" and logical in ("timestamp-millis", "local-timestamp-millis"):
        if isinstance(value, str):
            return rfc3339_to_millis(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise InputError(f"{where}: expected an RFC 3339 string or integer ms, got {value!r}")
    if t == "null":
        if value is not None:
            raise InputError(f"{where}: expected null")
        return None
    if t == "string":
        if not isinstance(value, str):
            raise InputError(f"{where}: expected a string, got {json.dumps(value)}")
        return value
    if t in ("int", "long"):
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(f"{where}: expected an integer, got {json.dumps(value)}")
        return value
    if t in ("float", "double"):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise InputError(f"{where}: expected a number, got {json.dumps(value)}")
        return float(value)
    if t == "boolean":
        if not isinstance(value, bool):
            raise InputError(f"{where}: expected a boolean")
        return value
    if t == "enum":
        if value not in schema["symbols"]:
            raise InputError(f"{where}: {value!r} is not one of {schema['symbols']}")
        return value
    if t == "map":
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected an object")
        return {k: to_avro(v, schema["values"], names, f"{where}.{k}") for k, v in value.items()}
    if t == "array":
        if not isinstance(value, list):
            raise InputError(f"{where}: expected an array")
        return [to_avro(v, schema["items"], names, f"{where}[{i}]") for i, v in enumerate(value)]
    if t == "record":
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected an object")
        known = {f["name"] for f in schema["fields"]}
        extra = sorted(set(value) - known)
        if extra:
            raise InputError(f"{where or 'event'}: fields not in schema {schema['name']}: {extra}")
        out = {}
        for f in schema["fields"]:
            name = f["name"]
            if name in value:
                out[name] = to_avro(value[name], f["type"], names, f"{where}.{name}" if where else name)
            elif "default" in f:
                out[name] = copy.deepcopy(f["default"])
            else:
                raise InputError(f"missing required field {name!r}")
        return out
    raise InputError(f"{where}: unsupported schema type {t!r}")


# ---------------------------------------------------------------------------------------
# decoded datum -> JSON
def to_json(value, ts_format: str):
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:  # local-timestamp-*: fastavro gives naive datetimes
            value = value.replace(tzinfo=dt.timezone.utc)
        ms = (value - EPOCH) // dt.timedelta(milliseconds=1)
        return millis_to_rfc3339(ms) if ts_format == "rfc3339" else ms
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: to_json(v, ts_format) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v, ts_format) for v in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, uuid.UUID):
        return str(value)
    if hasattr(value, "as_tuple"):  # Decimal
        return str(value)
    return value


def schema_id_of(raw: bytes | None):
    if raw and len(raw) >= 5 and raw[0] == 0:
        return int.from_bytes(raw[1:5], "big")
    return None


# ---------------------------------------------------------------------------------------
def cmd_produce(args) -> int:
    try:
        with open(args.schema, encoding="utf-8") as f:
            schema_text = f.read()
        schema = json.loads(schema_text)
    except (OSError, ValueError) as e:
        die(2, f"cannot read schema {args.schema}: {e}")
    if args.evolve:
        if any(f["name"] == EVOLVED_FIELD["name"] for f in schema["fields"]):
            die(2, f"--evolve: schema already has a {EVOLVED_FIELD['name']!r} field")
        schema["fields"].append(dict(EVOLVED_FIELD))
        for f in schema["fields"]:
            if f["name"] == "type" and isinstance(f["type"], dict) and f["type"].get("type") == "enum":
                f["type"]["symbols"] = f["type"]["symbols"] + [EVOLVED_SYMBOL]
        schema["doc"] = schema.get("doc", "") + " [evolved by avro_interop.py]"
        schema_text = json.dumps(schema, indent=2)
    names: dict = {}
    _collect_names(schema, names)

    records = []
    try:
        with open(args.input, encoding="utf-8") if args.input != "-" else sys.stdin as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                    if not isinstance(event, dict):
                        raise InputError("a line must be a JSON object")
                    partition = event.pop("partition", None)
                    key = event.pop("key", None)
                    if args.evolve and EVOLVED_FIELD["name"] not in event:
                        event[EVOLVED_FIELD["name"]] = EVOLVED_DEFAULT
                    datum = to_avro(event, schema, names, "")
                except (ValueError, InputError) as e:
                    die(2, f"{args.input}:{lineno}: {e}")
                if partition is not None and (not isinstance(partition, int) or partition < 0):
                    die(2, f"{args.input}:{lineno}: partition must be a non-negative integer")
                if key is None:
                    key = event.get("lead_id") or event.get("anonymous_id")
                records.append((datum, key, partition))
    except OSError as e:
        die(2, f"cannot read {args.input}: {e}")

    registry = SchemaRegistryClient({"url": args.registry, "timeout": args.timeout})
    serializer = AvroSerializer(
        registry, schema_text,
        # TOPIC pinned: confluent-kafka >= 2.16 defaults to ASSOCIATED (GET /associations/...,
        # falling back to TOPIC on a 404); pinning it keeps the subject "<topic>-value"
        # without that extra call.
        conf={"auto.register.schemas": not args.no_auto_register, "subject.name.strategy.type": "TOPIC"},
    )
    producer = Producer({
        "bootstrap.servers": args.brokers,
        "client.id": "avro-interop",
        "linger.ms": 5,
        "acks": "all",
        "message.timeout.ms": int(args.timeout * 1000),
        "broker.address.family": "v4",
    })
    ctx = SerializationContext(args.topic, MessageField.VALUE)
    results: list = [None] * len(records)
    failures = []

    def on_delivery(i):
        def cb(err, msg):
            if err is not None:
                failures.append(f"message {i}: {err}")
            else:
                results[i] = {"partition": msg.partition(), "offset": msg.offset(),
                              "schema_id": schema_id_of(msg.value()),
                              "key": msg.key().decode() if msg.key() is not None else None}
        return cb

    for i, (datum, key, partition) in enumerate(records):
        try:
            value = serializer(datum, ctx)
        except Exception as e:  # SchemaRegistryError, SerializationError, ValueError...
            die(3, f"line {i + 1}: cannot serialize: {type(e).__name__}: {e}")
        kwargs = {"key": key.encode() if key is not None else None, "value": value,
                  "on_delivery": on_delivery(i)}
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                producer.produce(args.topic, **kwargs)
                break
            except BufferError:
                producer.poll(0.1)
            except KafkaException as e:
                die(1, f"line {i + 1}: produce failed: {e}")
        producer.poll(0)
    left = producer.flush(args.timeout)
    for r in results:
        if r is not None:
            print(json.dumps(r), flush=True)
    if left or failures or any(r is None for r in results):
        for f in failures:
            print(f"avro_interop: {f}", file=sys.stderr)
        die(1, f"{len(records) - sum(r is not None for r in results)} of {len(records)} not delivered")
    print(f"avro_interop: produced {len(records)} to {args.topic} "
          f"(subject {args.topic}-value, schema id {results[0]['schema_id'] if results else '-'})",
          file=sys.stderr, flush=True)
    return 0


def cmd_consume(args) -> int:
    reader_text = None
    if args.reader_schema:
        try:
            with open(args.reader_schema, encoding="utf-8") as f:
                reader_text = f.read()
        except OSError as e:
            die(2, f"cannot read {args.reader_schema}: {e}")
    registry = SchemaRegistryClient({"url": args.registry, "timeout": max(args.timeout, 1)})
    deserializer = AvroDeserializer(registry, reader_text, conf={"subject.name.strategy.type": "TOPIC"})
    consumer = Consumer({
        "bootstrap.servers": args.brokers,
        "group.id": f"avro-interop-{uuid.uuid4()}",
        "client.id": "avro-interop",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": 10,
        "broker.address.family": "v4",
    })
    deadline = time.monotonic() + args.timeout
    got = 0
    try:
        # assign every partition at its beginning (no group join: quick and deterministic)
        partitions = None
        while partitions is None:
            try:
                md = consumer.list_topics(args.topic, timeout=max(0.1, min(2.0, deadline - time.monotonic())))
                tmd = md.topics.get(args.topic)
                if tmd is not None and tmd.error is None and tmd.partitions:
                    partitions = sorted(tmd.partitions)
            except KafkaException:
                pass
            if partitions is None:
                if time.monotonic() >= deadline:
                    die(1, f"topic {args.topic} not found within {args.timeout}s")
                time.sleep(0.1)
        consumer.assign([TopicPartition(args.topic, p, OFFSET_BEGINNING) for p in partitions])
        while got < args.count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            msg = consumer.poll(min(remaining, 0.2))
            if msg is None:
                continue
            if msg.error():
                if msg.error().fatal():
                    die(3, f"consumer error: {msg.error()}")
                continue
            raw = msg.value()
            try:
                value = deserializer(raw, SerializationContext(msg.topic(), MessageField.VALUE, msg.headers()))
            except Exception as e:
                die(3, f"{msg.topic()}[{msg.partition()}]@{msg.offset()}: cannot deserialize: "
                       f"{type(e).__name__}: {e} (first bytes {raw[:8].hex() if raw else None})")
            value = to_json(value, args.timestamps)
            if args.meta:
                key = msg.key()
                out = {"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset(),
                       "key": key.decode("utf-8", "replace") if key is not None else None,
                       "schema_id": schema_id_of(raw), "value": value}
            else:
                out = value
            print(json.dumps(out, sort_keys=False), flush=True)
            got += 1
    finally:
        consumer.close()
    if got < args.count:
        print(f"avro_interop: read {got} of {args.count} records within {args.timeout}s",
              file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Confluent Avro produce/consume for tests",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("produce")
    p.add_argument("--brokers", required=True)
    p.add_argument("--registry", required=True, help="http://[user:pass@]host:port")
    p.add_argument("--topic", required=True)
    p.add_argument("--schema", required=True, help=".avsc of the topic (writer schema)")
    p.add_argument("--input", required=True, help="NDJSON file of input events, or - for stdin")
    p.add_argument("--evolve", action="store_true", help="write with schema + optional user_agent")
    p.add_argument("--no-auto-register", action="store_true",
                   help="auto.register.schemas=false: the schema must already be registered")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds (registry and delivery)")
    c = sub.add_parser("consume")
    c.add_argument("--brokers", required=True)
    c.add_argument("--registry", required=True)
    c.add_argument("--topic", required=True)
    c.add_argument("--count", type=int, required=True)
    c.add_argument("--timeout", type=float, default=30.0, help="seconds")
    c.add_argument("--reader-schema", help="decode with this reader schema (schema resolution)")
    c.add_argument("--timestamps", choices=("millis", "rfc3339"), default="millis")
    c.add_argument("--meta", action="store_true", help="wrap each record with topic/partition/offset/key/schema_id")
    args = ap.parse_args(argv)
    return cmd_produce(args) if args.cmd == "produce" else cmd_consume(args)


if __name__ == "__main__":
    sys.exit(main())
