{{/*
Names and labels follow upstream's chart, so that an existing release of it upgrades in place:
the DaemonSet's selector is immutable.
*/}}

{{/* `name` cut to fit 63 characters with `-suffix` appended, when there is a suffix. */}}
{{- define "pia.withSuffix" -}}
{{- if .suffix -}}
{{- printf "%s-%s" (.name | trunc (int (sub 62 (len .suffix))) | trimSuffix "-") .suffix -}}
{{- else -}}
{{- .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end }}

{{/* The short name (nameOverride), with the DaemonSet's nameSuffix. */}}
{{- define "pia.name" -}}
{{- include "pia.withSuffix" (dict "name" (default .Chart.Name .Values.nameOverride) "suffix" .nameSuffix) -}}
{{- end }}

{{/* The objects' name: fullnameOverride, else the release name joined with the short name. */}}
{{- define "pia.fullname" -}}
{{- $short := default .Chart.Name .Values.nameOverride -}}
{{- $full := .Values.fullnameOverride -}}
{{- if not $full -}}
{{- $full = ternary .Release.Name (printf "%s-%s" .Release.Name $short) (contains $short .Release.Name) -}}
{{- end -}}
{{- include "pia.withSuffix" (dict "name" $full "suffix" .nameSuffix) -}}
{{- end }}

{{/* What selects a DaemonSet's pods. */}}
{{- define "pia.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pia.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Every object's labels. */}}
{{- define "pia.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "pia.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app: eks-pod-identity-agent
{{- end }}

{{/* This agent's image: image.override, else the name `cargo xtask image` gives it. */}}
{{- define "pia.image" -}}
{{- default (printf "eks-pod-identity-agent:%s" .Chart.AppVersion) .Values.image.override -}}
{{- end }}

{{/*
A command in upstream's form (a YAML list in a string, or a list) as this image runs it, in
JSON: upstream's '/go-runner' wrapper is dropped (this image has none).
*/}}
{{- define "pia.command" -}}
{{- $list := . -}}
{{- if kindIs "string" . -}}
{{- $list = fromYamlArray . -}}
{{- end -}}
{{- without $list "/go-runner" | toJson -}}
{{- end }}

{{/* "--flag": "value" pairs as arguments. */}}
{{- define "pia.pairs" -}}
{{- range $flag, $value := . }}
- {{ $flag | quote }}
- {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* The service account the pods run as; empty: the namespace's default. */}}
{{- define "pia.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pia.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}
{{- end }}

{{/* Whether the region is an isolated one (its endpoints use a private CA). */}}
{{- define "pia.iso" -}}
{{- if contains "-iso" (toString (.Values.env.AWS_REGION | default "")) }}true{{ end -}}
{{- end }}
