#!/usr/bin/env python3
"""Example mailer-side consumer of leadscore's outputs (JSON, the default format).

Reads leads.segment-changes and leads.sales-handoffs, drops redeliveries by
event_id, routes each lead by its segment, and commits an offset only after
the message was handled (at least once). See docs/contracts.md for the payloads.

    pip install -r examples/requirements.txt
    python examples/downstream_consumer.py --brokers localhost:29092
"""

import argparse
import json
import logging
import signal
import threading
from collections import OrderedDict

from confluent_kafka import Consumer, KafkaException

CHANGES, HANDOFFS = "leads.segment-changes", "leads.sales-handoffs"
log = logging.getLogger("mailer")


class SeenIds:
    """Bounded LRU of handled event ids. It only catches redeliveries that are
    close together and is lost on restart: for exactly-once side effects, record
    event_id in the same store as the effect (e.g. a unique column in the table
    the send queue is written to, or Redis SET NX with a TTL of some days)."""

    def __init__(self, capacity=100_000):
        self.capacity, self.ids = capacity, OrderedDict()

    def add(self, event_id):
        """True if event_id is new."""
        if event_id in self.ids:
            self.ids.move_to_end(event_id)
            return False
        self.ids[event_id] = None
        if len(self.ids) > self.capacity:
            self.ids.popitem(last=False)
        return True


# --- the mailer's side effects (stubs: replace with the real calls) ---------
def stop_channels(lead, channels):
    log.info("%s: never message on %s again", lead, ", ".join(channels))


def set_track(lead, track, why):
    log.info("%s: track -> %s (%s)", lead, track, why)


def sales_queue(lead, note):
    log.info("%s: sales queue <- %s", lead, note)


# What the mailer does in each segment (default rules; tiers are configurable).
TRACKS = {
    "cold": "awareness",          # low-frequency newsletter
    "warm": "nurture",            # regular nurture sequence
    "hot": "high-intent",         # offers, booking reminders; sales told below
    "reengage": "re-engagement",  # different content/channel, lower frequency
    "not_ready": "paused",        # CRM said "not now": no nurture until it changes
    "resting": "paused",          # frequency cap reached: send nothing until it lifts
    "opportunity": "sales-owned", # a rep is working the deal: no marketing mail
    "customer": "customer",       # onboarding/loyalty, out of acquisition nurture
    "suppressed": "none",         # stop every channel
}


def on_change(c):
    lead, seg = c["lead_id"], c["segment"]
    if c["opted_out_channels"]:  # every opt-out so far, whatever the reason
        stop_channels(lead, c["opted_out_channels"])
    if c["previous_segment"] == seg:  # only a channel opt-out: same track
        return
    set_track(lead, TRACKS.get(seg, "nurture"), f'{c["previous_segment"]} -> {seg}, {c["reason"]}')
    if seg == "hot":
        sales_queue(lead, f'hot lead, score {c["score"]:.0f}, fit {c["fit_grade"] or "unknown"}')


def on_handoff(h):
    signals = ", ".join(f'{s["rule"]} ({s["points"]:.0f})' for s in h["top_signals"])
    ask = ", ".join(h["missing_profile"]) or "nothing"
    sales_queue(h["lead_id"], f'HAND-OFF score {h["score"]:.0f} grade {h["fit_grade"] or "unknown"}; '
                f'signals: {signals}; first touch: {h["first_touch_source"]}/{h["first_touch_campaign"]}; ask for: {ask}')


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--brokers", default="localhost:29092")
    p.add_argument("--group", default="mailer-example")
    p.add_argument("--max-messages", type=int, default=0, help="stop after this many (0: run until Ctrl-C)")
    p.add_argument("--changes-topic", default=CHANGES)
    p.add_argument("--handoffs-topic", default=HANDOFFS)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    consumer = Consumer({
        "bootstrap.servers": args.brokers,
        "group.id": args.group,
        "auto.offset.reset": "earliest",  # a new group starts at the beginning of the topics
        "enable.auto.commit": False,      # commit only what was handled
    })
    consumer.subscribe([args.changes_topic, args.handoffs_topic])
    seen, handled, stop = SeenIds(), 0, threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.is_set() and not (args.max_messages and handled >= args.max_messages):
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            if msg.error():
                raise KafkaException(msg.error())
            try:
                payload = json.loads(msg.value())
                if seen.add(payload["event_id"]):
                    (on_change if msg.topic() == args.changes_topic else on_handoff)(payload)
                else:
                    log.info("duplicate %s skipped", payload["event_id"])
            except (ValueError, KeyError, TypeError) as e:
                # A payload we cannot read must not block the partition: park it.
                log.error("%s[%d]@%d unreadable, skipped: %r", msg.topic(), msg.partition(), msg.offset(), e)
            # Handled: commit its offset (a crash before this line means a redelivery).
            # One synchronous commit per message keeps the example simple; at volume,
            # commit every few hundred messages or seconds instead.
            consumer.commit(message=msg, asynchronous=False)
            handled += 1
    finally:
        consumer.close()  # leaves the group so its partitions move at once
    log.info("handled %d message(s)", handled)


if __name__ == "__main__":
    main()
