-- A small CPU benchmark for `invoke bench lua`: recursion, tables, strings, closures.
local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end

local function tables(n)
  local t = {}
  for i = 1, n do t[i] = (i * 7919) % n end
  table.sort(t)
  local sum = 0
  for _, v in ipairs(t) do sum = sum + v end
  return sum
end

local function strings(n)
  local parts = {}
  for i = 1, n do parts[#parts + 1] = string.format("%d:%s", i, string.rep("x", i % 10)) end
  local s = table.concat(parts, ",")
  local count = 0
  for _ in s:gmatch("%d+:x+") do count = count + 1 end
  return count
end

local function closures(n)
  local acc = 0
  for i = 1, n do
    local f = function(x) return x + i end
    acc = f(acc) % 1000003
  end
  return acc
end

local start = os.clock()
print("fib(30)", fib(30))
print("tables", tables(300000))
print("strings", strings(200000))
print("closures", closures(3000000))
print(string.format("cpu %.2f s", os.clock() - start))
