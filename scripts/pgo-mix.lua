-- The traffic scripts/pgo.sh runs its counting build through (wrk, one
-- request after another from this list): mostly answers and streams, as a
-- gateway serves, and some of what it refuses. Each response's status is
-- counted, and `done` prints the counts beside what the mix expects, for
-- scripts/pgo.sh to hold the gateway to.
local list = {
  -- { times in the mix, expected status, method, path, tenant key (or nil), body (or nil) }
  { 6, 200, "POST", "/v1/chat/completions", "sk-pgo-tenant-limited",
    '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"What is a gateway?"}],"max_tokens":24}' },
  { 2, 200, "POST", "/v1/chat/completions", "sk-pgo-tenant-open",
    '{"model":"gpt-4o-mini","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Name three rivers."}],"temperature":0.3,"max_tokens":48,"user":"u-7"}' },
  { 2, 200, "POST", "/v1/chat/completions", "sk-pgo-tenant-limited",
    '{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Count to forty."}],"max_tokens":40,"mock_tokens":40}' },
  { 1, 200, "POST", "/v1/chat/completions", "sk-pgo-tenant-open",
    '{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Count to twenty."}],"max_tokens":20,"mock_tokens":20}' },
  { 1, 200, "POST", "/v1/chat/completions", "sk-pgo-tenant-limited",
    '{"model":"gpt-4o","messages":[{"role":"user","content":"Fail over, please."}],"max_tokens":8}' },
  { 1, 200, "POST", "/v1/embeddings", "sk-pgo-tenant-limited",
    '{"model":"text-embedding-3-small","input":["first line","second line"]}' },
  { 1, 200, "POST", "/v1/responses", "sk-pgo-tenant-open",
    '{"model":"gpt-4o-mini","input":"Say hello.","max_output_tokens":16}' },
  { 1, 200, "POST", "/v1/responses", "sk-pgo-tenant-limited",
    '{"model":"gpt-4o-mini","input":"Say hello slowly.","stream":true,"max_output_tokens":24}' },
  { 1, 200, "GET", "/v1/models", "sk-pgo-tenant-open", nil },
  -- An unknown key: 401, and 429 once its address has failed too often.
  { 1, 401, "POST", "/v1/chat/completions", "sk-pgo-not-a-tenant",
    '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}]}' },
  { 1, 400, "POST", "/v1/chat/completions", "sk-pgo-tenant-open",
    '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}' },
  { 1, 404, "POST", "/v1/chat/completions", "sk-pgo-tenant-open",
    '{"model":"no-such-model","messages":[{"role":"user","content":"x"}]}' },
}

local requests = {}
local next_one = 0
-- A global, so that `done` (in wrk's main state) reads it from each thread.
counts = {}
local threads = {}

setup = function(thread)
  table.insert(threads, thread)
end

init = function(args)
  for _, item in ipairs(list) do
    local headers = { ["Content-Type"] = "application/json" }
    if item[5] then headers["Authorization"] = "Bearer " .. item[5] end
    local request = wrk.format(item[3], item[4], headers, item[6])
    for _ = 1, item[1] do requests[#requests + 1] = request end
  end
end

request = function()
  next_one = next_one % #requests + 1
  return requests[next_one]
end

response = function(status, headers, body)
  local class = status == 429 and 401 or status
  counts[class] = (counts[class] or 0) + 1
end

-- One line: "mix: STATUS=SEEN/EXPECTED_SHARE ..." (429 counted with 401),
-- then any status the mix does not expect.
done = function(summary, latency, requests_done)
  local seen, total = {}, 0
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("counts") or {}) do
      seen[status] = (seen[status] or 0) + n
      total = total + n
    end
  end
  local expected, size = {}, 0
  for _, item in ipairs(list) do
    expected[item[2]] = (expected[item[2]] or 0) + item[1]
    size = size + item[1]
  end
  local line = "mix: total=" .. total
  for status, share in pairs(expected) do
    line = line .. string.format(" %d=%d/%.4f", status, seen[status] or 0, share / size)
    seen[status] = nil
  end
  for status, n in pairs(seen) do
    line = line .. string.format(" %d=%d/0", status, n)
  end
  print(line)
end
