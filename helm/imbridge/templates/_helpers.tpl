{{/*
Names and labels, in the shapes `helm create` gives them.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "imbridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of every resource: fullnameOverride, or "<release>-<chart>", or just the
release name when it already contains the chart name. Truncated to 63 characters because
some Kubernetes name fields are limited to that (DNS labels).
*/}}
{{- define "imbridge.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<chart>-<version>", for the helm.sh/chart label. */}}
{{- define "imbridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "imbridge.labels" -}}
helm.sh/chart: {{ include "imbridge.chart" . }}
{{ include "imbridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the pods: they must never change between upgrades. */}}
{{- define "imbridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "imbridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The internal listener's Service: "<fullname>-internal", the full name shortened so the whole
stays a 63-character DNS label.
*/}}
{{- define "imbridge.internalServiceName" -}}
{{- printf "%s-internal" (include "imbridge.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{/* The ServiceAccount the pods run as. */}}
{{- define "imbridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "imbridge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret the pods take their IMBRIDGE_… variables from: existingSecret or the chart's. */}}
{{- define "imbridge.secretName" -}}
{{- .Values.existingSecret | default (include "imbridge.fullname" .) }}
{{- end }}

{{/* Whether the chart creates the Secret itself. */}}
{{- define "imbridge.createSecret" -}}
{{- if not .Values.existingSecret }}true{{ end }}
{{- end }}

{{/* The pod's terminationGracePeriodSeconds: preStop sleep + the daemon's grace + a margin. */}}
{{- define "imbridge.terminationGracePeriodSeconds" -}}
{{- add .Values.preStopSleepSeconds .Values.shutdownGraceSeconds .Values.terminationMarginSeconds }}
{{- end }}

{{/*
Refusals the schema cannot express, each one the install would otherwise only meet as a pod
that never starts:
- the memory bus lives inside one process: several replicas would be several unrelated buses,
  each with its own events and rate limits;
- two listeners on one port;
- notify clients without the internal listener that serves them, or the internal listener
  with nobody allowed on it (the daemon refuses that unless allow_anonymous);
- a client whose token is nowhere: the chart's Secret, extraEnv, or an existingSecret it
  cannot see into.
*/}}
{{- define "imbridge.checks" -}}
{{- $kind := dig "bus" "kind" "memory" .Values.config }}
{{- if and (eq $kind "memory") (or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled) }}
{{- fail "config.bus.kind \"memory\" is in-process: run one replica (replicaCount: 1, autoscaling off) or use \"nats\" or \"kafka\"" }}
{{- end }}
{{- $ports := list (int .Values.ports.http) (int .Values.ports.admin) }}
{{- if .Values.internal.enabled }}
{{- $ports = append $ports (int .Values.ports.internal) }}
{{- end }}
{{- if ne (len $ports) (len (uniq $ports)) }}
{{- fail (printf "ports: http, admin and internal must differ (got %s)" (join ", " $ports)) }}
{{- end }}
{{- $clients := dig "clients" dict .Values.config }}
{{- if and $clients (not .Values.internal.enabled) }}
{{- fail "config.clients is set but internal.enabled is false: the clients' POST /notify is served only on the internal listener" }}
{{- end }}
{{- if and .Values.internal.enabled (not $clients) (not (dig "server" "allow_anonymous" false .Values.config)) }}
{{- fail "internal.enabled: POST /notify would be open to anyone who reaches it: add config.clients.<name> with its token in secrets as IMBRIDGE_CLIENTS__<NAME>__TOKEN, or set config.server.allow_anonymous: true" }}
{{- end }}
{{- if not .Values.existingSecret }}
{{- $extraEnv := list }}
{{- range .Values.extraEnv }}
{{- $extraEnv = append $extraEnv .name }}
{{- end }}
{{- range $name, $_ := $clients }}
{{- $var := printf "IMBRIDGE_CLIENTS__%s__TOKEN" (upper $name) }}
{{- if not (or (hasKey $.Values.secrets $var) (has $var $extraEnv)) }}
{{- fail (printf "config.clients.%s has no token: set secrets.%s (a random secret of 16 characters or more), or use existingSecret" $name $var) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The imbridge configuration: the `config` values plus the [server] keys the chart owns
(listeners from listenAddress, ports and internal.enabled, the grace period from
shutdownGraceSeconds), so the pod spec and the daemon agree on ports and timing. Rendered as
TOML.
*/}}
{{- define "imbridge.config" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- /* The chart's own switch, not a section of the file. */}}
{{- $_ := unset $config "reload" }}
{{- $server := get $config "server" | default dict }}
{{- $_ := set $server "listen" (printf "%s:%d" .Values.listenAddress (int .Values.ports.http)) }}
{{- $_ = set $server "admin_listen" (printf "%s:%d" .Values.listenAddress (int .Values.ports.admin)) }}
{{- if .Values.internal.enabled }}
{{- $_ = set $server "internal_listen" (printf "%s:%d" .Values.listenAddress (int .Values.ports.internal)) }}
{{- end }}
{{- $_ = set $server "shutdown_grace" (printf "%ds" (int .Values.shutdownGraceSeconds)) }}
{{- $_ = set $config "server" $server }}
{{- /* Sections in the order of imbridge.example.toml, then any other (the daemon refuses those). */}}
{{- $order := list "server" "log" "bus" "apps" "streams" "notify" "targets" "routes" "templates" "users" "clients" }}
{{- range $section := keys $config | sortAlpha }}
{{- if not (has $section $order) }}
{{- $order = append $order $section }}
{{- end }}
{{- end }}
{{- $toml := "" }}
{{- range $section := $order }}
{{- if hasKey $config $section }}
{{- $toml = print $toml (include "imbridge.toml.table" (dict "table" (get $config $section) "path" (list $section))) }}
{{- end }}
{{- end }}
{{- trim $toml }}
{{- end }}

{{/*
A TOML renderer for the `config` map. Helm's own toToml is not used because values arrive
as float64 (YAML numbers pass through JSON), which it writes as "65536.0" where the daemon
expects an integer. Here whole numbers are written as integers.

imbridge.toml.table renders {table, path, item}: first the plain keys (they belong under the
table's header), then each sub-table as [path.key] and each list of maps as [[path.key]].
A header is written when the table has plain keys, or is empty below the top level (an
empty [apps.lark.main] still declares the app); tables holding only sub-tables need none. An item of a list of
maps gets its [[path]] header from its caller.
*/}}
{{- define "imbridge.toml.table" -}}
{{- $table := .table }}
{{- $path := .path }}
{{- $plain := list }}
{{- $tables := list }}
{{- $arrays := list }}
{{- range $key, $value := $table }}
{{- if kindIs "map" $value }}
{{- $tables = append $tables $key }}
{{- else if and (kindIs "slice" $value) $value (kindIs "map" (first $value)) }}
{{- $arrays = append $arrays $key }}
{{- else if not (kindIs "invalid" $value) }}
{{- $plain = append $plain $key }}
{{- end }}
{{- end }}
{{- if and (not .item) (or $plain (and (gt (len $path) 1) (not (or $tables $arrays)))) }}
{{- /* a blank line before each header */}}

[{{ include "imbridge.toml.path" $path }}]
{{- end }}
{{- range $plain }}
{{ include "imbridge.toml.key" . }} = {{ include "imbridge.toml.value" (get $table .) }}
{{- end }}
{{- range $tables }}
{{- include "imbridge.toml.table" (dict "table" (get $table .) "path" (append $path .)) }}
{{- end }}
{{- range $key := $arrays }}
{{- range $item := get $table $key }}

[[{{ include "imbridge.toml.path" (append $path $key) }}]]
{{- include "imbridge.toml.table" (dict "table" $item "path" (append $path $key) "item" true) }}
{{- end }}
{{- end }}
{{- end }}

{{/* A dotted table path, each key bare or quoted. */}}
{{- define "imbridge.toml.path" -}}
{{- $keys := list }}
{{- range . }}
{{- $keys = append $keys (include "imbridge.toml.key" .) }}
{{- end }}
{{- join "." $keys }}
{{- end }}

{{/* A key: bare when TOML allows it, else a quoted string ("security.protocol"). */}}
{{- define "imbridge.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/*
A value. Strings are written as JSON strings, whose escapes TOML basic strings share; whole
floats as integers; lists as arrays; maps inside lists as inline tables.
*/}}
{{- define "imbridge.toml.value" -}}
{{- if kindIs "string" . }}
{{- toJson . }}
{{- else if kindIs "bool" . }}
{{- . }}
{{- else if or (kindIs "float64" .) (kindIs "float32" .) }}
{{- if eq (floor .) (float64 .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if kindIs "slice" . }}
{{- $items := list }}
{{- range . }}
{{- $items = append $items (include "imbridge.toml.value" .) }}
{{- end }}
{{- printf "[%s]" (join ", " $items) }}
{{- else if kindIs "map" . }}
{{- $items := list }}
{{- range $key, $value := . }}
{{- $items = append $items (printf "%s = %s" (include "imbridge.toml.key" $key) (include "imbridge.toml.value" $value)) }}
{{- end }}
{{- printf "{%s}" (join ", " $items) }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/*
The apps the daemon serves callbacks for, as "<platform>/<name>" lines: those declared in
config.apps and those only named by `secrets` keys (IMBRIDGE_APPS__<PLATFORM>__<NAME>__<KEY>;
the daemon lower-cases names read from the environment), except apps in stream mode, which
have no route. Apps that only an existingSecret declares cannot be seen here.
*/}}
{{- define "imbridge.apps" -}}
{{- $apps := dict }}
{{- $streams := include "imbridge.streamApps" . | trim | splitList "\n" }}
{{- range $platform, $byName := (dig "apps" dict .Values.config) }}
{{- range $name, $_ := $byName }}
{{- $app := printf "%s/%s" $platform $name }}
{{- if not (has $app $streams) }}
{{- $_ := set $apps $app true }}
{{- end }}
{{- end }}
{{- end }}
{{- if not .Values.existingSecret }}
{{- range $key, $_ := .Values.secrets }}
{{- $parts := splitList "__" $key }}
{{- if and (eq (index $parts 0) "IMBRIDGE_APPS") (eq (len $parts) 4) }}
{{- $app := printf "%s/%s" (lower (index $parts 1)) (lower (index $parts 2)) }}
{{- if not (has $app $streams) }}
{{- $_ := set $apps $app true }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- range $app, $_ := $apps }}
{{ $app }}
{{- end }}
{{- end }}

{{/*
The apps on a long connection (DingTalk Stream mode, Lark websocket mode), as
"<platform>/<name>" lines: they dial out to the platform and need no callback URL.
*/}}
{{- define "imbridge.streamApps" -}}
{{- range $platform, $byName := (dig "apps" dict .Values.config) }}
{{- range $name, $app := $byName }}
{{- if has (dig "mode" "http" ($app | default dict)) (list "stream" "websocket") }}
{{ printf "%s/%s" $platform $name }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
With config.reload, what a reload does not apply (imbridge logs it as needing a restart):
the listeners, the grace period, and the server, log, bus, notify, streams and api sections.
*/}}
{{- define "imbridge.restartOnly" -}}
{{- $config := .Values.config | default dict }}
{{- $sections := dict "ports" .Values.ports "listenAddress" .Values.listenAddress "internal" .Values.internal.enabled "shutdownGraceSeconds" .Values.shutdownGraceSeconds }}
{{- range $section := list "server" "log" "bus" "notify" "streams" "api" }}
{{- $_ := set $sections $section (get $config $section) }}
{{- end }}
{{- toJson $sections }}
{{- end }}
