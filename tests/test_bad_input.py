"""Bad input, property-based: every request message of every service, filled by hypothesis with
empty, huge, negative, NaN/inf and odd-unicode values (and sometimes a real bank), sent with a
valid tenant key. Each call answers a deliberate status with a message — never INTERNAL or
UNKNOWN — the server stays up, and the data it already held is unchanged. Plus raw invalid
UTF-8 in string fields, which protobuf clients cannot even build."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor as F
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import FINGERPRINT, SPEC, memory_payload
from memory3.sdk.client import BankInfo, Reference
from memory3.sdk.client.client import Client
from memory3.service.server import SERVICE_NAMES

CANARY = "canary"
ALLOWED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
}
# Calls that may legitimately change data when hypothesis happens to build a valid request:
# they target banks other than the canary (see _strategy), so the canary must stay intact.
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40) | st.sampled_from(
    ["", " ", "\x00", "ü" * 300, "../../etc", "' OR 1=1 --", "🙂" * 5]
)
NUMBERS = {
    F.TYPE_INT32: st.integers(-(2**31), 2**31 - 1) | st.sampled_from([0, -1, 1, 5, 10**6]),
    F.TYPE_INT64: st.integers(-(2**63), 2**63 - 1) | st.sampled_from([0, -1, 1]),
    F.TYPE_UINT32: st.integers(0, 2**32 - 1) | st.sampled_from([0, 1, 2**32 - 1]),
    F.TYPE_UINT64: st.integers(0, 2**64 - 1) | st.sampled_from([0, 1, 10**12]),
    F.TYPE_FLOAT: st.floats(width=32, allow_nan=True, allow_infinity=True),
    F.TYPE_DOUBLE: st.floats(allow_nan=True, allow_infinity=True),
    F.TYPE_BOOL: st.booleans(),
}


def _value(field, depth: int):
    if field.type == F.TYPE_STRING:
        return st.sampled_from([CANARY + "-other", "missing-bank"]) | TEXT if field.name in ("bank", "name") else TEXT
    if field.type == F.TYPE_BYTES:
        return st.binary(max_size=64) | st.just(memory_payload()[:-1])
    if field.type == F.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    if field.type == F.TYPE_MESSAGE:
        return _message(field.message_type, depth + 1)
    return NUMBERS[field.type]


@st.composite
def _message(draw, descriptor, depth: int = 0):
    cls = message_factory.GetMessageClass(descriptor)
    message = cls()
    if depth > 3:
        return message
    chosen_oneofs = {o.name: draw(st.sampled_from([None, *[f.name for f in o.fields]])) for o in descriptor.oneofs}
    for field in descriptor.fields:
        if field.containing_oneof is not None and chosen_oneofs[field.containing_oneof.name] != field.name:
            continue
        if not draw(st.booleans()):
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, val = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            entries = draw(st.dictionaries(_value(key, depth), _value(val, depth), max_size=3))
            getattr(message, field.name).update(entries)
        elif field.is_repeated:
            getattr(message, field.name).extend(draw(st.lists(_value(field, depth), max_size=4)))
        elif field.type == F.TYPE_MESSAGE:
            getattr(message, field.name).CopyFrom(draw(_value(field, depth)))
        else:
            setattr(message, field.name, draw(_value(field, depth)))
    return message


def _methods():
    pool = descriptor_pool.Default()
    for service_name in SERVICE_NAMES:
        for method in pool.FindServiceByName(service_name).methods:
            yield pytest.param(service_name, method, id=f"{service_name.split('.')[-1]}.{method.name}")


@pytest.fixture(scope="module")
def canary(server, admin):
    admin.create_tenant("fuzz")
    _, key = admin.issue_key("fuzz")
    with Client(server.target, key) as client:
        client.create_bank(BankInfo(CANARY, FINGERPRINT, SPEC, "client", 4, "cosine"))
        client.write(CANARY, [Reference("keep-" + str(i), f"text {i}", {"k": "v"}, [1, i, 0, 1], memory_payload(seed=i)) for i in range(3)])
    return key


def _snapshot(server, key):
    with Client(server.target, key) as client:
        stored = client.fetch(CANARY, [f"keep-{i}" for i in range(3)])
        return client.stats(CANARY), [(s.external_id, s.text, s.metadata, s.memory) for s in stored]


def _call(target, service_name, method, requests, key):
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    path = f"/{service_name}/{method.name}"
    kwargs = dict(request_serializer=request_class.SerializeToString, response_deserializer=response_class.FromString)
    with grpc.insecure_channel(target) as channel:
        kind = ("stream" if method.client_streaming else "unary") + "_" + ("stream" if method.server_streaming else "unary")
        call = getattr(channel, kind)(path, **kwargs)
        payload = iter(requests) if method.client_streaming else requests[0]
        try:
            result = call(payload, metadata=(("authorization", f"Bearer {key}"),), timeout=30)
            if method.server_streaming:
                list(result)
        except grpc.RpcError as err:
            return err.code(), err.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("service_name, method", list(_methods()))
def test_fuzzed_requests_get_deliberate_answers(server, canary, service_name, method):
    before = _snapshot(server, canary)
    strategy = st.lists(_message(method.input_type), min_size=1, max_size=3 if method.client_streaming else 1)

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(requests=strategy)
    def check(requests):
        code, details = _call(server.target, service_name, method, requests, canary)
        assert code in ALLOWED, f"{method.name}: {code} {details!r} for {requests}"
        if code != grpc.StatusCode.OK:
            assert details

    check()
    with grpc.insecure_channel(server.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert _snapshot(server, canary) == before


def _raw_string_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field carrying bytes that are not UTF-8 (protobuf objects refuse to)."""
    return bytes([(number << 3) | 2, len(payload)]) + payload


@pytest.mark.parametrize(
    "path, streaming, body",
    [
        ("/memory3.v1.Memories/Retrieve", False, _raw_string_field(1, b"canary") + _raw_string_field(2, b"\xff\xfe bad")),
        ("/memory3.v1.Banks/GetBank", False, _raw_string_field(1, b"\xc3\x28")),
        ("/memory3.v1.Memories/Write", True,
         _raw_string_field(1, b"canary") + _raw_string_field(2, _raw_string_field(1, b"id") + _raw_string_field(2, b"\xed\xa0\x80"))),
        ("/memory3.v1.Memories/Stats", False, b"\x0a\xff\xff\xff\xff\x0f"),  # truncated length prefix
    ],
    ids=["retrieve-text", "bank-name", "write-reference-text", "truncated"],
)
def test_invalid_utf8_and_broken_messages_are_invalid_argument(server, canary, path, streaming, body):
    before = _snapshot(server, canary)
    with grpc.insecure_channel(server.target) as channel:
        kind = "stream_unary" if streaming else ("unary_stream" if "Retrieve" in path else "unary_unary")
        call = getattr(channel, kind)(path, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            result = call(iter([body]) if streaming else body, metadata=(("authorization", f"Bearer {canary}"),), timeout=10)
            if kind == "unary_stream":
                list(result)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "malformed request" in info.value.details()
    assert _snapshot(server, canary) == before
