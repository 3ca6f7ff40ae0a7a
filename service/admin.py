"""The Banks and Tenants services: bank CRUD for a tenant, tenant and key management for the admin."""

from __future__ import annotations

from memory3.core.banks import bank_to_proto
from memory3.v1 import banks_pb2, banks_pb2_grpc, tenants_pb2, tenants_pb2_grpc

from .auth import Authenticator
from .bank_store import BankStore, CodebookStore
from .config import Settings
from .convert import bank_from_proto, timestamp
from .errors import InvalidArgument, ResourceExhausted, rpc
from .offload import CpuPool
from .quotas import QuotaStore
from .tenant_store import TenantStore
from .tokens import Tokens


class CodebooksMixin:
    """PutCodebook / GetCodebook of the Banks service."""

    @rpc
    async def PutCodebook(self, request_iterator, context):
        tenant_id = await self.auth.tenant(context)
        await self.quotas.check_storage(tenant_id)
        bank, blob = None, bytearray()
        async for message in request_iterator:
            if bank is None:
                bank = await self.banks.get(tenant_id, message.bank)
            elif message.bank and message.bank != bank.name:
                raise InvalidArgument("one PutCodebook stream uploads to one bank")
            blob += message.chunk
            if len(blob) > self.max_codebook_bytes:
                raise ResourceExhausted(f"codebook exceeds {self.max_codebook_bytes} bytes")
        if bank is None:
            raise InvalidArgument("empty PutCodebook stream")
        await self.quotas.check_storage(tenant_id, len(blob))
        stored, _ = await self.codebooks.put(bank, blob, self.cpu)
        return _codebook_proto(bank.name, stored)

    @rpc
    async def GetCodebook(self, request, context):
        tenant_id = await self.auth.tenant(context)
        bank = await self.banks.get(tenant_id, request.bank)
        stored = await self.codebooks.get(bank, request.version)
        chunk = self.chunk_bytes
        yield banks_pb2.CodebookChunk(codebook=_codebook_proto(bank.name, stored), chunk=stored.blob[:chunk])
        for start in range(chunk, len(stored.blob), chunk):
            yield banks_pb2.CodebookChunk(chunk=stored.blob[start : start + chunk])


def _codebook_proto(bank: str, stored) -> banks_pb2.Codebook:
    return banks_pb2.Codebook(
        bank=bank, version=stored.version, digest=stored.digest.hex(), size=stored.size,
        created_at=timestamp(stored.created_at),
    )


class BanksServicer(CodebooksMixin, banks_pb2_grpc.BanksServicer):
    def __init__(
        self, auth: Authenticator, banks: BankStore, codebooks: CodebookStore, settings: Settings, quotas: QuotaStore,
        cpu: CpuPool, tokens: Tokens,
    ) -> None:
        self.auth = auth
        self.tokens = tokens
        self.quotas = quotas
        self.cpu = cpu
        self.banks = banks
        self.codebooks = codebooks
        self.chunk_bytes = settings.chunk_bytes
        self.max_codebook_bytes = settings.max_memory_bytes

    @rpc
    async def CreateBank(self, request, context):
        tenant_id = await self.auth.tenant(context)
        if not request.HasField("bank"):
            raise InvalidArgument("CreateBank needs a bank")
        bank = bank_from_proto(request.bank, tenant_id)
        bank, _ = await self.banks.create(bank, before_creating=lambda: self.quotas.check_banks(tenant_id))
        return bank_to_proto(bank.info())

    @rpc
    async def GetBank(self, request, context):
        tenant_id = await self.auth.tenant(context)
        return bank_to_proto((await self.banks.get(tenant_id, request.name)).info())

    @rpc
    async def ListBanks(self, request, context):
        tenant_id = await self.auth.tenant(context)
        if request.page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        after = self.tokens.open(tenant_id, "banks", request.page_token, "page_token")
        banks, last = await self.banks.list(tenant_id, request.page_size, after)
        return banks_pb2.ListBanksResponse(banks=[bank_to_proto(b.info()) for b in banks],
                                           next_page_token=self.tokens.seal(tenant_id, "banks", last))

    @rpc
    async def DeleteBank(self, request, context):
        tenant_id = await self.auth.tenant(context)
        return banks_pb2.DeleteBankResponse(references_deleted=await self.banks.delete(tenant_id, request.name))


class TenantsServicer(tenants_pb2_grpc.TenantsServicer):
    def __init__(self, auth: Authenticator, tenants: TenantStore, quotas: QuotaStore) -> None:
        self.auth = auth
        self.tenants = tenants
        self.quotas = quotas

    @rpc
    async def CreateTenant(self, request, context):
        await self.auth.require_admin(context)
        tenant = await self.tenants.create(request.name)
        return tenants_pb2.Tenant(name=tenant.name, created_at=timestamp(tenant.created_at))

    @rpc
    async def ListTenants(self, request, context):
        await self.auth.require_admin(context)
        return tenants_pb2.ListTenantsResponse(
            tenants=[tenants_pb2.Tenant(name=t.name, created_at=timestamp(t.created_at)) for t in await self.tenants.list()]
        )

    @rpc
    async def IssueKey(self, request, context):
        await self.auth.require_admin(context)
        key_id, api_key = await self.tenants.issue_key(request.tenant, request.label)
        return tenants_pb2.IssueKeyResponse(key_id=key_id, api_key=api_key)

    @rpc
    async def RevokeKey(self, request, context):
        await self.auth.require_admin(context)
        return tenants_pb2.RevokeKeyResponse(revoked=await self.tenants.revoke_key(request.key_id))

    async def _quotas(self, tenant: str) -> tenants_pb2.GetQuotasResponse:
        quotas = await self.quotas.describe(tenant)
        return tenants_pb2.GetQuotasResponse(
            tenant=tenant,
            quotas=[
                tenants_pb2.Quota(name=q.name, limit=q.limit, default_limit=q.default, overridden=q.overridden,
                                  used=q.used)
                for q in quotas
            ],
        )

    @rpc
    async def GetQuotas(self, request, context):
        await self.auth.require_admin(context)
        return await self._quotas(request.tenant)

    @rpc
    async def SetQuota(self, request, context):
        await self.auth.require_admin(context)
        await self.quotas.set(request.tenant, request.name, None if request.reset else request.value)
        return await self._quotas(request.tenant)
