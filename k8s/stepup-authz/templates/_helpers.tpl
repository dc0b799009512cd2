{{/* Chart name, truncated to the 63 characters Kubernetes names allow. */}}
{{- define "stepup-authz.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; the release name alone when it already contains the chart name. */}}
{{- define "stepup-authz.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "stepup-authz.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stepup-authz.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "stepup-authz.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "stepup-authz.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: stepup-authz
{{- end }}

{{- define "stepup-authz.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "stepup-authz.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "stepup-authz.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "stepup-authz.policyConfigMap" -}}
{{- default (printf "%s-policy" (include "stepup-authz.fullname" .)) .Values.policy.existingConfigMap }}
{{- end }}

{{/* The Secret holding every key the replicas share (templates/keys-secret.yaml). */}}
{{- define "stepup-authz.keysSecret" -}}
{{- default (printf "%s-keys" (include "stepup-authz.fullname" .)) .Values.keys.existingSecret }}
{{- end }}

{{/* The entries of that Secret the settings name, as a YAML list. */}}
{{- define "stepup-authz.keyEntries" -}}
{{- $k := .Values.keys -}}
{{- $entries := list "stepup-context" -}}
{{- range $k.crypto.kids }}{{ $entries = append $entries (printf "crypto-%s" .) }}{{ end -}}
{{- range $k.auditMac.kids }}{{ $entries = append $entries (printf "audit-mac-%s" .) }}{{ end -}}
{{- toYaml $entries }}
{{- end }}

{{/*
Deep merge: (list $dst $src) sets every key of $src in $dst, recursing where both sides are
mappings. Unlike sprig's mergeOverwrite, a false, 0 or "" in $src overrides too (so
`config: {stepup: {cookie_secure: false}}` means what it says); lists are replaced whole.
*/}}
{{- define "stepup-authz.deepMerge" -}}
{{- $dst := index . 0 -}}
{{- range $k, $v := index . 1 }}
{{- if and (kindIs "map" $v) (kindIs "map" (get $dst $k)) }}
{{- include "stepup-authz.deepMerge" (list (get $dst $k) $v) }}
{{- else }}
{{- $_ := set $dst $k $v }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The service settings file (authz.config.settings format). Secret values are never inlined:
each is a *_file pointing at a mounted Secret. `config:` is merged over the result last, so
every setting is reachable from values.
*/}}
{{- define "stepup-authz.settings" -}}
{{- if hasKey .Values "network" }}
{{- fail "network.trustedXffHops is gone: the service uses the client address the proxy computes. Set the hop count as proxy.xffNumTrustedHops and in the proxy (render envoy --xff-num-trusted-hops, Istio numTrustedProxies, Envoy Gateway numTrustedHops); remove network" }}
{{- end }}
{{- $r := .Values.redis -}}
{{- $redis := dict "key_prefix" $r.keyPrefix "deadline_ms" $r.deadlineMs -}}
{{- if eq $r.mode "url" }}
{{- $_ := set $redis "url" (required "redis.url is required when redis.mode is url (no database is bundled)" $r.url) -}}
{{- else if eq $r.mode "sentinel" }}
{{- $_ := set $redis "sentinel" (dict "master_name" $r.sentinel.masterName "nodes" $r.sentinel.nodes) -}}
{{- else if eq $r.mode "cluster" }}
{{- $_ := set $redis "cluster" (dict "nodes" $r.cluster.nodes) -}}
{{- end }}
{{- if $r.auth.existingSecret }}
{{- $_ := set $redis "password_file" (printf "/etc/stepup-authz/secrets/redis-auth/%s" $r.auth.key) -}}
{{- end }}
{{- if $r.tls.existingSecret }}
{{- $_ := set $redis "ca_file" (printf "/etc/stepup-authz/secrets/redis-tls/%s" $r.tls.caKey) -}}
{{- end }}
{{- $o := .Values.oidc -}}
{{- $oidc := dict "issuer" (required "oidc.issuer is required" $o.issuer) "client_id" $o.clientId "audience" (required "oidc.audience is required" $o.audience) "algorithms" $o.algorithms -}}
{{- if $o.tokenTyp }}
{{- $_ := set $oidc "token_typ" $o.tokenTyp -}}
{{- end }}
{{- if $o.clientSecret.existingSecret }}
{{- $_ := set $oidc "client_secret_file" (printf "/etc/stepup-authz/secrets/oidc/%s" $o.clientSecret.key) -}}
{{- end }}
{{- /* One set of keys for every replica and worker (templates/keys-secret.yaml). */}}
{{- $keyDir := "/etc/stepup-authz/secrets/keys" -}}
{{- $k := .Values.keys -}}
{{- $ring := dict -}}
{{- range $k.crypto.kids }}{{ $_ := set $ring . (printf "%s/crypto-%s" $keyDir .) }}{{ end -}}
{{- if not (has $k.crypto.activeKid $k.crypto.kids) }}
{{- fail (printf "keys.crypto.activeKid %q is not in keys.crypto.kids" $k.crypto.activeKid) }}
{{- end }}
{{- $crypto := dict "keys" $ring "active_kid" $k.crypto.activeKid "require" true -}}
{{- if $k.crypto.previousKid }}
{{- $_ := set $crypto "previous_kid" $k.crypto.previousKid -}}
{{- end }}
{{- $stepup := dict "public_url" (required "stepup.publicUrl is required" .Values.stepup.publicUrl) "error_status" .Values.stepup.errorStatus "default_grant_ttl_s" .Values.stepup.defaultGrantTtlSeconds "context_key_file" (printf "%s/stepup-context" $keyDir) -}}
{{- /* The audit stream: the exporter (auditExporter) reads the same key and Redis. */}}
{{- $audit := dict "stream_key" .Values.audit.streamKey -}}
{{- if .Values.audit.redisUrl }}
{{- $_ := set $audit "redis_url" .Values.audit.redisUrl -}}
{{- end }}
{{- $_ := set $audit "mac_keys" (include "stepup-authz.audit.macKeyFiles" . | fromYaml) -}}
{{- $_ := set $audit "mac_active_kid" (include "stepup-authz.audit.activeKid" .) -}}
{{- if .Values.audit.acl.enabled }}
{{- $_ := include "stepup-authz.audit.acl" . -}}
{{- $_ := set $audit "username" .Values.audit.acl.serviceUser -}}
{{- $_ := set $audit "password_file" (printf "/etc/stepup-authz/secrets/audit-redis-auth/%s" .Values.audit.acl.servicePassword.key) -}}
{{- end }}
{{- $grpc := dict "host" "0.0.0.0" "port" .Values.grpcPort "shutdown_grace_s" 5 -}}
{{- $httpAuthz := dict "enabled" .Values.httpAuthz.enabled "host" "0.0.0.0" "port" .Values.httpAuthzPort -}}
{{- if .Values.tls.existingSecret }}
{{- $tls := dict "cert_file" "/etc/stepup-authz/secrets/tls/tls.crt" "key_file" "/etc/stepup-authz/secrets/tls/tls.key" -}}
{{- if .Values.tls.clientCa }}
{{- $_ := set $tls "client_ca_file" "/etc/stepup-authz/secrets/tls/ca.crt" -}}
{{- end }}
{{- $_ := set $grpc "tls" $tls -}}
{{- if .Values.tls.httpAuthz }}
{{- $_ := set $httpAuthz "tls" $tls -}}
{{- end }}
{{- end }}
{{- $settings := dict
  "policy_file" "/etc/stepup-authz/policy/policy.yaml"
  "policy_poll_s" .Values.policy.pollSeconds
  "grpc" $grpc
  "http" (dict "host" "0.0.0.0" "port" .Values.httpPort)
  "http_authz" $httpAuthz
  "redis" $redis
  "oidc" $oidc
  "stepup" $stepup
  "crypto" $crypto
  "log" (dict "level" .Values.logLevel "json" true)
  "audit" $audit
-}}
{{- if .Values.metricsPort }}
{{- $_ := set $settings "metrics" (dict "host" "0.0.0.0" "port" .Values.metricsPort) -}}
{{- end }}
{{- include "stepup-authz.deepMerge" (list $settings (deepCopy .Values.config)) }}
{{- if and (gt (int .Values.proxy.xffNumTrustedHops) 0) (hasKey $settings.grpc "peer_header") (kindIs "invalid" $settings.grpc.peer_header) }}
{{- fail "config.grpc.peer_header: null reads the connection peer, which is the last proxy when proxy.xffNumTrustedHops > 0: let Envoy send its client address (grpc.peer_header, render envoy does)" }}
{{- end }}
{{- toYaml $settings }}
{{- end }}

{{/*
NetworkPolicy egress for an injected Istio sidecar (istio.enabled): configuration (xDS) and
its workload certificate from istiod. Without it the sidecar never becomes ready and
neither does the pod.
*/}}
{{- define "stepup-authz.istiodEgress" -}}
{{- if .Values.istio.enabled }}
    - to:
        - namespaceSelector:
            matchLabels: {kubernetes.io/metadata.name: {{ .Values.istio.istiodNamespace }}}
          podSelector:
            matchLabels:
              {{- toYaml .Values.istio.istiodLabels | nindent 14 }}
      ports:
        {{- range .Values.istio.istiodPorts }}
        - {port: {{ . }}, protocol: TCP}
        {{- end }}
{{- end }}
{{- end }}

{{/* ---- The audit exporter (templates/audit-exporter.yaml) ---------------------------- */}}

{{- define "stepup-authz.exporter.fullname" -}}
{{- printf "%s-audit-exporter" (include "stepup-authz.fullname" . | trunc 48 | trimSuffix "-") }}
{{- end }}

{{/* A name of its own, so the service's Service, PDB, NetworkPolicy and anti-affinity
     (which select name=stepup-authz) never match the exporter's pod. */}}
{{- define "stepup-authz.exporter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stepup-authz.name" . | trunc 48 | trimSuffix "-" }}-audit-exporter
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: audit-exporter
{{- end }}

{{- define "stepup-authz.exporter.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "stepup-authz.exporter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: stepup-authz
{{- end }}

{{- define "stepup-authz.exporter.claimName" -}}
{{- default (printf "%s-archive" (include "stepup-authz.exporter.fullname" .)) .Values.auditExporter.persistence.existingClaim }}
{{- end }}

{{/*
The Redis URL the exporter reads the stream from: the one the service writes it to
(audit.redisUrl, else redis.url). ExporterSettings takes a single URL, so Sentinel and
Cluster need audit.redisUrl. The password (redis.auth) and the CA (redis.tls) are not in
the URL: the settings name the mounted files (password_file, ca_file), as the service's do.
*/}}
{{- define "stepup-authz.exporter.redisUrl" -}}
{{- $url := .Values.audit.redisUrl -}}
{{- if not $url }}
{{- if ne .Values.redis.mode "url" }}
{{- fail (printf "auditExporter: redis.mode is %s, but the exporter reads the stream through one URL; set audit.redisUrl (a standalone audit Redis: the service writes the stream there too) or auditExporter.enabled=false" .Values.redis.mode) }}
{{- end }}
{{- $url = required "redis.url is required when redis.mode is url (no database is bundled)" .Values.redis.url -}}
{{- end }}
{{- $url }}
{{- end }}

{{/* The exporter's settings file (authz/audit/config.py ExporterSettings). */}}
{{- define "stepup-authz.exporter.settings" -}}
{{- $x := .Values.auditExporter -}}
{{- $_ := required "auditExporter.enabled needs secrets.auditSigningKey.existingSecret (an Ed25519 PEM: stepup-authz audit keygen), or set auditExporter.enabled=false" .Values.secrets.auditSigningKey.existingSecret -}}
{{- $settings := dict
  "redis_url" (include "stepup-authz.exporter.redisUrl" .)
  "stream_key" .Values.audit.streamKey
  "archive_dir" "/var/lib/stepup-authz/audit/archive"
  "signing_key_file" (printf "/etc/stepup-authz/secrets/audit-signing-key/%s" .Values.secrets.auditSigningKey.key)
  "segment_max_bytes" (int64 $x.segmentMaxBytes)
  "segment_max_age_s" (int64 $x.segmentMaxAgeSeconds)
  "checkpoint_every" (int64 $x.checkpointEvery)
  "checkpoint_interval_s" (int64 $x.checkpointIntervalSeconds)
  "batch_size" (int64 $x.batchSize)
  "block_ms" (int64 $x.blockMs)
  "linger_ms" (int64 $x.lingerMs)
  "trim" $x.trim
  "metrics_port" (int64 $x.metricsPort)
  "metrics_host" "0.0.0.0"
-}}
{{- $_ := set $settings "mac_keys" (include "stepup-authz.audit.macKeyFiles" . | fromYaml) -}}
{{- if .Values.audit.acl.enabled }}
{{- $_ := include "stepup-authz.audit.acl" . -}}
{{- $_ := set $settings "username" .Values.audit.acl.exporterUser -}}
{{- $_ := set $settings "password_file" (printf "/etc/stepup-authz/secrets/audit-redis-auth/%s" .Values.audit.acl.exporterPassword.key) -}}
{{- /* The same Secrets and mount paths as the service (stepup-authz.settings). */}}
{{- else if .Values.redis.auth.existingSecret }}
{{- $_ := set $settings "password_file" (printf "/etc/stepup-authz/secrets/redis-auth/%s" .Values.redis.auth.key) -}}
{{- end }}
{{- if .Values.redis.tls.existingSecret }}
{{- $_ := set $settings "ca_file" (printf "/etc/stepup-authz/secrets/redis-tls/%s" .Values.redis.tls.caKey) -}}
{{- end }}
{{- toYaml $settings }}
{{- end }}

{{/* ---- The scheduled audit jobs (templates/audit-jobs.yaml) --------------------------- */}}

{{- define "stepup-authz.auditJobs.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stepup-authz.name" . | trunc 48 | trimSuffix "-" }}-audit-jobs
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: audit-jobs
{{- end }}

{{- define "stepup-authz.auditJobs.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "stepup-authz.auditJobs.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: stepup-authz
{{- end }}

{{/* ---- The audit trail's keys and its Redis's ACL users (docs/audit.md) ------------- */}}

{{/* kid -> mounted key file (the entry audit-mac-<kid> of the keys Secret), for the
     service's audit.mac_keys and the exporter's. */}}
{{- define "stepup-authz.audit.macKeyFiles" -}}
{{- range .Values.keys.auditMac.kids }}
{{ . }}: /etc/stepup-authz/secrets/keys/audit-mac-{{ . }}
{{- end }}
{{- end }}

{{- define "stepup-authz.audit.activeKid" -}}
{{- $m := .Values.keys.auditMac -}}
{{- if not (has $m.activeKid $m.kids) }}
{{- fail (printf "keys.auditMac.activeKid %q is not in keys.auditMac.kids" $m.activeKid) }}
{{- end }}
{{- $m.activeKid }}
{{- end }}

{{/* With audit.acl.enabled: a separate audit Redis and both users' password Secrets. */}}
{{- define "stepup-authz.audit.acl" -}}
{{- $a := .Values.audit.acl -}}
{{- $_ := required "audit.acl.enabled needs audit.redisUrl: the ACL users live in a Redis of the audit stream alone" .Values.audit.redisUrl -}}
{{- $_ := required "audit.acl.enabled needs audit.acl.servicePassword.existingSecret" $a.servicePassword.existingSecret -}}
{{- $_ := required "audit.acl.enabled needs audit.acl.exporterPassword.existingSecret" $a.exporterPassword.existingSecret -}}
ok: true
{{- end }}

{{/*
ACL SETUSER arguments, one per line (docs/audit.md loads them with the password appended).
The service's user: XADD to the stream and nothing else (PING, WAIT for replicas, the
connection's own SELECT / CLIENT SETNAME / SETINFO / HELLO). The exporter's: read and trim
the stream; XADD only to <streamKey>:head (a selector), so it cannot add records either.
*/}}
{{- define "stepup-authz.audit.serviceAcl" -}}
{{ .Values.audit.acl.serviceUser }}
reset
on
resetchannels
~{{ .Values.audit.streamKey }}
-@all
+xadd
+ping
+wait
+select
+client|setname
+client|setinfo
+hello
{{- end }}

{{- define "stepup-authz.audit.exporterAcl" -}}
{{ .Values.audit.acl.exporterUser }}
reset
on
resetchannels
~{{ .Values.audit.streamKey }}
-@all
+xread
+xrange
+xrevrange
+xlen
+xinfo|stream
+xtrim
+ping
+select
+client|setname
+client|setinfo
+hello
(~{{ .Values.audit.streamKey }}:head +xadd)
{{- end }}
