"""The audit every chaos scenario ends with: what feedsim wrote to the ingestor's socket
against MD_RAW, MD_TICKS, MD_DLQ, DynamoDB, the newest S3 snapshot and the reference
WebSocket client, as a ledger per product.

**Pipeline ledger.** The truth is feedsim's delivery log: one line per ticker frame it
wrote to a socket (a ticker generated while the ingestor was down or stalled was never
*emitted*; a gap-faulted ticker neither). Every emitted frame gets exactly one outcome:

- ``stored`` — its product/seq is in MD_TICKS (the first frame that carries it);
- ``dead_lettered`` — a malformed frame found in MD_DLQ (by reason);
- ``deduplicated`` — a repeat of a stored seq (``dup``, a resubscribe snapshot of a tick
  already stored), or a frame that reached MD_RAW and the normalizer rightly dropped as
  older than a seq it had already published (``reorder``), or one a REST resync had
  already carried to MD_TICKS;
- ``conflated`` — a frame in flight when its connection ended (the ingestor killed, the
  connection dropped): it never reached MD_RAW, but nothing written after it on that
  connection did either (TCP and the ingestor's FIFO publish keep order), a later
  connection began, and a newer tick of the product is stored (the resubscribe snapshot
  or a REST resync superseded it);
- ``lost`` — anything else. Must be 0.

Which connection a copy in MD_RAW came in on follows from time: the ingestor stamps each
frame with its receive time (``Ledgerflux-Recv-Ns``), which lies within the delivering
connection's lifetime [its first frame, the next connection's first frame).

**Client ledger.** From the reference client's subscribe snapshot on, every tick of
MD_TICKS must reach it in strictly increasing seq per product, live or by backfill after
a reconnect; ticks it did not get count as ``conflated`` only as far as the next tick's
``skipped`` announces them, the rest is ``lost``.

**Stores.** DynamoDB holds, per product, exactly MD_TICKS' last tick; the newest snapshot
(through ``snapshots/latest.json``, which must point at an existing object) agrees with
MD_TICKS at the stream sequence it covers.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.common.models import decode_tick
from services.common.subjects import (
    DLQ_STREAM,
    HDR_DLQ_REASON,
    HDR_MSG_ID,
    HDR_RECV_NS,
    HDR_RESYNC,
    RAW_STREAM,
    TICKS_STREAM,
    product_of_raw,
    product_of_tick,
)
from services.ingestor.resync import HDR_RESYNC_REASON
from services.snapshotter.snapshots import Snapshot, parse_snapshot
from tests.chaos.harness import StoreEnv
from tests.support.aws import stack_client

MAX_PROBLEMS = 50  # kept per check (all are counted)
_WINDOW = 20_000  # un-acked messages while reading a stream (~9 MB of ticks)
_ACK_EVERY = 5_000
_SEQUENCE = re.compile(rb'"sequence":(\d+)')
_PRODUCT = re.compile(rb'"product_id":"([^"]*)"')


# -- reading the evidence ------------------------------------------------------------------


async def scan_stream(nc: NATS, stream: str, on_msg: Any, idle_timeout: float = 30.0) -> int:
    """Feed every message of ``stream``, in order, to ``on_msg(stream_seq, subject,
    headers, data)``; returns how many.

    A push consumer (~4x faster than fetching, which matters for the soak's millions of
    messages), paced by acks: ``AckPolicy.ALL`` with one ack every ``_ACK_EVERY`` messages
    keeps at most ``_WINDOW`` un-acked, so nats-server never has to cut us off as a slow
    consumer (it would past 64 MB pending)."""
    js = nc.jetstream(timeout=10)
    info = await js.stream_info(stream)
    if not info.state.messages:
        return 0
    last = info.state.last_seq
    done = asyncio.Event()
    seen: dict[str, float] = {"n": 0, "seq": 0, "at": time.monotonic()}

    async def deliver(msg: Msg) -> None:
        # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>
        # (12 tokens with a domain and account hash first): cheaper than msg.metadata
        tokens = msg.reply.split(".")
        seq = int(tokens[5] if len(tokens) == 9 else tokens[-5])
        if seq <= seen["seq"]:
            return  # a redelivery
        seen["seq"] = seq
        on_msg(seq, msg.subject, msg.headers, msg.data)
        seen["n"] += 1
        seen["at"] = time.monotonic()
        if seq >= last:
            done.set()
        elif seen["n"] % _ACK_EVERY == 0:
            await msg.ack()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=deliver, pending_msgs_limit=-1, pending_bytes_limit=-1)
    consumer = await js.add_consumer(
        stream,
        ConsumerConfig(
            deliver_subject=inbox,
            ack_policy=AckPolicy.ALL,
            ack_wait=600,
            max_ack_pending=_WINDOW,
            deliver_policy=DeliverPolicy.ALL,
            inactive_threshold=60,
        ),
    )
    try:
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), 1.0)
            except TimeoutError:
                if time.monotonic() - seen["at"] > idle_timeout:
                    raise AssertionError(
                        f"reading {stream} stalled at {seen['n']:.0f} messages (last seq {last})"
                    ) from None
    finally:
        await sub.unsubscribe()
        with contextlib.suppress(Exception):  # ephemeral: it goes away by itself anyway
            await js.delete_consumer(stream, consumer.name)
    return int(seen["n"])


class _TickIds(msgspec.Struct):
    product: str
    seq: int
    trade_id: int | None = None
    resync: bool = False


class _RawIds(msgspec.Struct):
    type: Any = None
    sequence: Any = None


_tick_ids = msgspec.json.Decoder(_TickIds).decode
_raw_ids = msgspec.json.Decoder(_RawIds).decode


@dataclass(slots=True)
class Ticks:
    """MD_TICKS, per product in stream order; tick bytes kept only where a check needs
    them (each product's last tick, the ticks the newest snapshot holds)."""

    seqs: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    stream_seqs: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    trade_ids: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    resync: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    data: dict[tuple[str, int], bytes] = field(default_factory=dict)
    last: dict[str, bytes] = field(default_factory=dict)
    keep: dict[str, int] = field(default_factory=dict)
    bad: list[str] = field(default_factory=list)
    last_stream_seq: int = 0

    def add(self, stream_seq: int, subject: str, _headers: Any, data: bytes) -> None:
        self.last_stream_seq = stream_seq
        try:
            ids = _tick_ids(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.bad.append(f"MD_TICKS {stream_seq}: not a tick")
            return
        product = ids.product
        if product_of_tick(subject) != product:
            self.bad.append(f"MD_TICKS {stream_seq}: {subject} carries {product}")
        self.seqs[product].append(ids.seq)
        self.stream_seqs[product].append(stream_seq)
        self.trade_ids[product].append(-1 if ids.trade_id is None else ids.trade_id)
        if ids.resync:
            self.resync[product].add(ids.seq)
        self.last[product] = data
        if self.keep.get(product) == ids.seq:
            self.data[(product, ids.seq)] = data


@dataclass(slots=True)
class Raw:
    """The ticker frames of MD_RAW per product, in stream order:
    (stream seq, sequence, ingestor receive ns, is a resync)."""

    frames: dict[str, list[tuple[int, int, int, bool]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    resync_reasons: Counter[str] = field(default_factory=Counter)
    other: int = 0

    def add(self, stream_seq: int, subject: str, headers: Any, data: bytes) -> None:
        product = product_of_raw(subject)
        try:
            ids = _raw_ids(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            ids = _RawIds()
        if product is None or ids.type != "ticker" or not isinstance(ids.sequence, int):
            self.other += 1
            return
        headers = headers or {}
        resync = HDR_RESYNC in headers
        if resync:
            self.resync_reasons[headers.get(HDR_RESYNC_REASON, "?")] += 1
        recv_ns = int(headers.get(HDR_RECV_NS, "0"))
        self.frames[product].append((stream_seq, ids.sequence, recv_ns, resync))


@dataclass(frozen=True, slots=True)
class DlqMsg:
    stream_seq: int
    subject: str
    headers: dict[str, str]
    data: bytes


def _client(store: StoreEnv, service: Literal["dynamodb", "s3"]) -> Any:
    # short timeouts and no retries: an audit reads what is there, outage or not
    config = AioConfig(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1})
    return stack_client(store.env, service, config)


async def read_table(store: StoreEnv) -> dict[str, tuple[int, str]]:
    """DynamoDB: product → (seq, tick JSON); empty if the table is not there (yet)."""
    out: dict[str, tuple[int, str]] = {}
    try:
        async with _client(store, "dynamodb") as ddb:
            start: dict[str, Any] | None = None
            while True:
                page = await (
                    ddb.scan(TableName=store.table, ConsistentRead=True, ExclusiveStartKey=start)
                    if start
                    else ddb.scan(TableName=store.table, ConsistentRead=True)
                )
                for item in page["Items"]:
                    out[item["product"]["S"]] = (int(item["seq"]["N"]), item["tick"]["S"])
                start = page.get("LastEvaluatedKey")
                if not start:
                    break
    except (ClientError, BotoCoreError, OSError):
        return {}
    return out


async def newest_snapshot(store: StoreEnv) -> tuple[str, Snapshot] | None:
    """The snapshot ``snapshots/latest.json`` points at (None if no pointer yet).

    Raises ``AssertionError`` if the pointer names an object that does not exist.
    """
    try:
        async with _client(store, "s3") as s3:
            try:
                response = await s3.get_object(Bucket=store.bucket, Key="snapshots/latest.json")
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "NoSuchBucket"):
                    return None
                raise
            async with response["Body"] as body:
                pointer = json.loads(await body.read())
            try:
                obj = await s3.get_object(Bucket=store.bucket, Key=pointer["key"])
            except ClientError as exc:
                raise AssertionError(f"pointer names a missing object: {pointer}") from exc
            async with obj["Body"] as body:
                data = await body.read()
    except (BotoCoreError, OSError):
        return None
    return str(pointer["key"]), parse_snapshot(data)


# (ns, conn, product, sequence, trade_id, kind): one ticker frame written to a socket
Delivery = tuple[int, int, str, int, int, str]


def read_deliveries(path: Path) -> list[Delivery]:
    out: list[Delivery] = []
    names: dict[bytes, str] = {}
    with path.open("rb") as fh:
        for line in fh:
            ns, conn, product, seq, trade_id, kind = line.rstrip(b"\n").split(b",", 5)
            p = names.get(product) or names.setdefault(product, product.decode())
            k = names.get(kind) or names.setdefault(kind, kind.decode())
            out.append((int(ns), int(conn), p, int(seq), int(trade_id), k))
    return out


@dataclass(slots=True)
class ClientRecord:
    baseline: dict[str, int] = field(default_factory=dict)
    ticks: dict[str, list[tuple[int, int, str]]] = field(default_factory=dict)  # seq, skip, how
    errors: list[str] = field(default_factory=list)
    connects: int = 0


def read_client(path: Path) -> ClientRecord:
    rec = ClientRecord()
    if not path.exists():
        return rec
    with path.open() as fh:
        for raw in fh:
            kind, _, rest = raw.rstrip("\n").partition(",")
            if kind == "T":
                product, seq, skipped = rest.split(",")
                rec.ticks.setdefault(product, []).append((int(seq), int(skipped), "live"))
            elif kind == "B":
                product, seq = rest.split(",")
                rec.ticks.setdefault(product, []).append((int(seq), 0, "backfill"))
            elif kind == "S":
                product, seq = rest.split(",")
                rec.baseline.setdefault(product, int(seq))
            elif kind == "E":
                rec.errors.append(rest)
            elif kind == "C":
                rec.connects += 1
    return rec


@dataclass(slots=True)
class Evidence:
    deliveries: list[Delivery]
    raw: Raw
    ticks: Ticks
    dlq: list[DlqMsg]
    table: dict[str, tuple[int, str]]
    snapshot: tuple[str, Snapshot] | None
    client: ClientRecord
    feed_stats: dict[str, Any]


async def gather(
    nc: NATS,
    store: StoreEnv,
    delivery_log: Path,
    client_log: Path,
    feed_stats: dict[str, Any],
) -> Evidence:
    table = await read_table(store)
    snapshot = await newest_snapshot(store)
    ticks = Ticks()
    if snapshot is not None:
        ticks.keep = {p: t.seq for p, t in snapshot[1].products.items()}
    raw = Raw()
    dlq: list[DlqMsg] = []
    await scan_stream(nc, TICKS_STREAM, ticks.add)
    await scan_stream(nc, RAW_STREAM, raw.add)
    await scan_stream(
        nc,
        DLQ_STREAM,
        lambda seq, subj, hdrs, data: dlq.append(DlqMsg(seq, subj, hdrs or {}, data)),
    )
    return Evidence(
        deliveries=await asyncio.to_thread(read_deliveries, delivery_log),
        raw=raw,
        ticks=ticks,
        dlq=dlq,
        table=table,
        snapshot=snapshot,
        client=await asyncio.to_thread(read_client, client_log),
        feed_stats=feed_stats,
    )


# -- the audit -----------------------------------------------------------------------------


@dataclass(slots=True)
class Ledger:
    scenario: str
    seed: int
    pipeline: dict[str, Counter[str]] = field(default_factory=dict)
    client: dict[str, Counter[str]] = field(default_factory=dict)
    dead_letter_reasons: Counter[str] = field(default_factory=Counter)
    outcome_by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    resync_ticks: Counter[str] = field(default_factory=Counter)
    resyncs_by_reason: Counter[str] = field(default_factory=Counter)
    faults: dict[str, Any] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. the soak's samples
    problem_counts: Counter[str] = field(default_factory=Counter)

    def problem(self, check: str, text: str) -> None:
        texts = self.problems.setdefault(check, [])
        if len(texts) < MAX_PROBLEMS:
            texts.append(text)
        self.problem_counts[check] += 1

    def total(self, rows: dict[str, Counter[str]]) -> Counter[str]:
        total: Counter[str] = Counter()
        for row in rows.values():
            total.update(row)
        return total

    @property
    def lost(self) -> int:
        return self.total(self.pipeline)["lost"] + self.total(self.client)["lost"]

    def failures(self) -> list[str]:
        out = []
        for check, texts in sorted(self.problems.items()):
            more = self.problem_counts[check] - min(len(texts), 8)
            shown = texts[:8] + ([f"... {more} more"] if more > 0 else [])
            out.append(f"{check} ({self.problem_counts[check]}): " + "; ".join(shown))
        return out

    def table(self) -> str:
        head = (
            f"{'product':<10}{'emitted':>10}{'stored':>10}{'dlq':>7}{'dedup':>8}{'confl':>8}"
            f"{'lost':>9}{'resync':>7} |{'client exp':>11}{'recv':>10}{'confl':>7}{'lost':>8}"
        )
        lines = [f"ledger {self.scenario} (seed {self.seed})", head, "-" * len(head)]
        products = sorted(set(self.pipeline) | set(self.client))
        for name, p, c, r in [
            *((x, self.pipeline.get(x, Counter()), self.client.get(x, Counter()),
               self.resync_ticks[x]) for x in products),
            ("TOTAL", self.total(self.pipeline), self.total(self.client),
             sum(self.resync_ticks.values())),
        ]:  # fmt: skip
            if name == "TOTAL":
                lines.append("-" * len(head))
            lines.append(
                f"{name:<10}{p['emitted']:>10}{p['stored']:>10}{p['dead_lettered']:>7}"
                f"{p['deduplicated']:>8}{p['conflated']:>8}{p['lost']:>9}{r:>7} |"
                f"{c['expected']:>11}{c['received']:>10}{c['conflated']:>7}{c['lost']:>8}"
            )
        kinds = ", ".join(
            f"{k}: " + " ".join(f"{o}={n}" for o, n in sorted(v.items()))
            for k, v in sorted(self.outcome_by_kind.items())
        )
        lines.append(f"frames by kind → outcome: {kinds}")
        if self.dead_letter_reasons:
            lines.append(
                f"dead letters by reason: {dict(sorted(self.dead_letter_reasons.items()))}"
            )
        if self.resyncs_by_reason:
            lines.append(f"resync frames in MD_RAW by reason: {dict(self.resyncs_by_reason)}")
        if self.faults:
            lines.append(f"feedsim faults: {self.faults}")
        for key, value in self.context.items():
            lines.append(f"{key}: {value}")
        lines.append("checks: " + ("all passed" if not self.problems else "FAILED"))
        lines.extend(f"  {text}" for text in self.failures())
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "seed": self.seed,
            "pipeline": {p: dict(c) for p, c in sorted(self.pipeline.items())},
            "pipeline_total": dict(self.total(self.pipeline)),
            "client": {p: dict(c) for p, c in sorted(self.client.items())},
            "client_total": dict(self.total(self.client)),
            "resync_ticks": dict(self.resync_ticks),
            "resyncs_by_reason": dict(self.resyncs_by_reason),
            "dead_letter_reasons": dict(self.dead_letter_reasons),
            "outcome_by_kind": {k: dict(v) for k, v in self.outcome_by_kind.items()},
            "faults": self.faults,
            "problems": self.problems,
            "problem_counts": dict(self.problem_counts),
            "context": self.context,
        }


def audit(ev: Evidence, scenario: str, seed: int, *, allow_conflation: bool) -> Ledger:
    """Classify every emitted frame and check every store; see the module docstring."""
    led = Ledger(scenario, seed)
    ticks = ev.ticks
    for text in ticks.bad:
        led.problem("ticks_decodable", text)

    # MD_TICKS: per product strictly increasing; seq -> position in the per-product lists.
    stored: dict[str, dict[int, int]] = {}
    for product, seqs in ticks.seqs.items():
        index: dict[int, int] = {}
        previous = -1
        for position, seq in enumerate(seqs):
            if seq <= previous:
                led.problem("ticks_strictly_increasing", f"{product}: seq {seq} after {previous}")
            previous = seq
            index[seq] = position
        stored[product] = index
        led.resync_ticks[product] = len(ticks.resync.get(product, ()))
    sorted_stored = {p: sorted(index) for p, index in stored.items()}

    # MD_DLQ: who dead-lettered what.
    dlq_raw_refs: dict[int, str] = {}  # MD_RAW stream seq -> reason (the normalizer's)
    ingestor_dlq: dict[int, list[tuple[str | None, int, str]]] = defaultdict(list)
    for m in ev.dlq:
        reason = m.headers.get(HDR_DLQ_REASON, m.subject.rsplit(".", 1)[-1])
        msg_id = m.headers.get(HDR_MSG_ID, "")
        if msg_id.startswith("dlq:raw:"):
            dlq_raw_refs[int(msg_id.removeprefix("dlq:raw:"))] = reason
            continue
        seq_match = _SEQUENCE.search(m.data)
        if seq_match is None:
            led.problem("dlq_accounted", f"MD_DLQ {m.stream_seq} ({reason}) carries no sequence")
            continue
        product_match = _PRODUCT.search(m.data)
        dlq_product = product_match.group(1).decode() if product_match else None
        recv_ns = int(m.headers.get(HDR_RECV_NS, "0"))
        ingestor_dlq[int(seq_match.group(1))].append((dlq_product, recv_ns, reason))

    # MD_RAW: the copies of each ticker with their receive time; the normalizer's drops.
    raw_copies: dict[str, dict[int, list[tuple[int, int, bool]]]] = {}
    raw_dropped: dict[str, set[int]] = {}
    for product, frames in ev.raw.frames.items():
        by_seq: dict[int, list[tuple[int, int, bool]]] = {}
        dropped: set[int] = set()
        index = stored.get(product, {})
        running = -1  # the newest seq the normalizer has published for the product so far
        for stream_seq, seq, recv_ns, resync in frames:
            by_seq.setdefault(seq, []).append((stream_seq, recv_ns, resync))
            if stream_seq in dlq_raw_refs:
                continue
            if seq in index:
                running = max(running, seq)
            elif seq <= running:
                dropped.add(seq)
            else:
                led.problem(
                    "normalizer_complete",
                    f"{product} seq {seq} (MD_RAW {stream_seq}) is newer than every tick "
                    "before it but never reached MD_TICKS",
                )
        raw_copies[product], raw_dropped[product] = by_seq, dropped
    led.resyncs_by_reason.update(ev.raw.resync_reasons)

    # Connections: a copy in MD_RAW/DLQ belongs to the connection live at its receive time.
    first_ns: dict[int, int] = {}
    for d in ev.deliveries:
        first_ns.setdefault(d[1], d[0])
    conns = sorted(first_ns, key=lambda c: first_ns[c])
    window_end = {
        c: (first_ns[conns[i + 1]] if i + 1 < len(conns) else 2**63) for i, c in enumerate(conns)
    }
    last_conn = conns[-1] if conns else None

    # Each emitted frame: where did it go?
    claimed: dict[str, set[int]] = defaultdict(set)
    outcome: list[str] = []
    reached = [False] * len(ev.deliveries)
    pending: list[int] = []
    no_copies: list[tuple[int, int, bool]] = []
    for i, (_ns, conn, product, seq, trade_id, kind) in enumerate(ev.deliveries):
        start, end = first_ns[conn], window_end[conn]
        copies = raw_copies.get(product, {}).get(seq, no_copies)
        mine = [c for c in copies if not c[2] and start <= c[1] < end]
        result = ""
        if kind.startswith("malformed:"):
            if kind == "malformed:bad_price":
                if mine:
                    reached[i] = True
                    dlq_reason = dlq_raw_refs.get(mine[0][0])
                    if dlq_reason is None:
                        result = "lost"
                        led.problem("dlq_complete", f"{product} {seq} bad_price not dead-lettered")
                    else:
                        result = "dead_lettered"
                        led.dead_letter_reasons[dlq_reason] += 1
            else:
                candidates = ingestor_dlq.get(seq, [])
                found = next(
                    (j for j, (p, t, _r) in enumerate(candidates)
                     if p in (None, product) and start <= t < end),
                    None,
                )  # fmt: skip
                if found is not None:
                    reached[i] = True
                    result = "dead_lettered"
                    led.dead_letter_reasons[candidates.pop(found)[2]] += 1
        else:
            reached[i] = bool(mine)
            where = stored.get(product, {}).get(seq)
            if where is not None:
                # A REST resync can carry a seq before its feed frame arrives (a heartbeat
                # announced a ticker feedsim held back for a reorder): the resync stored it,
                # and this frame, dropped by the normalizer as not newer, is the repeat.
                resync_first = min((c[0] for c in copies if c[2]), default=None)
                repeat_of_resync = (
                    bool(mine) and resync_first is not None and resync_first < mine[0][0]
                )
                first = seq not in claimed[product] and not repeat_of_resync
                result = "stored" if first else "deduplicated"
                claimed[product].add(seq)
                tick_trade = ticks.trade_ids[product][where]
                if seq not in ticks.resync[product] and tick_trade != trade_id:
                    led.problem(
                        "ticks_match_feed",
                        f"{product} {seq}: trade_id {tick_trade} stored, feedsim sent {trade_id}",
                    )
            elif reached[i]:
                # anything else is a frame the normalizer lost (normalizer_complete says which)
                result = "deduplicated" if seq in raw_dropped[product] else "lost"
        outcome.append(result)
        if not result:
            pending.append(i)

    # Frames that never arrived: in flight at the end of their connection, and superseded?
    last_reached: dict[int, int] = defaultdict(lambda: -1)
    for i, d in enumerate(ev.deliveries):
        if reached[i]:
            last_reached[d[1]] = i
    for i in pending:
        _ns, conn, product, seq, _trade, kind = ev.deliveries[i]
        in_flight = i > last_reached[conn] and conn != last_conn
        seqs = sorted_stored.get(product, [])
        superseded = bisect.bisect_right(seqs, seq) < len(seqs)
        if in_flight and superseded:
            outcome[i] = "conflated"
        else:
            outcome[i] = "lost"
            why = "in flight, never superseded" if in_flight else "mid-connection"
            led.problem("nothing_lost", f"{product} seq {seq} ({kind}, conn {conn}): {why}")
    tails: dict[int, list[int]] = defaultdict(list)
    delivered: dict[str, set[int]] = defaultdict(set)
    for d, result in zip(ev.deliveries, outcome, strict=True):
        ns, conn, product, seq, _trade, kind = d
        row = led.pipeline.setdefault(product, Counter())
        row["emitted"] += 1
        row[result] += 1
        led.outcome_by_kind.setdefault(kind.split(":", 1)[0], Counter())[result] += 1
        delivered[product].add(seq)
        if result == "conflated":
            tails[conn].append(ns)
    if tails:
        # how much each ended connection had in flight: the receiver's lag when it ended
        led.context["in_flight_at_connection_end"] = {
            conn: f"{len(ns)} frames emitted over its last {(max(ns) - min(ns)) / 1e6:.0f} ms"
            for conn, ns in sorted(tails.items())
        }
    led.context["feed_connections_seen"] = len(conns)
    if not allow_conflation:
        conflated = sum(c["conflated"] for c in led.pipeline.values())
        if conflated:
            led.problem(
                "no_conflation_expected",
                f"{conflated} frames in flight at a connection end, but this scenario never "
                "breaks the feed connection",
            )

    # Every stored tick came from the feed (the same trade) or from a REST resync.
    for product, index in stored.items():
        for seq in index:
            if seq not in ticks.resync[product] and seq not in delivered[product]:
                led.problem("no_phantom_ticks", f"{product} seq {seq} was never emitted")
    leftover = [f"seq {s}: {[r for _p, _n, r in v]}" for s, v in ingestor_dlq.items() if v]
    if leftover:
        led.problem("dlq_accounted", f"dead letters no emitted frame explains: {leftover[:20]}")

    _audit_stores(ev, led, sorted_stored)
    _audit_client(ev, led)
    return led


def _audit_stores(ev: Evidence, led: Ledger, sorted_stored: dict[str, list[int]]) -> None:
    ticks = ev.ticks
    for product, seqs in sorted_stored.items():
        item = ev.table.get(product)
        want = (seqs[-1], ticks.last[product].decode())
        if item is None:
            led.problem("dynamodb_equals_stream", f"{product}: no item (last seq {seqs[-1]})")
        elif item != want:
            led.problem(
                "dynamodb_equals_stream", f"{product}: item seq {item[0]}, MD_TICKS {seqs[-1]}"
            )
    for product in set(ev.table) - set(sorted_stored):
        led.problem("dynamodb_equals_stream", f"{product}: an item, but no tick in MD_TICKS")
    if ev.snapshot is None:
        led.problem("snapshot_consistent", "no snapshot pointer")
        return
    key, snap = ev.snapshot
    end = ticks.last_stream_seq
    led.context["newest_snapshot"] = f"{key} covers MD_TICKS {snap.stream_seq}/{end}"
    if snap.stream_seq > end:
        led.problem("snapshot_consistent", f"covers {snap.stream_seq} > stream end {end}")
    for product, tick in snap.products.items():
        data = ticks.data.get((product, tick.seq))
        if data is None:
            led.problem("snapshot_consistent", f"{product} seq {tick.seq} not in MD_TICKS")
        elif decode_tick(data) != tick:
            led.problem("snapshot_consistent", f"{product} seq {tick.seq} differs from MD_TICKS")
    for product, stream_seqs in ticks.stream_seqs.items():
        covered = bisect.bisect_right(stream_seqs, snap.stream_seq)
        if not covered:
            continue
        at_cover = ticks.seqs[product][covered - 1]  # the product's last tick at stream_seq
        have = snap.products.get(product)
        if have is None or have.seq < at_cover:
            led.problem(
                "snapshot_consistent",
                f"{product}: snapshot has {have.seq if have else None}, MD_TICKS had {at_cover} "
                f"at {snap.stream_seq}",
            )
        if snap.stream_seq == end and have is not None and have.seq != ticks.seqs[product][-1]:
            led.problem("snapshot_consistent", f"{product}: final snapshot is not the last tick")


def _audit_client(ev: Evidence, led: Ledger) -> None:
    client = ev.client
    for product, seqs in ev.ticks.seqs.items():
        row = led.client.setdefault(product, Counter())
        baseline = client.baseline.get(product, -1)
        expected = seqs[bisect.bisect_right(seqs, baseline) :]
        row["expected"] = len(expected)
        at = 0  # the next expected tick not yet accounted for
        last_seq = baseline
        for seq, skipped, how in client.ticks.get(product, []):
            if seq <= last_seq:
                led.problem(
                    "client_strictly_increasing", f"{product}: {seq} ({how}) after {last_seq}"
                )
                continue
            last_seq = seq
            found = bisect.bisect_left(expected, seq, lo=at)
            if found == len(expected) or expected[found] != seq:
                led.problem("client_no_phantoms", f"{product}: got seq {seq}, not in MD_TICKS")
                continue
            row["received"] += 1
            missing = found - at
            at = found + 1
            if missing:
                conflated = min(missing, skipped)
                row["conflated"] += conflated
                if missing > conflated:
                    row["lost"] += missing - conflated
                    led.problem(
                        "client_nothing_lost",
                        f"{product}: {missing - conflated} ticks before seq {seq} ({how}) never "
                        "arrived, none announced by skipped",
                    )
            if skipped > missing:
                led.problem(
                    "client_skipped_exact", f"{product}: skipped={skipped}, missing {missing}"
                )
        if at < len(expected):
            row["lost"] += len(expected) - at
            led.problem(
                "client_nothing_lost",
                f"{product}: its last {len(expected) - at} ticks never arrived",
            )
    if client.errors:
        led.problem("client_no_errors", "; ".join(client.errors[:5]))
    led.context["client_connects"] = client.connects


def write_artifact(ledger: Ledger, extra: dict[str, Any]) -> Path:
    from tests.chaos.harness import ARTIFACTS  # (a cycle at import time)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{ledger.scenario}.json"
    path.write_text(json.dumps({**ledger.to_json(), **extra}, indent=2, default=str))
    return path
