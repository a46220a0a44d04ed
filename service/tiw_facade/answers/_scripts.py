"""The shared answers' layout in Redis and the Lua scripts that keep it: declarations only
(``RedisAnswerStore`` in ``_shared.py`` runs them).

Per account, every key under one prefix ``tiw:{<account hash>}:answers:`` (the {hash tag} keeps an
account's keys in one Redis Cluster slot, so the scripts, which name some keys themselves, stay
valid on a Cluster):

``...e:<key>``        hash: the entry (``a`` answered_at as repr, ``r`` RequestId, ``p`` payload,
                      ``t`` present if terminal, ``c``/``m`` a kept error; empty fields left out);
                      expires its lifetime after its request was sent, as the in-process store's do.
``...i:<key>``        the invalidation stamp: the latest ``at`` the key was invalidated at; kept
                      long after any request begun before it could still answer.
``...l:<key>``        the lease: the token of the store instance that holds it.
``...h:<key>``        a callback's confirmation turn (``_confirm.py``): taken for
                      TIW_CALLBACK_CONFIRM_INTERVAL by the replica confirming the key.
``...w:<action>``     sorted set of wanted keys, score = until when they are wanted.
``...s:<action>``     the refresh schedule: sorted set of wanted keys whose entry is neither
                      terminal nor an error, score = its answered_at (0: no entry yet).
``...used``           the answers' share of Redis (``max_bytes``, TIW_SHARED_ANSWERS_MAX_BYTES):
``...until``          sorted sets of the counted entries' members, scored by last use (a read
``...sizes``          marks it, once a second at most) and by when the entry expires; a hash
``...bytes``          member -> counted size; the counted total. Each put counts its entry,
                      forgets expired ones and deletes the least recently used until the total is
                      within the bound, in its script; stops and drops take their entries out. A
                      counted size over-estimates what Redis spends (``ENTRY_OVERHEAD``,
                      measured), so answers sharing a ``noeviction`` Redis with the limiter and the
                      idempotency records never fill it. Lost bookkeeping is rebuilt as puts go
                      (never looped on); entries of older releases are not counted and expire.
                      The four keys expire the longest lifetime an entry may have after the last
                      put.

``<key>`` is ``Key.text()``. Times are the callers' wall clocks (``time.time()``), as floats:
Redis keeps scores as doubles and prints them exactly, so answered_at survives the trip unchanged.
answered_at is ``Entry.answered_at``: when the request TIW answered was sent, not when its answer
came. (Entries written by an older facade, same format, carry the arrival: they read a round trip
younger than they are until they expire.)
"""

from __future__ import annotations

# next_due looks at this many of the schedule's oldest members at most: each call stays O(log n)
# even when many of the oldest are leased by other replicas.
SCAN = 64
# A put forgets at most this many expired entries' accounting, and evicts at most this many entries:
# each put stays O(log n) even when the accounting has to catch up.
EVICT_BATCH = 64
# What an entry costs Redis beyond the allocations of its key's name, of its member three times and
# of its fields' names and values, which the PUT script counts itself (``allocated``): the objects,
# dictionary entries and bucket slots of the keyspace, the expiry, the hash, both sorted sets (skip
# list nodes) and the sizes hash. Measured on redis-server 7.0.15 (jemalloc), INFO used_memory after
# MEMORY PURGE, per entry of DescribeSnapshotTask keys (114-byte key names, 81-byte members), payloads
# of 0 to 30,000 bytes, 1,000 to 20,000 entries: 262 to 308 with payloads up to 64 bytes (a listpack
# hash), 493 to 579 above (a hash table), the most just after the dictionaries doubled (16,385
# entries), 16 more with the terminal flag. 768 leaves ~30% for what the measurement missed: a
# dictionary in the middle of rehashing holds both tables, error entries carry a field more, and
# other Redis versions lay their structures out a little differently. With it an entry with a
# 600-byte answer counts ~1.95 KB against ~1.75 KB spent.
ENTRY_OVERHEAD = 768
# A read marks its entry used if it was last marked longer ago than this: least recently used to the
# second is close enough, and most reads then write nothing.
USE_RESOLUTION = 1.0
# The type of each kind of key, by the name's part after the prefix (up to a colon, if any).
KEY_TYPES = {
    "e": "hash",
    "i": "string",
    "l": "string",
    "h": "string",
    "w": "zset",
    "s": "zset",
    "alive": "string",
    "used": "zset",
    "until": "zset",
    "sizes": "hash",
    "bytes": "string",
}

# A number the caller wrote (an answered_at, a stamp) or nil: nil for anything else, NaN, or later
# than ARGV's ``latest`` (the caller's clock plus CLOCK_TOLERANCE). tonumber accepts 'nan' and 'inf'.
_PLAUSIBLE = """
local function plausible(value, latest)
  local n = tonumber(value)
  if n == nil or n ~= n or n > latest then return nil end
  return n
end
"""

# The answers' share of Redis (``max_bytes``): per account, ``...used`` (sorted set, member = key text,
# score = last use), ``...until`` (sorted set, score = when the entry expires, on the writer's clock),
# ``...sizes`` (hash, member -> counted size) and ``...bytes`` (the counted total). B: those four
# keys' names, in that order. ``forget`` takes a member out of them and returns its counted size (nil
# if none); ``recount`` sums the sizes; ``uncount`` takes a size off the total. Nothing in them is
# trusted: a size or total that is no number counts as lost, never as an error. ``allocated``: what
# the allocator (jemalloc) hands out for a string of ``length`` bytes with Redis's header and
# terminator (at most 9 bytes): its size class, four classes per power of two, never less.
_ACCOUNTING = """
local function allocated(length)
  local n, step = length + 9, 16
  while step * 8 < n do step = step * 2 end
  return math.ceil(n / step) * step
end
local function forget(B, member)
  local counted = tonumber(redis.call('HGET', B[3], member))
  redis.call('HDEL', B[3], member)
  redis.call('ZREM', B[1], member)
  redis.call('ZREM', B[2], member)
  return counted
end
local function recount(B)
  local total = 0
  for _, counted in ipairs(redis.call('HVALS', B[3])) do total = total + (tonumber(counted) or 0) end
  return total
end
local function uncount(B, counted)
  local total = tonumber(redis.call('GET', B[4]))
  if total and counted and counted > 0 then
    redis.call('SET', B[4], math.max(0, total - counted), 'KEEPTTL')
  end
end
"""

# KEYS: entry, stamp, schedule, wanted, then the accounting's used, until, sizes, bytes. ARGV:
# asked_at, answered_at (the send), lifetime (ms), '1' if the entry ends refreshes (terminal or
# error), the key's member, latest plausible time, now, the bound in bytes, the overhead counted per
# entry, the prefix of the account's keys, the accounting's lifetime (ms), EVICT_BATCH, then the
# entry's fields as pairs. An answer to a request sent before the one held is refused: answers never
# go back in time. A held time or stamp that is no plausible time is dropped, not obeyed (a forged
# one would refuse every answer for as long as it is kept). Reply: {kept, entries evicted, what was
# dropped...}.
#
# Accounting: the entry counts ARGV[9] plus the allocations of its key's name, of its member three
# times (used, until, sizes) and of each of its fields' names and values. First, up to EVICT_BATCH
# members past their time leave the accounting (those whose entry is gone; one still there, its
# writer's clock being behind, is given the time Redis says it has left). Then the least recently
# used entries are deleted, up to EVICT_BATCH, until the new total is within the bound; an empty
# index means nothing else is counted (the bookkeeping was lost): the total starts again from 0. A
# lost total, or an evicted member without a size (the sizes were lost), makes the total the sum of
# the sizes again. An entry larger than the bound by itself is not kept in
# Redis (the one held is dropped, and the refresh schedule is kept as for any answer): the replicas'
# own copies serve it. Evictions are counted only for entries that were there to delete.
PUT_SCRIPT = (
    _PLAUSIBLE
    + _ACCOUNTING
    + """
local latest = tonumber(ARGV[6])
local dropped = {}
local raw = redis.call('GET', KEYS[2])
local stamp = plausible(raw, latest)
if raw and not stamp then
  redis.call('DEL', KEYS[2])
  dropped[#dropped + 1] = 'stamp'
end
if stamp and stamp >= tonumber(ARGV[1]) then return {0, 0, unpack(dropped)} end
local held = redis.call('HGET', KEYS[1], 'a')
if held and not plausible(held, latest) then
  dropped[#dropped + 1] = 'time'
elseif held and tonumber(held) > tonumber(ARGV[2]) then
  return {0, 0, unpack(dropped)}
end
local B = {KEYS[5], KEYS[6], KEYS[7], KEYS[8]}
local member, now, bound = ARGV[5], tonumber(ARGV[7]), tonumber(ARGV[8])
local batch = tonumber(ARGV[12])
local size = tonumber(ARGV[9]) + allocated(#KEYS[1]) + 3 * allocated(#member)
for i = 13, #ARGV do size = size + allocated(#ARGV[i]) end
local total = tonumber(redis.call('GET', B[4])) or recount(B)
total = total - (forget(B, member) or 0)
if redis.call('ZCARD', B[1]) == 0 then
  total = 0
  redis.call('DEL', B[2], B[3])
end
for _, other in ipairs(redis.call('ZRANGEBYSCORE', B[2], '-inf', now, 'LIMIT', 0, batch)) do
  local left = redis.call('PTTL', ARGV[10] .. 'e:' .. other)
  if left == -2 then
    total = total - (forget(B, other) or 0)
  else
    if left < 0 then left = tonumber(ARGV[11]) end
    redis.call('ZADD', B[2], now + left / 1000, other)
  end
end
local evicted = 0
if size <= bound then
  local n = 0
  while total + size > bound and n < batch do
    local oldest = redis.call('ZRANGE', B[1], 0, 0)
    if #oldest == 0 then
      total = 0
      redis.call('DEL', B[2], B[3])
      break
    end
    local counted = forget(B, oldest[1])
    if counted then total = total - counted else total = recount(B) end
    evicted = evicted + redis.call('DEL', ARGV[10] .. 'e:' .. oldest[1])
    n = n + 1
  end
end
redis.call('DEL', KEYS[1])
if size <= bound then
  redis.call('HSET', KEYS[1], unpack(ARGV, 13))
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('ZADD', B[1], ARGV[7], member)
  redis.call('ZADD', B[2], now + tonumber(ARGV[3]) / 1000, member)
  redis.call('HSET', B[3], member, size)
  total = total + size
end
redis.call('SET', B[4], math.max(0, total))
for i = 1, 4 do
  if redis.call('PTTL', B[i]) < tonumber(ARGV[11]) then redis.call('PEXPIRE', B[i], ARGV[11]) end
end
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[3], ARGV[5])
  redis.call('ZREM', KEYS[4], ARGV[5])
elseif redis.call('ZSCORE', KEYS[4], ARGV[5]) then
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[5])
end
return {1, evicted, unpack(dropped)}
"""
)
# KEYS: the accounting's used, then each key's entry. ARGV: now, USE_RESOLUTION, each key's member.
# Every entry found is marked used now, if counted (entries of older releases are not) and last
# marked more than USE_RESOLUTION ago: a read of a hot key writes nothing (no AOF, no replication).
# Marking is best effort (pcall): a Redis refusing writes (full) still answers the read.
GET_SCRIPT = """
local now = tonumber(ARGV[1])
local found = {}
for i = 2, #KEYS do
  local fields = redis.call('HGETALL', KEYS[i])
  if #fields > 0 then
    local used = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i + 1]))
    if used and used < now - tonumber(ARGV[2]) then
      redis.pcall('ZADD', KEYS[1], 'XX', 'GT', ARGV[1], ARGV[i + 1])
    end
  end
  found[i - 1] = fields
end
return found
"""
# KEYS: the accounting's used, until, sizes, bytes, then (entry, stamp, schedule) per key. ARGV: at,
# the stamp's lifetime (ms), latest plausible time, each key's member. The entry leaves the
# accounting with it. A wanted key left without an entry is due first (score 0); a later stamp is
# never lowered, but one that is no plausible time is replaced.
INVALIDATE_SCRIPT = (
    _PLAUSIBLE
    + _ACCOUNTING
    + """
local at = tonumber(ARGV[1])
local latest = tonumber(ARGV[3])
local B = {KEYS[1], KEYS[2], KEYS[3], KEYS[4]}
local counted = 0
for i = 4, #ARGV do
  local n = 4 + (i - 4) * 3
  redis.call('DEL', KEYS[n + 1])
  counted = counted + (forget(B, ARGV[i]) or 0)
  local stamp = plausible(redis.call('GET', KEYS[n + 2]), latest)
  if not stamp or stamp < at then
    redis.call('SET', KEYS[n + 2], ARGV[1], 'PX', ARGV[2])
  end
  redis.call('ZADD', KEYS[n + 3], 'XX', 0, ARGV[i])
end
uncount(B, counted)
"""
)
# KEYS: (wanted, schedule, entry) per key. ARGV: until, latest plausible time, each key's member. A
# key with an entry joins the schedule unless the entry ended refreshes (terminal or error). One
# without an entry does not: its callers ask TIW themselves, and a request that keeps failing must
# not be re-sent in a loop. An entry whose time is no plausible time is due at once (score 0): the
# next read drops it, and a refresh replaces it.
WANT_SCRIPT = (
    _PLAUSIBLE
    + """
local latest = tonumber(ARGV[2])
for i = 3, #ARGV do
  local n = (i - 3) * 3
  local member = ARGV[i]
  redis.call('ZADD', KEYS[n + 1], 'GT', ARGV[1], member)
  if not redis.call('ZSCORE', KEYS[n + 2], member) then
    local entry = redis.call('HMGET', KEYS[n + 3], 'a', 't', 'c')
    if entry[1] and not entry[2] and not entry[3] then
      redis.call('ZADD', KEYS[n + 2], plausible(entry[1], latest) or 0, member)
    end
  end
end
"""
)
# KEYS: schedule. ARGV: at, the key's member. A scheduled key is next due as if answered at ``at``.
POSTPONE_SCRIPT = """
redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[2])
"""
# KEYS: schedule, wanted. ARGV: now, older_than, lease (ms), our token, the leases' key prefix, SCAN.
# Keys no longer wanted leave both sets; the oldest free one is leased and returned.
NEXT_DUE_SCRIPT = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1])
local older_than = tonumber(ARGV[2])
local members = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[6]) - 1, 'WITHSCORES')
for i = 1, #members, 2 do
  local member = members[i]
  if tonumber(members[i + 1]) >= older_than then return false end
  if not redis.call('ZSCORE', KEYS[2], member) then
    redis.call('ZREM', KEYS[1], member)
  elseif redis.call('SET', ARGV[5] .. member, ARGV[4], 'NX', 'PX', ARGV[3]) then
    return member
  end
end
return false
"""
# KEYS: entry, schedule, then the accounting's used, until, sizes, bytes. ARGV: the fields read as
# pairs (name, value), the key's member. Deletes the entry only if it still holds exactly what was
# read (a good answer written meanwhile stays), with its accounting, and makes a scheduled key due at
# once: its refresh writes the good answer.
DROP_SCRIPT = (
    _ACCOUNTING
    + """
local held = redis.call('HGETALL', KEYS[1])
if #held ~= #ARGV - 1 then return 0 end
local read = {}
for i = 1, #ARGV - 1, 2 do read[ARGV[i]] = ARGV[i + 1] end
for i = 1, #held, 2 do
  if read[held[i]] ~= held[i + 1] then return 0 end
end
redis.call('DEL', KEYS[1])
local B = {KEYS[3], KEYS[4], KEYS[5], KEYS[6]}
uncount(B, forget(B, ARGV[#ARGV]))
redis.call('ZADD', KEYS[2], 'XX', 0, ARGV[#ARGV])
return 1
"""
)
# KEYS: schedule, wanted. ARGV: the member. A member that is no key of its action leaves both sets.
FORGET_SCRIPT = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
"""
# KEYS: any of the store's keys. ARGV: the type each must have. Deletes those of another type; reply:
# their positions (1-based).
MEND_SCRIPT = """
local mended = {}
for i = 1, #KEYS do
  local kind = redis.call('TYPE', KEYS[i])['ok']
  if kind ~= 'none' and kind ~= ARGV[i] then
    redis.call('DEL', KEYS[i])
    mended[#mended + 1] = i
  end
end
return mended
"""
# KEYS: the lease. ARGV: our token, ms. Something there that no replica wrote (not a string, or no
# expiry: every lease has one) is deleted first, or the key could never be fetched again. Reply:
# {1 if taken, 1 if something was deleted}.
LEASE_SCRIPT = """
local mended = 0
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'none' and (kind ~= 'string' or redis.call('PTTL', KEYS[1]) < 0) then
  redis.call('DEL', KEYS[1])
  mended = 1
end
local taken = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
return {taken, mended}
"""
# KEYS: the lease. ARGV: our token.
UNLEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
"""
