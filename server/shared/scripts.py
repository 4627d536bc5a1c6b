"""The Lua scripts of the shared limiter, run atomically by Redis: each decision is one script, so no other
plane's request can come between a check and its charge.

Keys (P is the configured prefix; every key expires):

    P epoch                 set when the quota counters were seeded from the usage table; its absence means this
                            Redis lost them (restarted without persistence, flushed) and must be seeded again
    P s:SCOPE               hash: rl, rs (requests bucket level and stamp), tl, ts (tokens bucket); expires when
                            both buckets would be full again, which is what an absent key means
    P l:SCOPE               sorted set: the leases of admitted requests, scored by when they lapse (a plane
                            that died without settling gives its concurrency and reservations back then)
    P h:SCOPE               hash: lease -> "tokens usd dayKey monthKey", what the lease reserved and where
    P q:SCOPE:WINDOW        hash: tokens, usd (used) and rtokens, rusd (reserved) in one UTC day or month;
                            expires a day after the window ends

Numbers go back to Python as strings: Redis would truncate a Lua number to an integer.
"""

from __future__ import annotations

# Give back what a lease reserved, once: the lease found in the sorted set is the one that has not been given back.
_RELEASE = """
-- Redis before 7 replicates a script that read TIME only by its effects when asked (7 always does).
if redis.replicate_commands then
  redis.replicate_commands()
end

local function release(leases, held, lease)
  if redis.call('ZREM', leases, lease) == 0 then
    return
  end
  local record = redis.call('HGET', held, lease)
  redis.call('HDEL', held, lease)
  if not record then
    return
  end
  local tokens, usd, day, month = string.match(record, '^(%S+) (%S+) (%S+) (%S+)$')
  tokens, usd = tonumber(tokens), tonumber(usd)
  if tokens == 0 and usd == 0 then
    return
  end
  for _, key in ipairs({day, month}) do
    if redis.call('EXISTS', key) == 1 then
      local r = redis.call('HMGET', key, 'rtokens', 'rusd')
      redis.call('HSET', key, 'rtokens', tostring(math.max(0, (tonumber(r[1]) or 0) - tokens)),
        'rusd', tostring(math.max(0, (tonumber(r[2]) or 0) - usd)))
    end
  end
end

local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function refill(level, stamp, capacity, now)
  if not level then
    return capacity
  end
  return math.min(capacity, tonumber(level) + math.max(0, now - tonumber(stamp)) * capacity / 60)
end

local function keep_state(key, s, now)
  -- Until both buckets are full again: an absent key reads as full.
  local ttl = 0
  if s.rpm then
    ttl = math.max(ttl, (s.rpm - s.rl) * 60 / s.rpm)
  end
  if s.tpm then
    ttl = math.max(ttl, (s.tpm - s.tl) * 60 / s.tpm)
  end
  redis.call('PEXPIRE', key, math.ceil(ttl * 1000) + 1000)
end
"""

# KEYS: epoch, then 5 a scope (state, leases, held, day quota, month quota).
# ARGV: lease, lease ms, tokens, usd, day expiry ms, month expiry ms, scope count, then 7 a scope: rpm, tpm,
# concurrency, tokens/day, tokens/month, usd/day, usd/month ('' for none).
# Returns {1, levels...} admitted, {0, scope, reason, a, b, c, levels...} refused, or {'unseeded'}; levels are
# each scope's requests and tokens bucket ('' where it has none), after the charge when admitted.
ADMIT = (
    _RELEASE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'unseeded'}
end
local now = clock()
local lease, lease_ms = ARGV[1], tonumber(ARGV[2])
local want = {tonumber(ARGV[3]), tonumber(ARGV[4])}
local day_at, month_at, n = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local scopes, refusal = {}, nil
for i = 1, n do
  local k, a = 1 + (i - 1) * 5, 7 + (i - 1) * 7
  local s = {
    state = KEYS[k + 1], leases = KEYS[k + 2], held = KEYS[k + 3], day = KEYS[k + 4], month = KEYS[k + 5],
    rpm = tonumber(ARGV[a + 1]), tpm = tonumber(ARGV[a + 2]), concurrency = tonumber(ARGV[a + 3]),
    quotas = {tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7])},
  }
  s.reserving = s.quotas[1] or s.quotas[2] or s.quotas[3] or s.quotas[4]
  s.leasing = s.concurrency or s.reserving
  local levels = redis.call('HMGET', s.state, 'rl', 'rs', 'tl', 'ts')
  if s.rpm then
    s.rl = refill(levels[1], levels[2], s.rpm, now)
  end
  if s.tpm then
    s.tl = refill(levels[3], levels[4], s.tpm, now)
  end
  if s.leasing then
    -- Leases of planes that never settled (killed) lapse here, a bounded number per decision.
    for _, old in ipairs(redis.call('ZRANGEBYSCORE', s.leases, '-inf', now, 'LIMIT', 0, 64)) do
      release(s.leases, s.held, old)
    end
  end
  scopes[i] = s
  if not refusal then
    if s.concurrency and redis.call('ZCARD', s.leases) >= s.concurrency then
      refusal = {i, 'concurrency'}
    elseif s.rpm and s.rl < 1 then
      refusal = {i, 'requests', tostring((1 - s.rl) * 60 / s.rpm)}
    elseif s.tpm and want[1] > s.tpm then
      refusal = {i, 'tokens_exceed_limit'}
    elseif s.tpm and s.tl < want[1] then
      refusal = {i, 'tokens', tostring((want[1] - s.tl) * 60 / s.tpm)}
    else
      -- In server.policy.limits.QUOTAS order: tokens a day, tokens a month, USD a day, USD a month.
      for q = 1, 4 do
        local limit = s.quotas[q]
        if limit then
          local key = (q % 2 == 1) and s.day or s.month
          local unit = (q <= 2) and 1 or 2
          local v = redis.call('HMGET', key, unit == 1 and 'tokens' or 'usd', unit == 1 and 'rtokens' or 'rusd')
          local used, reserved = tonumber(v[1]) or 0, tonumber(v[2]) or 0
          if used + reserved + want[unit] > limit then
            refusal = {i, 'quota', tostring(q - 1), tostring(used), tostring(reserved)}
            break
          end
        end
      end
    end
  end
end
local reply
if refusal then
  reply = {0, refusal[1], refusal[2], refusal[3] or '', refusal[4] or '', refusal[5] or ''}
else
  reply = {1}
  for _, s in ipairs(scopes) do
    if s.rpm then
      s.rl = s.rl - 1
      redis.call('HSET', s.state, 'rl', tostring(s.rl), 'rs', tostring(now))
    end
    if s.tpm then
      s.tl = s.tl - want[1]
      redis.call('HSET', s.state, 'tl', tostring(s.tl), 'ts', tostring(now))
    end
    if s.rpm or s.tpm then
      keep_state(s.state, s, now)
    end
    if s.leasing then
      local tokens, usd = 0, 0
      if s.reserving then
        tokens, usd = want[1], want[2]
        redis.call('HINCRBYFLOAT', s.day, 'rtokens', tokens)
        redis.call('HINCRBYFLOAT', s.day, 'rusd', usd)
        redis.call('PEXPIREAT', s.day, day_at)
        redis.call('HINCRBYFLOAT', s.month, 'rtokens', tokens)
        redis.call('HINCRBYFLOAT', s.month, 'rusd', usd)
        redis.call('PEXPIREAT', s.month, month_at)
      end
      redis.call('ZADD', s.leases, now + lease_ms / 1000, lease)
      redis.call('HSET', s.held, lease, tostring(tokens) .. ' ' .. tostring(usd) .. ' ' .. s.day .. ' ' .. s.month)
      redis.call('PEXPIRE', s.leases, lease_ms + 1000)
      redis.call('PEXPIRE', s.held, lease_ms + 1000)
    end
  end
end
for _, s in ipairs(scopes) do
  table.insert(reply, s.rl and tostring(s.rl) or '')
  table.insert(reply, s.tl and tostring(s.tl) or '')
end
return reply
"""
)

# KEYS: 5 a scope, as ADMIT's (the day and month of now, where the use is counted).
# ARGV: lease, tokens reserved, tokens used, usd used, day expiry ms, month expiry ms, scope count, then a scope's
# tpm ('' for none).
SETTLE = (
    _RELEASE
    + """
local now = clock()
local lease, reserved, tokens, usd = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local day_at, month_at, n = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
for i = 1, n do
  local k = (i - 1) * 5
  local state, leases, held, day, month = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5]
  release(leases, held, lease)
  local tpm = tonumber(ARGV[7 + i])
  if tpm then
    -- The tokens reserved and not used go back to the bucket; more used than reserved is a debt.
    local levels = redis.call('HMGET', state, 'tl', 'ts')
    local s = {tpm = tpm, tl = math.min(tpm, refill(levels[1], levels[2], tpm, now) + reserved - tokens)}
    redis.call('HSET', state, 'tl', tostring(s.tl), 'ts', tostring(now))
    local ttl = redis.call('PTTL', state)
    keep_state(state, s, now)
    if ttl > redis.call('PTTL', state) then
      redis.call('PEXPIRE', state, ttl)  -- the requests bucket may need longer
    end
  end
  -- Used counts whether or not the scope has a quota now: one set later starts from it (or from the usage
  -- table, whichever says more).
  if tokens > 0 or usd > 0 then
    for _, window in ipairs({{day, day_at}, {month, month_at}}) do
      redis.call('HINCRBYFLOAT', window[1], 'tokens', tokens)
      redis.call('HINCRBYFLOAT', window[1], 'usd', usd)
      redis.call('PEXPIREAT', window[1], window[2])
    end
  end
end
return 1
"""
)

# KEYS: epoch, then quota hashes. ARGV: epoch ms (0: leave the epoch alone), then 3 a key: tokens, usd, expiry ms.
# Each counter becomes the larger of what it holds and the seed: both count only what was really used, each
# perhaps behind the other, so the larger is the closer; and N planes seeding the same window do not add up.
SEED = """
for i = 2, #KEYS do
  local a = 1 + (i - 2) * 3
  local v = redis.call('HMGET', KEYS[i], 'tokens', 'usd')
  if (tonumber(v[1]) or 0) < tonumber(ARGV[a + 1]) then
    redis.call('HSET', KEYS[i], 'tokens', ARGV[a + 1])
  end
  if (tonumber(v[2]) or 0) < tonumber(ARGV[a + 2]) then
    redis.call('HSET', KEYS[i], 'usd', ARGV[a + 2])
  end
  redis.call('PEXPIREAT', KEYS[i], ARGV[a + 3])
end
if tonumber(ARGV[1]) > 0 then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return 1
"""
