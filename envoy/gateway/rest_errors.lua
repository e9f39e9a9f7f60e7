-- The REST errors' one vocabulary and the 202 of a job submission: Envoy's Lua filter, in front of the
-- transcoder. envoy/gateway/rest_errors.py loads this file and says what it does and why.
--
-- rest_errors.py puts these tables before this program, generated from the code that owns each value:
--   NAMES         gRPC status number -> name (grpc.StatusCode)
--   OPENAI_TYPES  gRPC status name -> OpenAI error type (chatmesh.common.errors.OPENAI_ERROR_TYPES)
--   ACCEPTED      {HTTP method, Lua pattern of the path} of each job submission (from the descriptor set)
--   OPENAI_ROOTS  the path prefixes of the OpenAI-compatible API, e.g. "/v1/" (from the descriptor set)

local PREFIX = '{"code":'

-- Marks the request for envoy_on_response, which sees only the reply: a job submission (answered 202), or
-- a call of the OpenAI-compatible API (whose errors take OpenAI's shape). The path is the client's own,
-- query string included: this filter runs before the transcoder rewrites it.
function envoy_on_request(handle)
  local headers = handle:headers()
  local path = headers:get(":path") or ""
  local method = headers:get(":method")
  for _, accepted in ipairs(ACCEPTED) do
    if method == accepted[1] and string.match(path, accepted[2]) then
      handle:streamInfo():dynamicMetadata():set("chatmesh", "accepted", "1")
    end
  end
  for _, root in ipairs(OPENAI_ROOTS) do
    if string.sub(path, 1, #root) == root then
      handle:streamInfo():dynamicMetadata():set("chatmesh", "openai", "1")
    end
  end
end

-- The JSON string literal starting at `first` (its opening quote), escapes kept, or nil.
local function json_string(text, first)
  local i = first + 1
  while i <= #text do
    local byte = string.byte(text, i)
    if byte == 92 then
      i = i + 2
    elseif byte == 34 then
      return string.sub(text, first, i)
    else
      i = i + 1
    end
  end
  return nil
end

-- A REST error body ({"code": 3 or "NAME", "message": ...}) of HTTP `status` in OpenAI's shape, or nil.
local function openai_error(text, status)
  local digits = string.match(text, "^" .. PREFIX .. "(%d+)")
  local name = (digits and NAMES[tonumber(digits)]) or string.match(text, "^" .. PREFIX .. '"([A-Z_]+)"')
  if not name then
    return nil
  end
  local at = string.find(text, '"message":"', 1, true)
  local message = at and json_string(text, at + 10) or '""'
  local field = string.match(text, '"field":"([%w_%.%[%]]*)"')
  local param = field and ('"' .. field .. '"') or "null"
  -- A body over the size limit is the request's fault, not a rate limit (RESOURCE_EXHAUSTED otherwise).
  local kind = (status == "413" and "invalid_request_error") or OPENAI_TYPES[name] or "server_error"
  return '{"error":{"message":' .. message .. ',"type":"' .. kind
    .. '","param":' .. param .. ',"code":"' .. string.lower(name) .. '"}}'
end

-- The per-user request rate limit's headers (Envoy's local_ratelimit, draft 03: `x-ratelimit-limit: 40,
-- 40;w=1`, remaining, reset in seconds) under OpenAI's names, beside the token budget's that the chat
-- service sends (`x-ratelimit-*-tokens`).
local function request_limit_headers(headers)
  local limit = headers:get("x-ratelimit-limit")
  if limit == nil then
    return
  end
  headers:replace("x-ratelimit-limit-requests", string.match(limit, "^%s*(%d+)") or limit)
  local remaining = headers:get("x-ratelimit-remaining")
  if remaining ~= nil then
    headers:replace("x-ratelimit-remaining-requests", remaining)
  end
  local reset = headers:get("x-ratelimit-reset")
  if reset ~= nil then
    headers:replace("x-ratelimit-reset-requests", (string.match(reset, "^%s*(%d+)") or reset) .. "s")
  end
end

function envoy_on_response(handle)
  local headers = handle:headers()
  request_limit_headers(headers)
  local marks = handle:streamInfo():dynamicMetadata():get("chatmesh")
  -- Read before the body: the headers cannot be read once the script has waited for it.
  local status = headers:get(":status")
  if status == "200" then
    if marks ~= nil and marks["accepted"] ~= nil then
      headers:replace(":status", "202")
    end
    return
  end
  if headers:get("content-type") ~= "application/json" then
    return
  end
  local body = handle:body()
  if body == nil then
    return
  end
  local text = body:getBytes(0, body:length())
  if marks ~= nil and marks["openai"] ~= nil then
    local rewritten = openai_error(text, status)
    if rewritten then
      body:setBytes(rewritten)
    end
    return
  end
  local digits = string.match(text, "^" .. PREFIX .. "(%d+)")
  local name = digits and NAMES[tonumber(digits)]
  if name then
    body:setBytes(PREFIX .. '"' .. name .. '"' .. string.sub(text, #PREFIX + #digits + 1))
  end
end
