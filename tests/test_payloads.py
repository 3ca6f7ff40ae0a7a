"""Payloads like a vector database's: JSON metadata stored as jsonb, filters evaluated in
PostgreSQL (eq, in, ranges, exists; AND) for Retrieve and Scroll, a paged Scroll over a bank's
references — through real gRPC and PostgreSQL + pgvector. Old clients (the string map) keep
working; bad metadata and filters get INVALID_ARGUMENT (or RESOURCE_EXHAUSTED for size) naming
the field, and change nothing."""

from __future__ import annotations

import json
import random
import threading

import grpc
import numpy as np
import pytest

from conftest import ServerThread, make_settings
from helpers import FINGERPRINT, SPEC, expect_status, memory_payload
from memory3.core.metadata import MetadataError, conditions_from_filter
from memory3.sdk.client import BankInfo, Client, Reference
from memory3.v1 import memories_pb2, memories_pb2_grpc

DIM = 4
LANGS = ["en", "de", "fr", None]


def _metadata(i: int) -> dict:
    """Reference i's metadata: every JSON type, some keys missing, lists, nesting."""
    meta = {"n": i, "half": i / 2, "even": i % 2 == 0, "tags": [f"t{i % 3}", f"u{i % 4}"],
            "day": f"2024-01-{1 + i % 28:02d}T00:00:00Z", "nested": {"a": [i, {"b": None}]}}
    if LANGS[i % 4] is not None:
        meta["lang"] = LANGS[i % 4]
    if i % 5 == 0:
        meta["note"] = None
    if i % 7 == 0:
        meta["n"] = str(i)  # the same key as a string: never matches a number test
    return meta


N = 60


def _vector(i: int) -> list[float]:
    rng = np.random.default_rng(i)
    return rng.normal(size=DIM).tolist()


@pytest.fixture(scope="module")
def kb(server, api_key):
    with Client(server.target, api_key) as client:
        client.create_bank(BankInfo("payloads", FINGERPRINT, SPEC, "client", DIM, "cosine"))
        client.write("payloads", [Reference(f"r{i:03d}", f"text {i}", _metadata(i), _vector(i),
                                            memory_payload(seed=i) if i % 10 == 0 else None) for i in range(N)])
    return server.target, api_key


@pytest.fixture(scope="module")
def hnsw_only(database_url, embedder, kb):
    """A second replica on the same database that never ranks a filter's references exactly
    (filter_exact_rows=0): Retrieve with eq/in filters takes the HNSW scan with the filter."""
    srv = ServerThread(make_settings(database_url, filter_exact_rows=0), embedder)
    yield srv.target
    srv.stop()


def _holds(condition, metadata: dict) -> bool:
    """What a condition means, in Python (the oracle the SQL is checked against)."""
    if condition.key not in metadata:
        return condition.op == "exists" and condition.value is False
    value = metadata[condition.key]

    def kind(x) -> str:
        return "bool" if isinstance(x, bool) else "number" if isinstance(x, (int, float)) else type(x).__name__

    def equal(a, b) -> bool:  # jsonb's equality: no conversion between types, numbers by value
        return kind(a) == kind(b) and a == b

    def eq(operand) -> bool:
        return equal(value, operand) or (isinstance(value, list) and any(equal(x, operand) for x in value))

    if condition.op == "eq":
        return eq(condition.value)
    if condition.op == "in":
        return any(eq(x) for x in condition.value)
    if condition.op == "exists":
        return condition.value is True
    bound = condition.value
    if isinstance(bound, str):
        if not isinstance(value, str):
            return False
        a, b = value.encode("utf-32-be"), bound.encode("utf-32-be")  # code point order
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        a, b = value, bound
    return {"gt": a > b, "gte": a >= b, "lt": a < b, "lte": a <= b}[condition.op]


FILTERS = [
    {"lang": "en"},
    {"lang": {"eq": "de"}},
    {"lang": {"in": ["en", "fr"]}},
    {"n": {"gte": 10, "lt": 20}},
    {"n": 14},
    {"n": 14.0},                                  # numbers by value
    {"n": "14"},                                  # no conversion: the string "14" is stored for i = 14 (14 % 7 == 0)
    {"n": {"gt": 50}},
    {"half": {"lte": 3.5}},
    {"even": True},
    {"even": 1},                                  # true is not 1
    {"tags": "t1"},                               # a list matches by an element
    {"tags": {"in": ["u3", "t2"]}},
    {"note": None},
    {"note": {"exists": True}},
    {"lang": {"exists": False}},
    {"missing": "x"},
    {"missing": {"exists": False}},
    {"day": {"gte": "2024-01-10T00:00:00Z", "lt": "2024-01-15T00:00:00Z"}},  # ISO timestamps compare as text
    {"lang": "en", "n": {"gt": 10}, "even": False},
    {"lang": {"in": ["en", "de"]}, "tags": "u1", "n": {"lte": 40}},
    {"nested": {"exists": True}, "n": {"gt": 55}},
    {"n": {"gt": 10, "lt": 5}},                   # empty
]


def _expected(spec: dict) -> set[str]:
    conditions = conditions_from_filter(spec)
    return {f"r{i:03d}" for i in range(N) if all(_holds(c, _metadata(i)) for c in conditions)}


@pytest.mark.parametrize("spec", FILTERS, ids=[json.dumps(f) for f in FILTERS])
def test_filters_select_the_same_references_in_scroll_and_retrieve(kb, hnsw_only, spec):
    target, key = kb
    expected = _expected(spec)
    with Client(target, key) as client, Client(hnsw_only, key) as through_hnsw:
        scrolled = list(client.scroll("payloads", filter=spec, page_size=7))
        assert [r.external_id for r in scrolled] == sorted(expected)
        query = _vector(1000)
        exact = sorted(expected, key=lambda i: -float(np.dot(query, _vector(int(i[1:]))) /
                                                      np.linalg.norm(_vector(int(i[1:]))) / np.linalg.norm(query)))
        for retriever in (client, through_hnsw):  # ranked exactly / by the HNSW scan with the filter
            hits = retriever.retrieve("payloads", vector=query, top_k=N, filter=spec)
            assert [h.external_id for h in hits] == exact
            top = retriever.retrieve("payloads", vector=query, top_k=3, filter=spec)
            assert [h.external_id for h in top] == exact[:3]
            for ref in hits:
                assert ref.metadata == _metadata(int(ref.external_id[1:]))
        for ref in scrolled:
            assert ref.metadata == _metadata(int(ref.external_id[1:]))


def test_json_metadata_round_trips_and_the_old_map_carries_its_strings(kb):
    target, key = kb
    with Client(target, key) as client:
        fetched = client.fetch("payloads", ["r007", "r012"], include_memory=False)
        assert [f.metadata for f in fetched] == [_metadata(7), _metadata(12)]
    with grpc.insecure_channel(target) as channel:  # what an old client reads: the map, strings only
        stub = memories_pb2_grpc.MemoriesStub(channel)
        auth = (("authorization", f"Bearer {key}"),)
        frames = [f for m in stub.Fetch(memories_pb2.FetchRequest(bank="payloads", external_ids=["r012"]),
                                         metadata=auth) for f in m.frames]
        stored = frames[0].reference
        assert dict(stored.metadata) == {"lang": "en", "day": "2024-01-13T00:00:00Z"}
        assert json.loads(stored.metadata_json) == _metadata(12)


def test_big_integers_unicode_and_empty_metadata_keep_their_values(client):
    client.create_bank(BankInfo("exact", FINGERPRINT, SPEC, "client", DIM, "l2"))
    meta = {"big": 2**62 + 1, "neg": -(2**63), "tiny": 5e-324, "max": 1.7976931348623157e308, "ü🙂": "ü🙂\u202e",
            "empty": {}, "none": [], "": "empty key", "deep": [[[[[[[1]]]]]]],  # 8 levels with the object
            "whole": 1e20, "one": 1.0}
    client.write("exact", [Reference("a", "t", meta, [1, 0, 0, 0]), Reference("b", "t", {}, [0, 1, 0, 0])])
    got = {r.external_id: r.metadata for r in client.fetch("exact", ["a", "b"], include_memory=False)}
    assert got == {"a": meta, "b": {}}
    assert isinstance(got["a"]["whole"], float) and isinstance(got["a"]["one"], float)  # jsonb prints 1e20 positionally
    assert [r.external_id for r in client.scroll("exact", filter={"big": {"gt": 2**62}})] == ["a"]
    assert [r.external_id for r in client.scroll("exact", filter={"big": 2**62 + 1})] == ["a"]
    assert [r.external_id for r in client.scroll("exact", filter={"big": 2**62})] == []  # exact, not as doubles
    assert [r.external_id for r in client.scroll("exact", filter={"ü🙂": "ü🙂\u202e"})] == ["a"]
    # the same content again is unchanged; a number where a string was is an update
    assert client.write("exact", [Reference("a", "t", meta, [1, 0, 0, 0])]).unchanged == 1
    assert client.write("exact", [Reference("b", "t", {"k": 1}, [0, 1, 0, 0])]).updated == 1
    assert client.write("exact", [Reference("b", "t", {"k": "1"}, [0, 1, 0, 0])]).updated == 1


def test_old_clients_with_the_string_map_still_work(server, client, tenant):
    """A client built before metadata_json and where: the map in, the map filter, the map out."""
    client.create_bank(BankInfo("old", FINGERPRINT, SPEC, "client", DIM, "cosine"))
    client.write("old", [Reference("mixed", "t", {"lang": "en", "tags": ["x", "y"]}, [1, 0, 0, 0])])
    with grpc.insecure_channel(server.target) as channel:
        stub = memories_pb2_grpc.MemoriesStub(channel)
        auth = (("authorization", f"Bearer {tenant.api_key}"),)
        record = memories_pb2.ReferenceRecord(external_id="old", text="t", metadata={"lang": "de", "n": "7"},
                                              embedding=[0, 1, 0, 0])
        summary = stub.Write(iter([memories_pb2.WriteRequest(bank="old"), memories_pb2.WriteRequest(reference=record)]),
                             metadata=auth)
        assert summary.inserted == 1

        def retrieve(**filter_map):
            request = memories_pb2.RetrieveRequest(bank="old", vector=memories_pb2.Vector(values=[1, 1, 0, 0]),
                                                   top_k=10, filter=filter_map)
            return {f.reference.external_id: dict(f.reference.metadata)
                    for m in stub.Retrieve(request, metadata=auth) for f in m.frames}

        assert retrieve(lang="de") == {"old": {"lang": "de", "n": "7"}}
        assert retrieve(n="7") == {"old": {"lang": "de", "n": "7"}}
        assert retrieve(lang="en") == {"mixed": {"lang": "en"}}  # the list is in metadata_json only
        assert retrieve(tags="y") == {"mixed": {"lang": "en"}}   # a map entry is an eq condition
        assert retrieve() == {"old": {"lang": "de", "n": "7"}, "mixed": {"lang": "en"}}
    assert client.fetch("old", ["old"])[0].metadata == {"lang": "de", "n": "7"}


def _scroll_all(client, bank, **options) -> list[str]:
    return [r.external_id for r in client.scroll(bank, **options)]


def test_scroll_pages_cover_every_reference_once_in_id_order(kb):
    target, key = kb
    everything = [f"r{i:03d}" for i in range(N)]
    with Client(target, key) as client:
        for size in (1, 7, 59, 60, 61, 1000, 0):
            assert _scroll_all(client, "payloads", page_size=size) == everything
        page, token = client.scroll_page("payloads", page_size=60)
        assert len(page) == 60 and token == ""                 # no empty last page
        page, token = client.scroll_page("payloads", page_size=0)
        assert len(page) == 60 and token == ""                 # 0 = 100
        page, token = client.scroll_page("payloads", page_size=25, include_text=False)
        assert [r.text for r in page] == [""] * 25 and token
        rest, token = client.scroll_page("payloads", page_size=1000, page_token=token, include_memory=True)
        assert [r.external_id for r in rest] == everything[25:] and token == ""
        for ref in rest:
            i = int(ref.external_id[1:])
            assert ref.text == f"text {i}"
            assert ref.memory == (memory_payload(seed=i) if i % 10 == 0 else None)
        empty, token = client.scroll_page("payloads", filter={"lang": "xx"})
        assert empty == [] and token == ""


def test_scroll_page_size_and_tokens_are_checked(kb, new_tenant):
    target, key = kb
    with Client(target, key) as client:
        for size in (-1, 1001, 2**31 - 1):
            with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "page_size"):
                client.scroll_page("payloads", page_size=size)
        _, token = client.scroll_page("payloads", page_size=5, filter={"even": True})
        assert _scroll_all(client, "payloads", page_size=5, filter={"even": True})[:5] != []
        with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "page_token"):  # another filter: another listing
            client.scroll_page("payloads", page_size=5, filter={"even": False}, page_token=token)
        with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "page_token"):
            client.scroll_page("payloads", page_size=5, page_token=token)
        with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "page_token"):
            client.scroll_page("payloads", page_token=token[:-4] + "AAAA")
        client.create_bank(BankInfo("payloads-2", FINGERPRINT, SPEC, "client", DIM, "cosine"))
        with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "page_token"):  # another bank
            client.scroll_page("payloads-2", page_size=5, filter={"even": True}, page_token=token)
        page, _ = client.scroll_page("payloads", page_size=5, filter={"even": True}, page_token=token)
        assert [r.external_id for r in page] == ["r010", "r012", "r014", "r016", "r018"]


def test_one_tenant_never_scrolls_another_tenants_references(kb, new_tenant):
    target, key = kb
    with Client(target, key) as client:
        _, token = client.scroll_page("payloads", page_size=5)
    other = new_tenant()
    with Client(target, other.api_key) as intruder:
        with expect_status(grpc.StatusCode.NOT_FOUND, "'payloads'"):
            intruder.scroll_page("payloads")
        intruder.create_bank(BankInfo("payloads", FINGERPRINT, SPEC, "client", DIM, "cosine"))
        intruder.write("payloads", [Reference("mine", "t", {"lang": "en"}, [1, 0, 0, 0])])
        with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "page_token"):  # the owner's token, same names
            intruder.scroll_page("payloads", page_size=5, page_token=token)
        assert _scroll_all(intruder, "payloads") == ["mine"]
        assert _scroll_all(intruder, "payloads", filter={"lang": "en"}) == ["mine"]
        assert [h.external_id for h in intruder.retrieve("payloads", vector=[1, 0, 0, 0], top_k=100,
                                                         filter={"n": {"exists": True}})] == []
        intruder.delete_bank("payloads")
    with Client(target, key) as client:
        assert len(_scroll_all(client, "payloads")) == N


def test_a_scroll_under_concurrent_writes_returns_each_lasting_reference_exactly_once(server, tenant, client):
    """Keyset paging: references present for the whole scroll come exactly once, whatever is
    inserted, updated or deleted meanwhile; none comes twice."""
    client.create_bank(BankInfo("busy", FINGERPRINT, SPEC, "client", DIM, "l2"))
    lasting = [f"k{i:04d}" for i in range(0, 600, 2)]
    doomed = [f"k{i:04d}" for i in range(1, 600, 2)]
    client.write_many("busy", (Reference(i, "t", {"v": 0}, [1, 0, 0, 0]) for i in lasting + doomed), batch_size=200)
    stop = threading.Event()
    writes = {"n": 0}

    def writer():
        rng = random.Random(0)
        with Client(server.target, tenant.api_key) as other:
            while not stop.is_set():
                version = writes["n"] + 1
                other.write("busy", [Reference(rng.choice(lasting), "t", {"v": version}, [1, 0, 0, 0]),  # update
                                     Reference(f"new{version:05d}-{rng.random()}", "t", {"v": 0}, [0, 1, 0, 0])])
                other.delete("busy", [rng.choice(doomed)])
                writes["n"] = version

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen, token, pages = [], None, 0
        while token != "":
            page, token = client.scroll_page("busy", page_size=13, page_token=token or "")
            seen += [r.external_id for r in page]
            pages += 1
            while writes["n"] < pages and thread.is_alive():  # at least one round of writes between pages
                stop.wait(0.01)
    finally:
        stop.set()
        thread.join()
    assert writes["n"] >= pages > 20
    assert len(seen) == len(set(seen)), "a reference came twice"
    assert set(lasting) <= set(seen)
    assert seen == sorted(seen)


BAD_METADATA = [
    ('{"x": NaN}', "finite"),
    ('{"x": Infinity}', "finite"),
    ('{"x": -Infinity}', "finite"),
    ('{"x": 1e400}', "finite"),
    ('{"x": ' + "9" * 400 + "}", "finite"),
    ('{"x": ' + "9" * 5000 + "}", "not JSON"),
    ('{"x": "a\\u0000b"}', "NUL"),
    ('{"a\\u0000": 1}', "NUL"),
    ('{"x": ["\\ud800"]}', "surrogate"),
    ('{"x": ' + "[" * 8 + "]" * 8 + "}", "deeper than 8"),
    ('{"x": ' + "[" * 5000 + "]" * 5000 + "}", "deeper than 8"),
    ('{"x": ' + '{"y": ' * 20 + "1" + "}" * 20 + "}", "deeper than 8"),
    ("[1, 2]", "JSON object"),
    ('"text"', "JSON object"),
    ("null", "JSON object"),
    ("{", "not JSON"),
    ('{"x": 1} trailing', "not JSON"),
]


def _raw(target: str, key: str):
    channel = grpc.insecure_channel(target)
    return channel, memories_pb2_grpc.MemoriesStub(channel), (("authorization", f"Bearer {key}"),)


@pytest.mark.parametrize("metadata_json, expected", BAD_METADATA, ids=[b[0][:30] for b in BAD_METADATA])
def test_bad_metadata_json_is_invalid_argument_and_writes_nothing(kb, metadata_json, expected):
    target, key = kb
    channel, stub, auth = _raw(target, key)
    with channel, Client(target, key) as client:
        before = client.stats("payloads")
        good = memories_pb2.ReferenceRecord(external_id="good", text="t", embedding=[1, 0, 0, 0], metadata_json='{"a": 1}')
        bad = memories_pb2.ReferenceRecord(external_id="bad", text="t", embedding=[1, 0, 0, 0], metadata_json=metadata_json)
        with expect_status(grpc.StatusCode.INVALID_ARGUMENT, expected) as info:
            stub.Write(iter([memories_pb2.WriteRequest(bank="payloads", reference=good),
                             memories_pb2.WriteRequest(reference=bad)]), metadata=auth, timeout=30)
        assert "'bad'" in info.value.details() and "metadata_json" in info.value.details()
        assert client.stats("payloads") == before


def test_metadata_limits_the_size_and_refuses_both_forms_at_once(kb):
    target, key = kb
    channel, stub, auth = _raw(target, key)
    with channel, Client(target, key) as client:
        before = client.stats("payloads")
        big = json.dumps({"x": "y" * (16 * 1024)})
        cases = [
            (memories_pb2.ReferenceRecord(external_id="big", text="t", embedding=[1, 0, 0, 0], metadata_json=big),
             grpc.StatusCode.RESOURCE_EXHAUSTED, "metadata_json exceeds"),
            (memories_pb2.ReferenceRecord(external_id="both", text="t", embedding=[1, 0, 0, 0], metadata={"a": "b"},
                                          metadata_json='{"a": 1}'), grpc.StatusCode.INVALID_ARGUMENT, "not both"),
        ]
        for record, code, expected in cases:
            with expect_status(code, expected):
                stub.Write(iter([memories_pb2.WriteRequest(bank="payloads", reference=record)]), metadata=auth, timeout=30)
        fits = json.dumps({"x": "y" * (16 * 1024 - 20)})
        with expect_status(grpc.StatusCode.NOT_FOUND):  # a fitting one passes the checks (and the bank is absent)
            stub.Write(iter([memories_pb2.WriteRequest(bank="absent", reference=memories_pb2.ReferenceRecord(
                external_id="fits", text="t", embedding=[1, 0, 0, 0], metadata_json=fits))]), metadata=auth, timeout=30)
        assert client.stats("payloads") == before


def _condition(key: str, op: int, value_json: str) -> memories_pb2.MetadataCondition:
    return memories_pb2.MetadataCondition(key=key, op=op, value_json=value_json)


EQ, IN, GT, EXISTS = (memories_pb2.FILTER_OP_EQ, memories_pb2.FILTER_OP_IN, memories_pb2.FILTER_OP_GT,
                      memories_pb2.FILTER_OP_EXISTS)
BAD_CONDITIONS = [
    (_condition("n", 0, "1"), "op must be one of"),
    (_condition("n", 99, "1"), "op must be one of"),
    (_condition("n", EQ, ""), "value_json is required"),
    (_condition("n", EQ, "nope"), "not JSON"),
    (_condition("n", EQ, "NaN"), "finite"),
    (_condition("n", GT, "1e999"), "finite"),
    (_condition("n", EQ, "[1, 2]"), "takes a string, number, boolean or null"),
    (_condition("n", EQ, '{"a": 1}'), "takes a string, number, boolean or null"),
    (_condition("n", EQ, '"a\\u0000"'), "NUL"),
    (_condition("n\x00", EQ, "1"), "NUL"),
    (_condition("n", IN, "[]"), "list of 1 to 1024"),
    (_condition("n", IN, "1"), "list of 1 to 1024"),
    (_condition("n", IN, json.dumps(list(range(1025)))), "list of 1 to 1024"),
    (_condition("n", IN, "[[1]]"), "must be a string, number, boolean or null"),
    (_condition("n", GT, "true"), "takes a number"),
    (_condition("n", GT, "null"), "takes a number"),
    (_condition("n", GT, "[1]"), "takes a number"),
    (_condition("n", EXISTS, '"yes"'), "true (the key is present) or false"),
    (_condition("n", EQ, "[" * 3000 + "]" * 3000), "deeper than"),
    (_condition("n", EQ, json.dumps("x" * 17000)), "at most"),
]


@pytest.mark.parametrize("condition, expected", BAD_CONDITIONS, ids=[str(i) for i in range(len(BAD_CONDITIONS))])
def test_bad_filters_are_invalid_argument_naming_the_condition(kb, condition, expected):
    target, key = kb
    channel, stub, auth = _raw(target, key)
    where = memories_pb2.MetadataFilter(conditions=[_condition("lang", EQ, '"en"'), condition])
    with channel:
        with expect_status(grpc.StatusCode.INVALID_ARGUMENT, expected) as info:
            list(stub.Scroll(memories_pb2.ScrollRequest(bank="payloads", where=where), metadata=auth, timeout=30))
        assert "where.conditions[1]" in info.value.details()
        with expect_status(grpc.StatusCode.INVALID_ARGUMENT, expected):
            list(stub.Retrieve(memories_pb2.RetrieveRequest(bank="payloads", vector=memories_pb2.Vector(
                values=[1, 0, 0, 0]), where=where), metadata=auth, timeout=30))


def test_too_many_conditions_and_the_sdk_syntax_are_checked(kb):
    target, key = kb
    channel, stub, auth = _raw(target, key)
    where = memories_pb2.MetadataFilter(conditions=[_condition(f"k{i}", EQ, "1") for i in range(65)])
    with channel:
        with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "at most 64"):
            list(stub.Scroll(memories_pb2.ScrollRequest(bank="payloads", where=where), metadata=auth, timeout=30))
        where = memories_pb2.MetadataFilter(conditions=[_condition(f"k{i}", EXISTS, "false") for i in range(64)])
        pages = list(stub.Scroll(memories_pb2.ScrollRequest(bank="payloads", where=where, page_size=1000),
                                 metadata=auth, timeout=30))
        assert sum(len(p.frames) for p in pages) == N
    with Client(target, key) as client:
        for spec, expected in [({"n": {"gtee": 1}}, "unknown operator 'gtee'"), ({"n": {}}, "empty object"),
                               (["n"], "JSON object"), ({"n": {"in": "x"}}, "list of 1 to 1024")]:
            with pytest.raises(MetadataError, match=expected):
                client.scroll_page("payloads", filter=spec)
            with pytest.raises(MetadataError, match=expected):
                client.retrieve("payloads", vector=[1, 0, 0, 0], filter=spec)


async def test_the_async_client_scrolls_and_filters_too(aclient):
    await aclient.create_bank(BankInfo("async", FINGERPRINT, SPEC, "client", DIM, "l2"))
    await aclient.write("async", [Reference(f"a{i}", "t", {"i": i, "odd": i % 2 == 1}, _vector(i)) for i in range(9)])
    assert [r.external_id async for r in aclient.scroll("async", page_size=2)] == [f"a{i}" for i in range(9)]
    odd = [r async for r in aclient.scroll("async", filter={"odd": True, "i": {"gt": 2}}, include_text=False)]
    assert [(r.external_id, r.metadata, r.text) for r in odd] == [(f"a{i}", {"i": i, "odd": True}, "") for i in (3, 5, 7)]
    hits = await aclient.retrieve("async", vector=_vector(3), top_k=2, filter={"i": {"in": [3, 4]}})
    assert [h.external_id for h in hits] == ["a3", "a4"]
