"""Fuzz aimed at live data (issue 21 item 3, issue 19 item 5): every RPC of every service, each
request built from its descriptor with values aimed at the storage layer — the names of banks
that exist (the caller's and another tenant's), ids that exist, NUL and odd unicode, very long
strings, numbers one either side of every limit, valid and broken memories — the admin RPCs
with the admin key, the data RPCs with a tenant's key.

Fails on an INTERNAL or UNKNOWN status, on a refusal without a message, on an error the server
logged as unexpected, or on any change to the other tenant's data. Derandomized (the same
examples every run); hypothesis prints a failing example with its reproduction blob."""

from __future__ import annotations

import logging

import grpc
import psycopg
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ADMIN_KEY, ServerThread, make_settings
from helpers import FINGERPRINT, SPEC, memory_payload
from memory3.sdk.client import BankInfo, Reference
from memory3.sdk.client.client import Client
from memory3.service.embedded_pg import libpq_url
from memory3.service.replicas import TOKEN_KIND
from memory3.service.server import SERVICE_NAMES
from memory3.service.tokens import Tokens

BANKS = ["live", "other-only", "missing"]
IDS = ["r0", "r1", "o0", "nope"]
ODD = ["", " ", "\x00", "a\x00b", "\ufffd", "\u202e", "ü" * 300, "x" * 5000, "../../etc", "' OR 1=1 --", "kb\n"]
BOUNDARY_INTS = [-1, 0, 1, 5, 1023, 1024, 1025, 4095, 4096, 4097, 9999, 10_000, 10_001, 2**31 - 1, -(2**31)]
BOUNDARY_FLOATS = [0.0, 1.0, 1.0000001, -0.0, -1e-9, 0.5, float("nan"), float("inf"), 3.4e38]
TARGETED = {  # field name -> values aimed at it
    "bank": BANKS, "name": [*BANKS, "p", "concurrent_calls", "banks", "stored_bytes", "acme"],
    "tenant": ["fuzz-a", "fuzz-b", "missing"], "external_id": IDS, "external_ids": IDS, "episode_id": ["e0", "nope"],
    "episode_ids": ["e0", "nope"], "model_fingerprint": [FINGERPRINT, "f" * 129], "key_id": ["0123456789abcdef"],
    "text": ["text 0", "w1 w2 w3 w4"], "cursor": ["", "c1.0", "c1.99999999999999999999", "garbage"],
    "page_token": ["", "1:p", "%%%garbage"],
    "metadata_json": ['{"k": "v", "n": 1, "l": [1, "v", null]}', '{"k": NaN}', '{"k": 1e999}', '{"k": "\\u0000"}',
                      '{"k": "\\ud800"}', '{"k": ' + "[" * 9 + "]" * 9 + "}", "[" * 5000, '{"k": ' + "1" * 5000 + "}",
                      "[]", "null", '{"k": "v"} x'],
    "value_json": ['"v"', "1", '["v", 1]', "true", "null", "{}", "[[1]]", "NaN", "-Infinity", "1e999", '"\\u0000"',
                   '"\\ud800"', "[" * 5000, "1" * 5000, "[]", '"2024-01-01T00:00:00Z"'],
    "key": ["k", "n", "", "\x00"],
    "consistency_token": ["", "garbage", "gAAAAAB" + "x" * 120],
}
NUMBERS = {
    F.TYPE_INT32: st.sampled_from(BOUNDARY_INTS) | st.integers(-(2**31), 2**31 - 1),
    F.TYPE_INT64: st.sampled_from(BOUNDARY_INTS + [2**63 - 1]) | st.integers(-(2**63), 2**63 - 1),
    F.TYPE_UINT32: st.sampled_from([0, 1, 1024, 1025, 2**32 - 1]),
    F.TYPE_UINT64: st.sampled_from([0, 1, 1024, 2**64 - 1]),
    F.TYPE_FLOAT: st.sampled_from(BOUNDARY_FLOATS) | st.floats(width=32),
    F.TYPE_DOUBLE: st.sampled_from(BOUNDARY_FLOATS) | st.floats(),
    F.TYPE_BOOL: st.booleans(),
}
TEXT = st.sampled_from(ODD) | st.text(max_size=30)
MEMORIES = [memory_payload(seed=9), memory_payload(seed=9)[:-1], b"M3KV" + b"\x00" * 40, b""]


def _value(field, depth: int):
    if field.type == F.TYPE_STRING:
        aimed = TARGETED.get(field.name)
        return (st.sampled_from(aimed) | TEXT) if aimed else TEXT
    if field.type == F.TYPE_BYTES:
        return st.sampled_from(MEMORIES) | st.binary(max_size=64)
    if field.type == F.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values] + [99])
    if field.type == F.TYPE_MESSAGE:
        return _message(field.message_type, depth + 1)
    return NUMBERS[field.type]


@st.composite
def _message(draw, descriptor, depth: int = 0):
    message = message_factory.GetMessageClass(descriptor)()
    if depth > 3:
        return message
    chosen = {o.name: draw(st.sampled_from([None, *[f.name for f in o.fields]])) for o in descriptor.oneofs}
    for field in descriptor.fields:
        if field.containing_oneof is not None and chosen[field.containing_oneof.name] != field.name:
            continue
        if not draw(st.integers(0, 3)):  # most fields set: requests that get past the first checks
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            getattr(message, field.name).update(draw(st.dictionaries(_value(key, depth), _value(value, depth),
                                                                     max_size=3)))
        elif field.is_repeated:
            if field.name in ("values", "embedding"):  # vectors: the bank's dimension, or not
                size = draw(st.sampled_from([4, 4, 3, 0, 5]))
                getattr(message, field.name).extend(draw(st.lists(_value(field, depth), min_size=size, max_size=size)))
            else:
                getattr(message, field.name).extend(draw(st.lists(_value(field, depth), max_size=4)))
        elif field.type == F.TYPE_MESSAGE:
            getattr(message, field.name).CopyFrom(draw(_value(field, depth)))
        else:
            setattr(message, field.name, draw(_value(field, depth)))
    return message


# A consistency token of tenant fuzz-a (a read presenting it must see every write before it): made
# by the live fixture the way the service seals one, for the read requests' templates.
CONSISTENCY = {"token": ""}


def _templates() -> dict[str, list]:
    """A valid request (stream) per method: the fuzz changes one field of it, so most examples
    get past the first checks and reach the storage layer with the one odd value."""
    import hashlib

    from memory3.v1 import banks_pb2, memories_pb2, proxies_pb2, tenants_pb2, trajectories_pb2

    spec = banks_pb2.MemorySpec(memory_layers=list(SPEC.memory_layers), kv_heads=SPEC.kv_heads, head_dim=SPEC.head_dim,
                                tokens_per_head=SPEC.tokens_per_head, reference_length=SPEC.reference_length,
                                codec=SPEC.codec)
    memory = memory_payload(seed=3)
    record = memories_pb2.ReferenceRecord(external_id="new", text="t", metadata={"k": "v"}, embedding=[1, 0, 0, 1],
                                          memory_size=len(memory), memory_chunk=memory)
    json_record = memories_pb2.ReferenceRecord(external_id="new-json", text="t", embedding=[1, 0, 0, 1],
                                               metadata_json='{"k": "v", "n": 2, "l": ["v", 1.5, true, null]}')
    where = memories_pb2.MetadataFilter(conditions=[
        memories_pb2.MetadataCondition(key="k", op=memories_pb2.FILTER_OP_IN, value_json='["v", 1]'),
        memories_pb2.MetadataCondition(key="n", op=memories_pb2.FILTER_OP_LT, value_json="10"),
        memories_pb2.MetadataCondition(key="k", op=memories_pb2.FILTER_OP_EXISTS, value_json="true"),
    ])
    episode = trajectories_pb2.EpisodeRecord(episode_id="e-new", bank="live", model_fingerprint=FINGERPRINT,
                                             prompt_ids=[1, 2], response_ids=[3], decision_position=[0],
                                             decision_token=[3], decision_llm_prob=[0.5], decision_rank=[0],
                                             decision_p_accept=[0.7], decision_accepted=[True],
                                             decision_rejections=[0], rewards={"r": 1.0})
    weights = b"\x02\x00\x00\x00\x00\x00\x00\x00{}"
    info = proxies_pb2.ProxyInfo(name="p", model_fingerprint=FINGERPRINT, weights_size=len(weights),
                                 weights_sha256=hashlib.sha256(weights).digest(), config_json="{}")
    return {
        "CreateBank": [banks_pb2.CreateBankRequest(bank=banks_pb2.Bank(
            name="fresh", model_fingerprint=FINGERPRINT, memory_spec=spec,
            embedder=banks_pb2.EmbedderSpec(name="client", dimension=4, metric="cosine")))],
        "GetBank": [banks_pb2.GetBankRequest(name="live")],
        "DeleteBank": [banks_pb2.DeleteBankRequest(name="missing")],
        "PutCodebook": [banks_pb2.PutCodebookRequest(bank="live", chunk=b"M3PQ" + b"\x00" * 60)],
        "GetCodebook": [banks_pb2.GetCodebookRequest(bank="live", version=1)],
        "Write": [memories_pb2.WriteRequest(bank="live"), memories_pb2.WriteRequest(reference=record),
                  memories_pb2.WriteRequest(reference=json_record)],
        "Retrieve": [memories_pb2.RetrieveRequest(bank="live", vector=memories_pb2.Vector(values=[1, 0, 0, 1]),
                                                  consistency_token=CONSISTENCY["token"],
                                                  top_k=5, filter={"k": "v"}, include_memory=True, include_text=True,
                                                  where=where)],
        "RetrieveBatch": [memories_pb2.RetrieveBatchRequest(
            bank="live", queries=[memories_pb2.BatchQuery(vector=memories_pb2.Vector(values=[1, 0, 0, 1])),
                                  memories_pb2.BatchQuery(vector=memories_pb2.Vector(values=[0, 1, 1, 0]))],
            top_k=5, filter={"k": "v"}, include_memory=True, include_text=True, where=where, consistency_token=CONSISTENCY["token"])],
        "Scroll": [memories_pb2.ScrollRequest(bank="live", where=where, page_size=1, include_text=True,
                                              include_memory=True, consistency_token=CONSISTENCY["token"])],
        "Fetch": [memories_pb2.FetchRequest(bank="live", external_ids=["r0", "r1"], include_memory=True,
                                            consistency_token=CONSISTENCY["token"])],
        "Delete": [memories_pb2.DeleteRequest(bank="live", external_ids=["nope"])],
        "Stats": [memories_pb2.StatsRequest(bank="live", consistency_token=CONSISTENCY["token"])],
        "Log": [trajectories_pb2.LogRequest(episodes=[episode])],
        "AttachReward": [trajectories_pb2.AttachRewardRequest(episode_id="e-new", name="human", value=1.0)],
        "Read": [trajectories_pb2.ReadRequest(page_size=2, limit=3, include_hidden_states=True, consistency_token=CONSISTENCY["token"])],
        "Count": [trajectories_pb2.CountRequest(consistency_token=CONSISTENCY["token"])],
        "Export": [trajectories_pb2.ExportRequest(filter=trajectories_pb2.EpisodeFilter(bank="live"), reward_key="r",
                                                  include_hidden_states=True, consistency_token=CONSISTENCY["token"])],
        "Publish": [proxies_pb2.PublishRequest(info=info), proxies_pb2.PublishRequest(weights_chunk=weights)],
        "Get": [proxies_pb2.GetProxyRequest(name="p", model_fingerprint=FINGERPRINT, include_weights=True)],
        "List": [proxies_pb2.ListProxiesRequest(name="p", page_size=2)],
        "CreateTenant": [tenants_pb2.CreateTenantRequest(name="fuzzed-tenant")],
        "IssueKey": [tenants_pb2.IssueKeyRequest(tenant="fuzz-a", label="l")],
        "RevokeKey": [tenants_pb2.RevokeKeyRequest(key_id="0123456789abcdef")],
        "GetQuotas": [tenants_pb2.GetQuotasRequest(tenant="fuzz-a")],
        "SetQuota": [tenants_pb2.SetQuotaRequest(tenant="fuzz-b", name="banks", value=1000)],
    }


def _fields(descriptor, prefix=(), depth=0):
    """Every field path of a message type (nested messages down to three levels)."""
    for field in descriptor.fields:
        path = (*prefix, field)
        yield path
        if field.type == F.TYPE_MESSAGE and not field.message_type.GetOptions().map_entry and depth < 3:
            yield from _fields(field.message_type, path, depth + 1)  # a repeated one: its first item


def _descend(holder, step):
    """The message a path step leads to (a repeated field's first item, made if absent)."""
    child = getattr(holder, step.name)
    if step.is_repeated:
        return child[0] if len(child) else child.add()
    return child


@st.composite
def _one_field_changed(draw, template: list):
    """The template stream with one field of one of its messages set to an aimed value."""
    messages = [type(m)() for m in template]
    for copy, original in zip(messages, template):
        copy.CopyFrom(original)
    target = draw(st.sampled_from(messages))
    path = draw(st.sampled_from(list(_fields(target.DESCRIPTOR))))
    holder = target
    for step in path[:-1]:
        holder = _descend(holder, step)
    field = path[-1]
    if field.containing_oneof is not None and field.type == F.TYPE_MESSAGE:
        getattr(holder, field.name).SetInParent()
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        getattr(holder, field.name)[draw(_value(key, 0))] = draw(_value(value, 0))
    elif field.is_repeated:
        del getattr(holder, field.name)[:]
        if field.type == F.TYPE_MESSAGE:
            getattr(holder, field.name).add().CopyFrom(draw(_value(field, 1)))
        else:
            getattr(holder, field.name).extend(draw(st.lists(_value(field, 0), max_size=5)))
    elif field.type == F.TYPE_MESSAGE:
        getattr(holder, field.name).CopyFrom(draw(_value(field, 1)))
    else:
        setattr(holder, field.name, draw(_value(field, 0)))
    if draw(st.booleans()) and len(messages) > 1:  # a stream may also repeat its items
        messages.append(messages[-1])
    return messages


class Unexpected(logging.Handler):
    """Collects the errors the server logs as unexpected (status_for's INTERNAL path)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def live(database_url, embedder):
    handler = Unexpected()
    logging.getLogger("memory3").addHandler(handler)
    srv = ServerThread(make_settings(database_url, max_memory_bytes=1 << 20), embedder)
    keys = {}
    with Client(srv.target, ADMIN_KEY) as admin:
        for name in ("fuzz-a", "fuzz-b"):
            admin.create_tenant(name)
            keys[name] = admin.issue_key(name)[1]
    with psycopg.connect(libpq_url(database_url)) as conn:
        (tenant_id,) = conn.execute("SELECT id FROM tenants WHERE name = 'fuzz-a'").fetchone()
    CONSISTENCY["token"] = Tokens(ADMIN_KEY).seal(tenant_id, TOKEN_KIND, "0")
    spec = BankInfo("live", FINGERPRINT, SPEC, "client", 4, "cosine")
    with Client(srv.target, keys["fuzz-a"]) as a:
        a.create_bank(spec)
        a.write("live", [Reference(f"r{i}", f"text {i}", {"k": "v"}, [1, i, 0, 1], memory_payload(seed=i))
                         for i in range(2)])
    with Client(srv.target, keys["fuzz-b"]) as b:
        b.create_bank(spec)
        b.create_bank(BankInfo("other-only", FINGERPRINT, SPEC, "client", 4, "l2"))
        for bank in ("live", "other-only"):
            b.write(bank, [Reference("o0", "other tenant's", {"k": "v"}, [0, 1, 1, 0], memory_payload(seed=7))])
    yield srv, keys, handler
    logging.getLogger("memory3").removeHandler(handler)
    srv.stop()


def _snapshot(target: str, key: str):
    with Client(target, key) as client:
        return [(bank, client.stats(bank), [(s.external_id, s.text, s.metadata, s.memory)
                                           for s in client.fetch(bank, ["o0"])]) for bank in ("live", "other-only")]


def _methods():
    pool = descriptor_pool.Default()
    for service_name in SERVICE_NAMES:
        for method in pool.FindServiceByName(service_name).methods:
            yield pytest.param(service_name, method, id=f"{service_name.split('.')[-1]}.{method.name}")


def _call(target, service_name, method, requests, key):
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    kind = ("stream" if method.client_streaming else "unary") + "_" + ("stream" if method.server_streaming else "unary")
    with grpc.insecure_channel(target) as channel:
        call = getattr(channel, kind)(f"/{service_name}/{method.name}", request_serializer=request_class.SerializeToString,
                                      response_deserializer=response_class.FromString)
        try:
            result = call(iter(requests) if method.client_streaming else requests[0],
                          metadata=(("authorization", f"Bearer {key}"),), timeout=30)
            if method.server_streaming:
                list(result)
        except grpc.RpcError as err:
            return err.code(), err.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("service_name, method", list(_methods()))
def test_live_fuzz_never_answers_internal_and_leaves_the_other_tenant_alone(live, service_name, method):
    srv, keys, handler = live
    admin_rpc = service_name.endswith(".Tenants")
    key = ADMIN_KEY if admin_rpc else keys["fuzz-a"]
    before = _snapshot(srv.target, keys["fuzz-b"])
    template = _templates().get(method.name)
    anything = st.lists(_message(method.input_type), min_size=1, max_size=4 if method.client_streaming else 1)
    strategy = (_one_field_changed(template) | _one_field_changed(template) | anything) if template else anything

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(requests=strategy)
    def check(requests):
        code, details = _call(srv.target, service_name, method, requests, key)
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), f"{method.name}: {code} {details!r}"
        assert code == grpc.StatusCode.OK or details, f"{method.name}: {code} without a message"
        assert not handler.records, handler.format(handler.records[0])

    check()
    if admin_rpc:  # the fuzz may have set the tenants' quotas: give them back their defaults
        with Client(srv.target, ADMIN_KEY) as admin:
            for tenant in ("fuzz-a", "fuzz-b"):
                for quota in ("concurrent_calls", "banks", "stored_bytes"):
                    admin.set_quota(tenant, quota, None)
    assert _snapshot(srv.target, keys["fuzz-b"]) == before


STRINGS = ["", "\x00", "a\x00b", "x" * 5000, "ü" * 300, "kb\n", "' OR 1=1 --", "../../etc", "\u202e"]
BYTES = [b"", b"\x00", memory_payload(seed=4)[:-1], b"M3KV" + b"\xff" * 60]
INTS = {
    F.TYPE_INT32: [-1, 0, 1, 1023, 1024, 1025, 4097, 10_001, 2**31 - 1, -(2**31)],
    F.TYPE_INT64: [-1, 0, 1, 1025, 2**63 - 1, -(2**63)],
    F.TYPE_UINT32: [0, 1, 2**32 - 1],
    F.TYPE_UINT64: [0, 1, 2**26 + 1, 2**64 - 1],
    F.TYPE_FLOAT: [float("nan"), float("inf"), -float("inf"), -0.0, 1.0000001, 3.4e38],
    F.TYPE_DOUBLE: [float("nan"), float("inf"), -1e-9, 1e308],
    F.TYPE_BOOL: [True, False],
}


def _aimed(field) -> list:
    """Values aimed at one field: odd strings (NUL, very long, ...), broken bytes, ±1 around limits."""
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return [{"\x00": "v"}, {"k": "\x00"}, {"x" * 5000: "v"}, {"": ""}] if field.message_type.fields_by_name[
            "value"].type == F.TYPE_STRING else [{"\x00": 1.0}, {"k": float("nan")}, {"x" * 300: 1.0}]
    if field.type == F.TYPE_STRING:
        return STRINGS + TARGETED.get(field.name, [])
    if field.type == F.TYPE_BYTES:
        return BYTES
    if field.type == F.TYPE_ENUM:
        return [0, 99]
    if field.type == F.TYPE_MESSAGE:
        return [message_factory.GetMessageClass(field.message_type)()]  # present but empty
    return INTS[field.type]


def _variants(template: list):
    """The template stream once per (message, field, aimed value): every field of every item."""
    for index, original in enumerate(template):
        for path in _fields(original.DESCRIPTOR):
            field = path[-1]
            for value in _aimed(field):
                messages = [type(m)() for m in template]
                for copy, source in zip(messages, template):
                    copy.CopyFrom(source)
                holder = messages[index]
                for step in path[:-1]:
                    holder = _descend(holder, step)
                if field.message_type is not None and field.message_type.GetOptions().map_entry:
                    getattr(holder, field.name).update(value)
                elif field.is_repeated:
                    del getattr(holder, field.name)[:]
                    if field.type == F.TYPE_MESSAGE:
                        getattr(holder, field.name).add()
                    else:
                        getattr(holder, field.name).extend([value] * 3)
                elif field.type == F.TYPE_MESSAGE:
                    getattr(holder, field.name).CopyFrom(value)
                else:
                    setattr(holder, field.name, value)
                yield ".".join(f.name for f in path), value, messages


@pytest.mark.parametrize("service_name, method", [p for p in _methods() if p.values[1].name in _templates()],
                         ids=lambda p: getattr(p, "name", None))
def test_every_field_of_every_request_aimed_at_storage(live, service_name, method):
    """Deterministic sweep: each field of each message of a valid request, one at a time, set to
    each value aimed at it. Not one answer may be INTERNAL/UNKNOWN or unexplained."""
    srv, keys, handler = live
    key = ADMIN_KEY if service_name.endswith(".Tenants") else keys["fuzz-a"]
    before = _snapshot(srv.target, keys["fuzz-b"])
    calls = 0
    for where, value, requests in _variants(_templates()[method.name]):
        code, details = _call(srv.target, service_name, method, requests, key)
        calls += 1
        shown = repr(value)[:60]
        assert not handler.records, f"{method.name} {where}={shown}: " + handler.format(handler.records[0])
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), f"{method.name} {where}={shown}: {code}"
        assert code == grpc.StatusCode.OK or details, f"{method.name} {where}={shown}: {code} without a message"
    assert calls >= len(STRINGS)  # the sweep ran
    if service_name.endswith(".Tenants"):
        with Client(srv.target, ADMIN_KEY) as admin:
            for tenant in ("fuzz-a", "fuzz-b"):
                for quota in ("concurrent_calls", "banks", "stored_bytes"):
                    admin.set_quota(tenant, quota, None)
    assert _snapshot(srv.target, keys["fuzz-b"]) == before
