//! The per-profile refresh lock: with several broker replicas exactly one
//! refreshes. `SET NX PX` with the owner id; released only by its owner
//! (compare-and-delete in Lua); if the holder dies, the lock expires.

use std::time::Duration;

use common::RedisHandle;

const RELEASE: &str = r"if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

/// Tries to take the lock; true when this owner now holds it.
pub async fn acquire(
    redis: &mut RedisHandle,
    key: &str,
    owner: &str,
    ttl: Duration,
) -> redis::RedisResult<bool> {
    let reply: Option<String> = redis::cmd("SET")
        .arg(key)
        .arg(owner)
        .arg("NX")
        .arg("PX")
        .arg(ttl.as_millis() as u64)
        .query_async(redis)
        .await?;
    Ok(reply.is_some())
}

/// Releases the lock if this owner still holds it.
pub async fn release(redis: &mut RedisHandle, key: &str, owner: &str) -> redis::RedisResult<bool> {
    let deleted: i64 = redis::Script::new(RELEASE)
        .key(key)
        .arg(owner)
        .invoke_async(redis)
        .await?;
    Ok(deleted == 1)
}
