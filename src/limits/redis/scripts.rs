//! The Lua scripts that decide admissions and settlements in Redis, with
//! Redis's clock, and how their replies are read.

/// Admissions of one tenant in one period, decided in order, each all or
/// nothing. ARGV: rpm, tpm, max concurrent, budget (pUSD), spend this
/// instance owes Redis for the period that Redis has not counted (pUSD,
/// counted against the budget), then what this instance admitted while
/// Redis was unavailable (its requests still in flight, counted as held
/// slots; its requests and tokens TATs in Unix ms, which the shared ones do
/// not fall behind), lease TTL, how long a hold of quota taken ahead lives
/// (ms), then per admission: tokens (-1: no request, only what it gives
/// back), lease, whether the lease is a slot the instance kept (`1`: Redis
/// counts it as the request's own while it holds it), then for
/// `redis.lease` the requests and tokens asked for ahead, those given back
/// (tokens below zero: charged), the hold they are given back from (empty
/// for none) and the id of the hold that what is asked for ahead becomes.
/// What is given back is counted first; the requests are decided next; what
/// is asked for ahead is granted last, to those admitted, when it fits, so a
/// burst's own requests come first. KEYS: the TATs' hash, the slots' sorted
/// set, the period's usage hash, the holds' set.
/// Replies one string, `secs,micros,spent_pusd` (the Redis clock, as
/// `TIME` gives it) followed by `,refused_limit_or_empty,requests_tat -
/// now,tokens_tat - now` per admission (`+` for the limit when admitted
/// with what it asked for ahead; the TATs count what is held as taken),
/// the differences in whole
/// microseconds, each number written as Redis would write it as an integer
/// reply (`%d`; Lua's `tostring` keeps only 14 digits): one value for the
/// client to parse rather than three an admission (redis-rs's reader took
/// about 1k instructions a value). Leases expire
/// at whole milliseconds: Redis keeps a small sorted set's scores as text,
/// and writing a fraction (`%.17g`) cost more than the rest of the `ZADD`.
pub(crate) const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local W, eps = 60000, 1e-6
local rpm, tpm, maxc, budget, owed, ttl, hold_ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[9]), tonumber(ARGV[10])
local tats = redis.call('HMGET', KEYS[1], 'requests_tat', 'tokens_tat', 'holds')
-- A stored number, or `default` for none or what is not one (`nan`, a
-- word: an operator's edit).
local function stored(v, default)
  local n = tonumber(v or '')
  if n == nil or n ~= n then return default end
  return n
end
local rtat = math.max(stored(tats[1], 0), tonumber(ARGV[7]))
local ttat = math.max(stored(tats[2], 0), tonumber(ARGV[8]))
local spent = tonumber(redis.call('HGET', KEYS[3], 'cost_pusd') or '0')
local held = 0
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  held = redis.call('ZCARD', KEYS[2]) + tonumber(ARGV[6])
end
local reply, leases, moved = {t[1], t[2], string.format('%d', spent)}, {}, false
local function shift(tat, step)
  if step > 0 then return math.max(tat, now) + step end
  return math.max(tat + step, now)
end
-- Quota instances hold (`redis.lease`), each `id,requests,tokens,expiry`
-- in the set KEYS[4] (`holds` in KEYS[1] counts its members, so a tenant
-- without any costs no read): counted against the limits beside the TATs,
-- not in them, so it does not age with the minute while it waits to be
-- used. A hold not given back by its expiry (its instance gone, or cut off
-- from Redis) counts as used whole from then, and stays marked (`,c`) for
-- a release that comes later to give back what was not used; marked ones
-- go two windows after their expiry (the set lives as long from its last
-- write). The set is read too when a hold is taken or given back, before
-- anything is written; one that is not a set (an operator's key) is left
-- alone, and nothing is held in it. A member not of the gateway's form is
-- removed, counts are at most the limit, and one expiring more than two
-- windows ahead is removed (a hold lives at most about half a window).
-- A count that is not one (below zero, not a number) is read and written
-- anew.
local holds, charged, held_r, held_t, held_n = {}, {}, 0, 0, stored(tats[3], -1)
if not tats[3] then held_n = 0 elseif held_n < 0 then held_n = -1 end
local count, reads, usable = held_n, held_n ~= 0, true
for i = 11, #ARGV, 9 do
  reads = reads or ARGV[i + 7] ~= '' or ARGV[i + 8] ~= ''
end
local function at_most(n, limit)
  if limit > 0 then return math.min(tonumber(n), limit) end
  return 0
end
if reads then
  local members = redis.pcall('SMEMBERS', KEYS[4])
  usable = members.err == nil
  if not usable then members = {} end
  count = 0
  for _, m in ipairs(members) do
    local id, r, k, expiry, mark = string.match(m, '^(%x+),(%d+),(%d+),(%d+)(,?c?)$')
    expiry = tonumber(expiry or '0')
    if id then r, k = at_most(r, rpm), at_most(k, tpm) end
    if not id or expiry > now + 2 * W or (mark == ',c' and expiry + 2 * W <= now) then
      redis.call('SREM', KEYS[4], m)
    elseif mark == ',c' then
      charged[id], count = m, count + 1
    elseif expiry <= now then
      -- Added first: removing the last member first would drop the key
      -- and its expiry.
      redis.call('SADD', KEYS[4], m .. ',c')
      redis.call('SREM', KEYS[4], m)
      redis.call('PEXPIRE', KEYS[4], 2 * W)
      charged[id], count = m .. ',c', count + 1
      if r > 0 then rtat = math.max(rtat, expiry) + r * W / rpm end
      if k > 0 then ttat = math.max(ttat, expiry) + k * W / tpm end
      moved = true
    else
      holds[id] = {m, r, k}
      held_r, held_t, count = held_r + r, held_t + k, count + 1
    end
  end
end
-- A TAT as the limit stands: what is held counts as taken, from now.
local function seen(tat, n, per)
  if per > 0 and n > 0 then return math.max(tat, now) + n * W / per end
  return tat
end
-- The reply's field for a TAT: how far it stands ahead of now, with what
-- is held, in whole microseconds.
local function ahead(tat, n, per)
  return string.format('%d', math.floor((seen(tat, n, per) - now) * 1000))
end
-- The TATs after taking `r` requests and `k` tokens, or nil and the limit
-- that refuses them.
local function take(r, k)
  local new_r, new_t = rtat, ttat
  if rpm > 0 then
    new_r = math.max(rtat, now) + r * W / rpm
    if seen(new_r, held_r, rpm) - now - W > eps then return nil, 'rpm' end
  end
  if tpm > 0 then
    new_t = math.max(ttat, now) + k * W / tpm
    if seen(new_t, held_t, tpm) - now - W > eps then return nil, 'tpm' end
  end
  return new_r, new_t
end
-- What is given back first: a hold's release takes it out of what is held
-- and charges what of it was used (taken less given back) now; without a
-- hold, or from one charged whole at its expiry, what is given back comes
-- off the TATs; a hold released already (or never taken) gives nothing.
for i = 11, #ARGV, 9 do
  local back_r, back_t, id = tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6]), ARGV[i + 7]
  local h, c = holds[id], charged[id]
  if h then
    redis.call('SREM', KEYS[4], h[1])
    holds[id], count = nil, count - 1
    held_r, held_t = held_r - h[2], held_t - h[3]
    back_r, back_t = back_r - h[2], back_t - h[3]
  elseif c then
    redis.call('SREM', KEYS[4], c)
    charged[id], count = nil, count - 1
  end
  if id == '' or h or c then
    if rpm > 0 and back_r ~= 0 then rtat = shift(rtat, -back_r * W / rpm); moved = true end
    if tpm > 0 and back_t ~= 0 then ttat = shift(ttat, -back_t * W / tpm); moved = true end
  end
end
local admitted = {}
for i = 11, #ARGV, 9 do
  local tokens, refused = tonumber(ARGV[i]), ''
  if tokens >= 0 then
    local new_r, new_t = rtat, ttat
    if budget > 0 and spent + owed >= budget then refused = 'budget' end
    if refused == '' then
      new_r, new_t = take(1, tokens)
      if new_r == nil then refused = new_t end
    end
    -- A kept slot Redis still holds is the request's own: taken out of the
    -- count, and put back (renewed) whatever the decision.
    local own = false
    if refused == '' and maxc > 0 then
      own = ARGV[i + 2] == '1' and redis.call('ZREM', KEYS[2], ARGV[i + 1]) == 1
      if own then held = held - 1 end
      if held >= maxc then refused = 'concurrency' end
    end
    if maxc > 0 and (refused == '' or own) then
      held = held + 1
      leases[#leases + 1] = math.floor(now + ttl)
      leases[#leases + 1] = ARGV[i + 1]
    end
    if refused == '' then
      moved = moved or rpm > 0 or tpm > 0
      rtat, ttat = new_r, new_t
      admitted[#admitted + 1] = i
    end
  end
  reply[#reply + 1] = refused
  reply[#reply + 1] = ahead(rtat, held_r, rpm)
  reply[#reply + 1] = ahead(ttat, held_t, tpm)
end
for _, i in ipairs(admitted) do
  local extra_r, extra_t, id = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4]), ARGV[i + 8]
  if (extra_r > 0 or extra_t > 0) and id ~= '' and usable and take(extra_r, extra_t) ~= nil then
    redis.call('SADD', KEYS[4], string.format('%s,%d,%d,%d', id, extra_r, extra_t, math.floor(now + hold_ttl)))
    -- As long as the TATs' hash: a hold past its expiry is still there
    -- for the next admission to count.
    redis.call('PEXPIRE', KEYS[4], 2 * W)
    held_r, held_t, count = held_r + extra_r, held_t + extra_t, count + 1
    local at = 4 + (i - 11) / 9 * 3
    reply[at] = '+'
    reply[at + 1] = ahead(rtat, held_r, rpm)
    reply[at + 2] = ahead(ttat, held_t, tpm)
  end
end
if #leases > 0 then
  redis.call('ZADD', KEYS[2], unpack(leases))
  redis.call('PEXPIRE', KEYS[2], ttl * 2)
end
if moved or count ~= held_n then
  redis.call('HSET', KEYS[1], 'requests_tat', string.format('%.6f', rtat), 'tokens_tat', string.format('%.6f', ttat), 'holds', count)
  redis.call('PEXPIRE', KEYS[1], 2 * W)
end
return table.concat(reply, ',')
";

/// A batch of settlements of one tenant in one period, applied at most
/// once: Redis sets the batch's bit in `KEYS[4]` (a hash of this
/// instance's batches, 32 to a field) and a batch whose bit is set is not
/// applied again, so a batch sent again after its answer timed out (a frozen
/// Redis runs the original when it thaws) counts once. A batch whose keys
/// hold what they should not (a wrong type, a counter it adds to that is
/// not an integer or would overflow, a record that is not one) is refused
/// with an error coded [`REFUSED`] before anything is written. Only
/// commands the documented ACL grants. ARGV: rpm, tpm, usage TTL (seconds,
/// 0 to keep), the batch's bit, the record's TTL (ms), the summed requests,
/// prompt tokens, completion tokens, cost (pUSD), requests whose tokens the
/// gateway counted, cache hits and what they saved (pUSD), the number k of
/// limit corrections, k pairs (request delta, token delta) in order, then
/// the leases to release. Replies 1 when applied, 0 for a batch already
/// applied.
pub(super) const SETTLE: &str = r"
-- Nothing is written until everything that could fail has been read and
-- checked, and the batch's bit is set last: a batch Redis refuses (an
-- error coded REFUSED) leaves no trace and is sent again whole, never
-- applied in part and then skipped.
local function read(...)
  local r = redis.pcall(...)
  if type(r) == 'table' and r.err then return nil, 'REFUSED ' .. r.err end
  return r
end
-- Whether HINCRBY takes `v`: Redis's own rules (no sign but '-', no
-- leading zeros, within 64 bits).
local function integer(v)
  if v == '0' then return true end
  local digits = string.match(v, '^%-?([1-9]%d*)$')
  if not digits or #digits > 19 then return false end
  if #digits < 19 then return true end
  return digits <= (string.sub(v, 1, 1) == '-' and '9223372036854775808' or '9223372036854775807')
end
local n = tonumber(ARGV[4])
local field, mask = math.floor(n / 32), bit.lshift(1, n % 32)
local held, err = read('HGET', KEYS[4], field)
if err then return redis.error_reply(err) end
if held and not (integer(held) and math.abs(tonumber(held)) <= 4294967295) then
  return redis.error_reply('REFUSED the settlement record ' .. KEYS[4] .. ' holds ' .. held)
end
local word = tonumber(held or '0')
if bit.band(word, mask) ~= 0 then return 0 end
local rpm, tpm, ttl, k = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[13])
local corrects = k > 0 and (rpm > 0 or tpm > 0)
local tats = false
if corrects then
  tats, err = read('HMGET', KEYS[1], 'requests_tat', 'tokens_tat')
  if err then return redis.error_reply(err) end
end
local releases = #ARGV > 13 + 2 * k
if releases then
  local _, zerr = read('ZCARD', KEYS[2])
  if zerr then return redis.error_reply(zerr) end
end
local adds = tonumber(ARGV[6]) > 0 or tonumber(ARGV[9]) ~= 0 or tonumber(ARGV[7]) > 0 or tonumber(ARGV[8]) > 0
-- The counters this batch adds to, with what it adds.
local counters = {}
if adds then
  counters = {{'requests', ARGV[6]}, {'prompt_tokens', ARGV[7]}, {'completion_tokens', ARGV[8]}, {'cost_pusd', ARGV[9]}}
  if tonumber(ARGV[10]) > 0 then counters[#counters + 1] = {'estimated_requests', ARGV[10]} end
  if tonumber(ARGV[11]) > 0 then
    counters[#counters + 1] = {'cache_hits', ARGV[11]}
    counters[#counters + 1] = {'cache_saved_pusd', ARGV[12]}
  end
  local names = {}
  for i, c in ipairs(counters) do names[i] = c[1] end
  local values, herr = read('HMGET', KEYS[3], unpack(names))
  if herr then return redis.error_reply(herr) end
  for i, c in ipairs(counters) do
    local v = values[i]
    if v then
      if not integer(v) then return redis.error_reply('REFUSED ' .. KEYS[3] .. ' ' .. c[1] .. ' holds ' .. v) end
      local add = tonumber(c[2])
      local after = tonumber(v) + add
      if (add > 0 and after >= 9.2e18) or (add < 0 and after <= -9.2e18) then
        return redis.error_reply('REFUSED ' .. KEYS[3] .. ' ' .. c[1] .. ' would overflow')
      end
    end
  end
end
if corrects then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
  local function shift(tat, step)
    if step > 0 then return math.max(tat, now) + step end
    return math.max(tat + step, now)
  end
  local rtat, ttat = tonumber(tats[1] or '0') or 0, tonumber(tats[2] or '0') or 0
  for i = 14, 12 + 2 * k, 2 do
    local rd, td = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
    if rpm > 0 and rd ~= 0 then rtat = shift(rtat, rd * 60000 / rpm) end
    if tpm > 0 and td ~= 0 then ttat = shift(ttat, td * 60000 / tpm) end
  end
  redis.call('HSET', KEYS[1], 'requests_tat', string.format('%.6f', rtat), 'tokens_tat', string.format('%.6f', ttat))
  redis.call('PEXPIRE', KEYS[1], 120000)
end
if releases then redis.call('ZREM', KEYS[2], unpack(ARGV, 14 + 2 * k)) end
for _, c in ipairs(counters) do redis.call('HINCRBY', KEYS[3], c[1], c[2]) end
if adds and ttl > 0 then redis.call('EXPIRE', KEYS[3], ttl) end
redis.call('HSET', KEYS[4], field, bit.bor(word, mask))
redis.call('PEXPIRE', KEYS[4], ARGV[5])
return 1
";

/// The code of [`SETTLE`]'s error for a batch it refused to apply.
pub(super) const REFUSED: &str = "REFUSED";

/// How long Redis remembers a settlement batch it applied: at least this
/// long from when it applied it (each batch of a block renews the block's
/// key). A frozen Redis runs the original when it thaws, and the flush
/// sends the copy within a probe interval of that, so minutes are ample.
pub(super) const SETTLED_TTL_MS: u64 = 600_000;

/// Renews this instance's leases of one tenant. ARGV: the lease TTL, `XX`
/// to renew only the leases Redis still holds (a lease released meanwhile
/// stays released) or empty to put back those it lost (after an outage
/// longer than the TTL, when the instance still holds them), then the
/// leases. Replies the positions (1 for the first lease) of those Redis
/// did not hold, with `XX` (only commands the documented ACL grants).
pub(super) const RENEW: &str = r"
local t = redis.call('TIME')
local expiry = math.floor(tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000 + tonumber(ARGV[1]))
local lost = {}
for i = 3, #ARGV do
  if ARGV[2] == 'XX' then
    -- Changed is held (a lease renewed in the millisecond it was last
    -- set, which a renewal every ten seconds does not meet, would read
    -- as lost).
    if redis.call('ZADD', KEYS[1], 'XX', 'CH', expiry, ARGV[i]) == 0 then
      lost[#lost + 1] = i - 2
    end
  else
    redis.call('ZADD', KEYS[1], expiry, ARGV[i])
  end
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return lost
";

/// Seconds a period's usage hash is kept after its last update.
pub(super) fn usage_ttl_seconds(period_id: &str) -> u64 {
    match period_id.len() {
        10 => 3 * 86_400, // a day: 2026-11-25
        7 => 70 * 86_400, // a month: 2026-11
        _ => 0,           // total: kept
    }
}

/// Redis's decision on one admission.
pub(super) struct AdmitAnswer {
    /// The refusing limit's label; empty when admitted.
    pub(super) refused: String,
    /// Whether the quota asked for ahead came with the admission.
    pub(super) leased: bool,
    /// Redis's clock, in Unix milliseconds.
    pub(super) now: f64,
    pub(super) requests_tat: f64,
    pub(super) tokens_tat: f64,
    /// The period's spend when the batch was decided, in pUSD.
    pub(super) spent: i64,
}

/// Reads [`ADMIT`]'s reply: `n` answers.
pub(super) fn admit_answers(value: redis::Value, n: usize) -> Result<Vec<AdmitAnswer>, String> {
    let malformed = || format!("unexpected reply to the admission script: {value:?}");
    let read = || -> Option<Vec<AdmitAnswer>> {
        let redis::Value::BulkString(text) = &value else {
            return None;
        };
        let mut fields = std::str::from_utf8(text).ok()?.split(',');
        let integer = |fields: &mut std::str::Split<'_, char>| fields.next()?.parse::<i64>().ok();
        let now = integer(&mut fields)? as f64 * 1000.0 + integer(&mut fields)? as f64 / 1000.0;
        let spent = integer(&mut fields)?;
        let mut answers = Vec::with_capacity(n);
        for _ in 0..n {
            let refused = fields.next()?;
            let leased = refused == "+";
            answers.push(AdmitAnswer {
                refused: if leased {
                    String::new()
                } else {
                    refused.to_owned()
                },
                leased,
                now,
                requests_tat: now + integer(&mut fields)? as f64 / 1000.0,
                tokens_tat: now + integer(&mut fields)? as f64 / 1000.0,
                spent,
            });
        }
        fields.next().is_none().then_some(answers)
    };
    read().ok_or_else(malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    #[test]
    fn reads_admission_replies_in_order() {
        let reply =
            Value::BulkString(b"1700000000,250000,42,,1000,0,rpm,2000,-5,+,3000,0".to_vec());
        let answers = admit_answers(reply, 3).unwrap();
        let now = 1_700_000_000_000.0 + 250.0;
        assert_eq!(answers[0].refused, "");
        assert!(!answers[0].leased && !answers[1].leased);
        assert_eq!(answers[2].refused, "");
        assert!(answers[2].leased);
        assert_eq!(answers[0].now, now);
        assert_eq!(answers[0].requests_tat, now + 1.0);
        assert_eq!(answers[1].refused, "rpm");
        assert_eq!(answers[1].tokens_tat, now - 0.005);
        assert_eq!(answers[1].spent, 42);
    }

    #[test]
    fn refuses_malformed_admission_replies() {
        let reply = |text: &str| Value::BulkString(text.as_bytes().to_vec());
        assert!(admit_answers(Value::Nil, 1).is_err());
        assert!(admit_answers(Value::Array(vec![Value::Int(1)]), 1).is_err());
        // Too few fields, too many, a number that is not one.
        assert!(admit_answers(reply("1,2,3"), 1).is_err());
        assert!(admit_answers(reply("1,2,3,,0,0,x"), 1).is_err());
        assert!(admit_answers(reply("1,2,x,,0,0"), 1).is_err());
        assert!(admit_answers(reply("1,2,3,,0.5,0"), 1).is_err());
        assert!(admit_answers(reply("1,2,3,,0,0"), 1).is_ok());
    }

    #[test]
    fn usage_hashes_outlive_their_period() {
        assert_eq!(usage_ttl_seconds("2026-11-25"), 3 * 86_400);
        assert_eq!(usage_ttl_seconds("2026-11"), 70 * 86_400);
        assert_eq!(usage_ttl_seconds("total"), 0);
    }
}
