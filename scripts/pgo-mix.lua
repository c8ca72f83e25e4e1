-- The traffic scripts/pgo.sh runs its counting build through (wrk, one
-- request after another from this list): mostly answers and streams, as a
-- gateway serves, and some of what it refuses.
local list = {
  -- { times in the mix, method, path, tenant key (or nil), body (or nil) }
  { 6, "POST", "/v1/chat/completions", "sk-pgo-tenant-limited",
    '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"What is a gateway?"}],"max_tokens":24}' },
  { 2, "POST", "/v1/chat/completions", "sk-pgo-tenant-open",
    '{"model":"gpt-4o-mini","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Name three rivers."}],"temperature":0.3,"max_tokens":48,"user":"u-7"}' },
  { 2, "POST", "/v1/chat/completions", "sk-pgo-tenant-limited",
    '{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Count to forty."}],"max_tokens":40,"mock_tokens":40}' },
  { 1, "POST", "/v1/chat/completions", "sk-pgo-tenant-open",
    '{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Count to twenty."}],"max_tokens":20,"mock_tokens":20}' },
  { 1, "POST", "/v1/chat/completions", "sk-pgo-tenant-limited",
    '{"model":"gpt-4o","messages":[{"role":"user","content":"Fail over, please."}],"max_tokens":8}' },
  { 1, "POST", "/v1/embeddings", "sk-pgo-tenant-limited",
    '{"model":"text-embedding-3-small","input":["first line","second line"]}' },
  { 1, "POST", "/v1/responses", "sk-pgo-tenant-open",
    '{"model":"gpt-4o-mini","input":"Say hello.","max_output_tokens":16}' },
  { 1, "POST", "/v1/responses", "sk-pgo-tenant-limited",
    '{"model":"gpt-4o-mini","input":"Say hello slowly.","stream":true,"max_output_tokens":24}' },
  { 1, "GET", "/v1/models", "sk-pgo-tenant-open", nil },
  { 1, "POST", "/v1/chat/completions", "sk-pgo-not-a-tenant",
    '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}]}' },
  { 1, "POST", "/v1/chat/completions", "sk-pgo-tenant-open",
    '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}' },
  { 1, "POST", "/v1/chat/completions", "sk-pgo-tenant-open",
    '{"model":"no-such-model","messages":[{"role":"user","content":"x"}]}' },
}

local requests = {}
local next_one = 0

init = function(args)
  for _, item in ipairs(list) do
    local headers = { ["Content-Type"] = "application/json" }
    if item[4] then headers["Authorization"] = "Bearer " .. item[4] end
    local request = wrk.format(item[2], item[3], headers, item[5])
    for _ = 1, item[1] do requests[#requests + 1] = request end
  end
end

request = function()
  next_one = next_one % #requests + 1
  return requests[next_one]
end
