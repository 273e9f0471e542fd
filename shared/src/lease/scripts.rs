//! The lease's Lua scripts. Each runs atomically in Redis, so "check the owner, then act" can
//! never interleave with another holder's acquisition.

use std::sync::LazyLock;

use redis::Script;

/// `SET lease owner NX PX ttl`, and on success `INCR` the token counter beside it.
///
/// KEYS: lease, counter. ARGV: owner, ttl ms. Returns the counter value, or nil when busy.
pub(super) static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return false
",
    )
});

/// Once the database granted the token: if the lease is still ours, refresh its TTL, write
/// the holder record beside it and raise the counter to the granted token (never lower it).
///
/// KEYS: lease, holder, counter. ARGV: owner, ttl ms, worker, job id, since, token.
/// Returns 1, or 0 when the lease is no longer ours.
pub(super) static RECORD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'owner', ARGV[1], 'worker', ARGV[3], 'job_id', ARGV[4],
  'since', ARGV[5], 'token', ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
local seen = tonumber(redis.call('GET', KEYS[3]) or '0') or 0
if tonumber(ARGV[6]) > seen then redis.call('SET', KEYS[3], ARGV[6]) end
return 1
",
    )
});

/// Compare-and-pexpire: renews the lease (and its holder record) only if it is still ours.
///
/// KEYS: lease, holder. ARGV: owner, ttl ms. Returns `{1, ''}` renewed, `{0, ''}` gone,
/// `{2, other_owner}` taken by someone else.
pub(super) static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return {1, ''}
elseif not v then
  return {0, ''}
end
return {2, v}
",
    )
});

/// Compare-and-delete: removes the lease and its holder record only if the lease is ours.
///
/// KEYS: lease, holder. ARGV: owner. Returns 1 when deleted, 0 when it was not ours.
pub(super) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
return 0
",
    )
});
