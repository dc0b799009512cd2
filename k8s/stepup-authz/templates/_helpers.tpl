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

{{/*
The service settings file (authz/settings.py format). Secret values are never inlined:
each is a *_file pointing at a mounted Secret.
*/}}
{{- define "stepup-authz.settings" -}}
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
{{- $settings := dict
  "policy_file" "/etc/stepup-authz/policy/policy.yaml"
  "policy_poll_s" .Values.policy.pollSeconds
  "grpc" (dict "host" "0.0.0.0" "port" .Values.grpcPort "shutdown_grace_s" 5)
  "http" (dict "host" "0.0.0.0" "port" .Values.httpPort)
  "redis" $redis
  "oidc" $oidc
  "stepup" (dict "public_url" (required "stepup.publicUrl is required" .Values.stepup.publicUrl) "error_status" .Values.stepup.errorStatus "default_grant_ttl_s" .Values.stepup.defaultGrantTtlSeconds)
  "log" (dict "level" .Values.logLevel "json" true)
-}}
{{- toYaml $settings }}
{{- end }}
