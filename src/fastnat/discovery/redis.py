"""``redis://host:port/db``: a registry in Redis, shared by a fleet of forwarders.

Needs ``redis`` from PyPI (``pip install 'fastnat[redis]'``; ``hiredis``
makes it faster and is optional).

Each key is a sorted set, ``<prefix><key>``, whose members are the values
scored by their expiry time in milliseconds of Redis's own clock (``TIME``,
read inside the scripts, so that every client shares one clock whatever its
own says). Expiry is exact: a value is gone once Redis's clock reaches its
score, whether or not anything has trimmed it yet. Every operation is one
round trip, a Lua script run with EVALSHA:

* announce: trim the expired values, refuse a new value when the key holds
  its maximum (or a new key when the namespace holds its maximum of keys),
  ``ZADD``, then ``PEXPIREAT`` the key to its latest expiry, so that Redis
  drops a key whose values have all expired;
* lookup: trim, then ``ZRANGEBYSCORE (now +inf LIMIT 0 max_values`` (the
  values that expire first come first);
* withdraw: ``ZREM``, and the key's expiry and its index entry follow.

A sorted set per namespace, ``<prefix>\\x00keys``, scores each key by its
latest expiry: it is what bounds the number of keys (no key can contain
``\\x00``, so it cannot collide with one). All keys of a namespace are on one
Redis server (Redis Cluster is not supported).

URL options (query): ``prefix`` (default ``fastnat:``), ``max_keys``,
``max_values_per_key``, ``timeout`` (seconds, for connecting and for each
command); other options go to redis-py's connection pool (for example
``?max_connections=32`` or ``?socket_keepalive=true``).
"""

from __future__ import annotations

import asyncio
import math
import urllib.parse
from typing import Any

from fastnat.discovery.base import (
    DEFAULT_LOOKUP,
    Registry,
    validate_key,
    validate_max_values,
    validate_ttl,
    validate_value,
)
from fastnat.discovery.store import DEFAULT_MAX_KEYS, DEFAULT_MAX_VALUES_PER_KEY
from fastnat.errors import RegistryUnavailableError

try:
    import redis.asyncio as _redis
    from redis.asyncio.retry import Retry as _Retry
    from redis.backoff import NoBackoff as _NoBackoff
    from redis.exceptions import RedisError as _RedisError
except ImportError as exc:  # pragma: no cover - depends on the install
    _redis = None  # type: ignore[assignment]
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

__all__ = ["RedisRegistry", "DEFAULT_PREFIX", "DEFAULT_TIMEOUT"]

DEFAULT_PREFIX = "fastnat:"
DEFAULT_TIMEOUT = 5.0
# Connections to Redis per registry object (``?max_connections=`` changes it).
DEFAULT_MAX_CONNECTIONS = 16
# The namespace's index of keys: <prefix> + this.
INDEX_SUFFIX = "\x00keys"
_MAX_PREFIX = 128

# Redis's clock in ms. ``redis.replicate_commands`` makes scripts that read
# TIME and then write legal on Redis 3.2 to 4 (it is the default since 5).
_NOW = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: the key's set, the namespace's index. ARGV: value, ttl (ms),
# max values per key, max keys. Returns 1, or -1 (key full), -2 (namespace full).
_ANNOUNCE = (
    _NOW
    + """
local key, index = KEYS[1], KEYS[2]
local value = ARGV[1]
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
local count = redis.call('ZCARD', key)
if count == 0 then
  if redis.call('ZCARD', index) >= tonumber(ARGV[4]) and not redis.call('ZSCORE', index, key) then
    return -2
  end
elseif count >= tonumber(ARGV[3]) and not redis.call('ZSCORE', key, value) then
  return -1
end
redis.call('ZADD', key, now + tonumber(ARGV[2]), value)
local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2]
redis.call('PEXPIREAT', key, last)
redis.call('ZADD', index, last, key)
redis.call('PEXPIREAT', index, redis.call('ZRANGE', index, -1, -1, 'WITHSCORES')[2])
return 1
"""
)

# KEYS: the key's set. ARGV: max values.
_LOOKUP = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGEBYSCORE', KEYS[1], string.format('(%d', now), '+inf', 'LIMIT', 0, tonumber(ARGV[1]))
"""
)

# KEYS: the key's set, the namespace's index. ARGV: value. Keeps the index
# and the key's expiry in step with the values left.
_WITHDRAW = """
local key, index = KEYS[1], KEYS[2]
if redis.call('ZREM', key, ARGV[1]) == 0 then
  return 0
end
local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2]
if last then
  redis.call('PEXPIREAT', key, last)
  redis.call('ZADD', index, last, key)
else
  redis.call('ZREM', index, key)
end
return 1
"""

_OPTIONS = ("prefix", "max_keys", "max_values_per_key", "timeout")


def _positive_int(name: str, text: str, url: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer in {url!r}, got {text!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be at least 1 in {url!r}, got {value}")
    return value


def _redact(parts: urllib.parse.SplitResult) -> str:
    """The URL without password or query, to name the registry in messages."""
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class RedisRegistry(Registry):
    """A registry in Redis at ``redis://[user:password@]host:port/db`` (or ``rediss://``).

    See the module's documentation for the layout and the URL options.
    ``prefix``, ``max_keys``, ``max_values_per_key`` and ``timeout`` given
    here override the URL's. Errors: Redis cannot be reached (or fails) ->
    :class:`~fastnat.errors.RegistryUnavailableError` naming the registry;
    bad input or a cap reached -> ``ValueError``.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str | None = None,
        max_keys: int | None = None,
        max_values_per_key: int | None = None,
        timeout: float | None = None,
    ) -> None:
        if _IMPORT_ERROR is not None:
            raise ImportError(
                f"the redis:// registry needs the redis package ({_IMPORT_ERROR}): pip install 'fastnat[redis]'"
            )
        if not isinstance(url, str):
            raise ValueError(f"a registry URL must be a string, not {type(url).__name__}")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ("redis", "rediss"):
            raise ValueError(f"not a redis:// registry URL: {url!r}")
        try:
            parts.port  # noqa: B018 - validates the port
        except ValueError as exc:
            raise ValueError(f"bad registry URL {url!r}: {exc}") from None
        url_prefix = DEFAULT_PREFIX
        caps = {"max_keys": DEFAULT_MAX_KEYS, "max_values_per_key": DEFAULT_MAX_VALUES_PER_KEY}
        url_timeout: float | None = None
        passed: list[tuple[str, str]] = []
        for name, text in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
            if name == "prefix":
                url_prefix = text
            elif name in caps:
                caps[name] = _positive_int(name, text, url)
            elif name == "timeout":
                try:
                    url_timeout = float(text)
                except ValueError:
                    raise ValueError(f"timeout must be a number of seconds in {url!r}, got {text!r}") from None
            else:
                passed.append((name, text))
        if max_keys is not None:
            caps["max_keys"] = max_keys
        if max_values_per_key is not None:
            caps["max_values_per_key"] = max_values_per_key
        if timeout is None:
            timeout = url_timeout if url_timeout is not None else DEFAULT_TIMEOUT
        chosen_prefix: Any = url_prefix if prefix is None else prefix
        if not isinstance(chosen_prefix, str) or len(chosen_prefix) > _MAX_PREFIX or not chosen_prefix.isprintable():
            raise ValueError(
                f"prefix must be a printable string of at most {_MAX_PREFIX} characters, got {chosen_prefix!r}"
            )
        self.prefix: str = chosen_prefix
        for name, value in caps.items():
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.max_keys = caps["max_keys"]
        self.max_values_per_key = caps["max_values_per_key"]
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not (math.isfinite(timeout) and timeout > 0)
        ):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self.url = _redact(parts)
        self.where = f"registry {self.url}"
        self._index = self.prefix + INDEX_SUFFIX
        redis_url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(passed)))
        try:
            # Concurrent calls share a few connections and wait (at most
            # ``timeout``) for a free one rather than opening one each.
            pool = _redis.BlockingConnectionPool.from_url(
                redis_url,
                max_connections=DEFAULT_MAX_CONNECTIONS,
                timeout=self.timeout,
                decode_responses=True,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                # One more try on a connection error (a pooled connection that
                # Redis closed), none of redis-py's default backoff.
                retry=_Retry(_NoBackoff(), 1),
            )
        except (ValueError, TypeError) as exc:
            raise ValueError(f"bad registry URL {self.url}: {exc}") from None
        self._client = _redis.Redis(connection_pool=pool)
        self._client.auto_close_connection_pool = True  # closed with the client
        self._announce = self._client.register_script(_ANNOUNCE)
        self._lookup = self._client.register_script(_LOOKUP)
        self._withdraw = self._client.register_script(_WITHDRAW)

    def _key(self, key: str) -> str:
        return self.prefix + key

    async def _run(self, what: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        # redis-py bounds each socket operation; this bounds the whole call
        # (connect, a retry, a script load) whatever happens.
        try:
            return await asyncio.wait_for(script(keys=keys, args=args), 3 * self.timeout)
        except (TimeoutError, asyncio.TimeoutError):
            raise RegistryUnavailableError(f"{self.where}: {what}: no answer in time") from None
        except (_RedisError, OSError) as exc:
            detail = str(exc) or type(exc).__name__
            raise RegistryUnavailableError(f"{self.where}: {what}: {detail}") from None

    async def announce(self, key: str, value: str, ttl: float) -> None:
        key, value, ttl = validate_key(key), validate_value(value), validate_ttl(ttl)
        ttl_ms = max(1, math.ceil(ttl * 1000))
        result = await self._run(
            "announce",
            self._announce,
            [self._key(key), self._index],
            [value, ttl_ms, self.max_values_per_key, self.max_keys],
        )
        if result == -1:
            raise ValueError(f"key {key!r} holds its maximum of {self.max_values_per_key} values")
        if result == -2:
            raise ValueError(f"the registry holds its maximum of {self.max_keys} keys")

    async def lookup(self, key: str, max_values: int = DEFAULT_LOOKUP) -> list[str]:
        key, max_values = validate_key(key), validate_max_values(max_values)
        values = await self._run("lookup", self._lookup, [self._key(key)], [max_values])
        return [str(v) for v in values]

    async def withdraw(self, key: str, value: str) -> None:
        key, value = validate_key(key), validate_value(value)
        await self._run("withdraw", self._withdraw, [self._key(key), self._index], [value])

    async def close(self) -> None:
        closer = getattr(self._client, "aclose", None) or self._client.close
        try:
            await asyncio.wait_for(closer(), self.timeout)
        except (TimeoutError, asyncio.TimeoutError, _RedisError, OSError):
            pass
