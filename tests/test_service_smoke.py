from memory3.sdk.memory_spec import MemorySpec
from memory3.sdk.types import BankInfo, Reference

SPEC = MemorySpec((0, 1), 2, 16, 4, 32, "int8")


def test_create_write_retrieve(client):
    bank = client.create_bank(BankInfo("b1", "fp-test", SPEC))
    assert bank.embedder_dim == 384
    summary = client.write("b1", [Reference("r1", "The capital of Zorvania is Mirath."), Reference("r2", "Bananas are yellow fruit.")])
    assert summary.inserted == 2
    hits = client.retrieve("b1", text="What is the capital of Zorvania?", top_k=1)
    assert hits[0].external_id == "r1"
