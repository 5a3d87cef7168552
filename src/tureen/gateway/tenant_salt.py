"""Per-tenant ``cache_salt``: tenants behind one gateway never share prefix-cache blocks.

The engine mixes a request's ``cache_salt`` (vLLM's field) into its first KV block's hash, so two
requests with different salts never hit each other's cached blocks, and one tenant cannot learn
what another sent from prefix-cache timing (``tureen.engine.block_hash``). The gateway sets that
salt itself, from the authenticated caller, so a client cannot pick another tenant's:

    salt = HMAC-SHA256(secret, "<scope>:<tenant id>" NUL <the client's own cache_salt, if any>)

- the tenant is the key's ``team_id`` (``scope: team``, the default: a team's keys share their
  cache) or the key itself (``scope: key``); the key's SHA-256 is the id, never the key. The master
  key is the tenant ``admin``. Anonymous callers (keys not required, none sent) get no salt: they
  are one tenant, and their own ``cache_salt`` passes through unchanged.
- the client's own ``cache_salt`` only narrows its tenant's cache further (vLLM's per-user use); it
  is folded into the HMAC, so it can never reach another tenant's blocks.
- the secret is ``tureen_settings.cache_salt.secret`` (``os.environ/NAME``; set it when several
  gateway processes front the same replicas, so their salts agree), else derived from the master
  key, else random per process.

Deployments that refuse unknown request fields (OpenAI's own API) are sent no salt: see
``tureen_params.cache_salt`` and ``Deployment.accepts_cache_salt``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os

from starlette.responses import Response

from tureen.gateway.config import CacheSaltSettings, GatewayConfig
from tureen.gateway.pipeline import Principal, RequestContext
from tureen.server.errors import APIError

logger = logging.getLogger("tureen.gateway")

FIELD = "cache_salt"
MAX_CLIENT_SALT = 256  # the engine's own bound on cache_salt


def salt_secret(config: GatewayConfig) -> bytes:
    """The HMAC key: configured, else derived from the master key, else random (per process)."""
    configured = config.tureen_settings.cache_salt.secret
    if configured is not None:
        return configured.get_secret_value().encode()
    master = config.general_settings.master_key
    if master is not None:
        return hmac.new(master.get_secret_value().encode(), b"tureen cache_salt v1", hashlib.sha256).digest()
    return os.urandom(32)


def tenant_of(principal: Principal | None, settings: CacheSaltSettings) -> str | None:
    """``"team:<id>"``, ``"key:<sha256>"``, ``"admin"``, or None for an anonymous caller."""
    if principal is None or principal.key_hash is None:
        return None
    if getattr(principal, "admin", False):
        return "admin"
    if settings.scope == "team" and principal.team_id:
        return f"team:{principal.team_id}"
    return f"key:{principal.key_hash}"


class TenantSaltStep:
    """After auth: replace the body's ``cache_salt`` with the caller's tenant salt (``ctx.cache_salt``)."""

    name = "cache_salt"

    def __init__(self, settings: CacheSaltSettings, secret: bytes) -> None:
        self.settings = settings
        self._secret = secret

    def salt(self, tenant: str, client_salt: str | None) -> str:
        message = tenant.encode() + b"\0" + (client_salt or "").encode("utf-8", "surrogatepass")
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    async def before(self, ctx: RequestContext) -> Response | None:
        tenant = tenant_of(ctx.principal, self.settings)
        if tenant is None:
            return None
        client_salt = ctx.body.get(FIELD)
        if client_salt is not None and not (isinstance(client_salt, str) and 0 < len(client_salt) <= MAX_CLIENT_SALT):
            return APIError(400, f"'{FIELD}' must be a non-empty string of at most {MAX_CLIENT_SALT} characters.",
                            param=FIELD).response()
        ctx.body = {k: v for k, v in ctx.body.items() if k != FIELD}
        ctx.cache_salt = self.salt(tenant, client_salt)
        return None

    async def after(self, ctx: RequestContext) -> None:
        return None


def install(gateway) -> TenantSaltStep | None:
    """Put the step right after auth (it needs the caller), when ``tureen_settings.cache_salt.enabled``."""
    settings = gateway.config.tureen_settings.cache_salt
    if not settings.enabled:
        logger.warning("tureen_settings.cache_salt.enabled is false: tenants share prefix-cache blocks, so one "
                       "tenant can learn another's prompts from prefix-cache timing")
        return None
    step = TenantSaltStep(settings, salt_secret(gateway.config))
    names = [s.name for s in gateway.pipeline.steps]
    if "auth" not in names:  # no policy (no keys at all): every caller is anonymous, nothing to separate
        return None
    gateway.pipeline.insert(names.index("auth") + 1, step)
    return step
