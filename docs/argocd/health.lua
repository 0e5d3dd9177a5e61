-- Argo CD health check for vmkeep's Image, Template and VirtualMachine (vmkeep.io/v1alpha1).
-- It reads the kstatus conventions every vmkeep kind follows, with kstatus's rules, so Argo CD
-- and Flux agree: status.observedGeneration and the conditions Ready, Reconciling and Stalled.
-- A VirtualMachine with runStrategy Halted that is Stopped is Healthy (Ready, reason Halted).
-- Lua 5.1 with the base and table libraries only, as Argo CD runs it (no string library).
-- Install: docs/argocd/argocd-cm.yaml; what each state maps to: docs/gitops.md.

local hs = {}

local function condition(conditionType)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == conditionType then
      return c
    end
  end
  return nil
end

local function holds(c)
  return c ~= nil and c.status == "True"
end

local function describe(c, otherwise)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if c ~= nil and c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return otherwise
end

if obj.metadata ~= nil and obj.metadata.deletionTimestamp ~= nil then
  hs.status = "Progressing"
  hs.message = "terminating"
  return hs
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "waiting for vmkeep to report a status"
  return hs
end

local generation = nil
if obj.metadata ~= nil then
  generation = tonumber(obj.metadata.generation)
end
local observed = tonumber(obj.status.observedGeneration)
if generation ~= nil and observed ~= nil and observed ~= generation then
  hs.status = "Progressing"
  hs.message = "generation " .. generation .. " not yet observed (status is of generation " .. observed .. ")"
  return hs
end

local stalled = condition("Stalled")
if holds(stalled) then
  hs.status = "Degraded"
  hs.message = describe(stalled, "stalled")
  return hs
end

local reconciling = condition("Reconciling")
if holds(reconciling) then
  hs.status = "Progressing"
  hs.message = describe(reconciling, "reconciling")
  return hs
end

local ready = condition("Ready")
if holds(ready) then
  hs.status = "Healthy"
  hs.message = describe(ready, "ready")
  return hs
end

hs.status = "Progressing"
hs.message = describe(ready, "waiting for the Ready condition")
return hs
