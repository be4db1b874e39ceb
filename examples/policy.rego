# The OPA check of examples/policy.yaml: only GET, unless the caller says `x-role: admin`.
# Evaluated in the sidecar by regorus (Rego v1 syntax, as OPA 1.x); `input` is the request's
# attributes in Istio's vocabulary (docs/config.md, "OPA").
package tessera.authz

default allow := false

allow if input.request.method == "GET"

allow if input.request.headers["x-role"] == "admin"
