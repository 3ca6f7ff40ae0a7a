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
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ADMIN_KEY, ServerThread, make_settings
from helpers import FINGERPRINT, SPEC, memory_payload
from memory3.sdk.client import BankInfo, Reference
from memory3.sdk.client.client import Client
from memory3.service.server import SERVICE_NAMES

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
    strategy = st.lists(_message(method.input_type), min_size=1, max_size=4 if method.client_streaming else 1)

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
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
