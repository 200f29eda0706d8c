{{/*
Chart name (nameOverride wins).
*/}}
{{- define "blocksmith.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name for the release's objects: the release name if it already contains the chart
name, else <release>-<chart>; truncated to 63 characters (DNS label).
*/}}
{{- define "blocksmith.fullname" -}}
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

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "blocksmith.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "blocksmith.labels" -}}
helm.sh/chart: {{ include "blocksmith.chart" . }}
{{ include "blocksmith.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: blocksmith
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels (stable across upgrades: never add to these).
*/}}
{{- define "blocksmith.selectorLabels" -}}
app.kubernetes.io/name: {{ include "blocksmith.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels and selector labels of the operator's objects.
*/}}
{{- define "blocksmith.operator.labels" -}}
{{ include "blocksmith.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "blocksmith.operator.selectorLabels" -}}
{{ include "blocksmith.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
The labels the operator gives every builder pod it manages (operator/src/builders.rs); each
also carries blocksmith.io/pipeline: <pipeline>.
*/}}
{{- define "blocksmith.builder.podSelectorLabels" -}}
app.kubernetes.io/name: blocksmith-builder
app.kubernetes.io/managed-by: blocksmith-operator
{{- end }}

{{- define "blocksmith.builder.labels" -}}
{{ include "blocksmith.labels" . }}
app.kubernetes.io/component: builder
{{- end }}

{{/*
Object names.
*/}}
{{- define "blocksmith.operator.fullname" -}}
{{- printf "%s-operator" (include "blocksmith.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "blocksmith.builder.fullname" -}}
{{- printf "%s-builder" (include "blocksmith.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "blocksmith.metrics.fullname" -}}
{{- printf "%s-metrics" (include "blocksmith.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "blocksmith.builderMetrics.fullname" -}}
{{- printf "%s-builder-metrics" (include "blocksmith.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "blocksmith.externalMetrics.fullname" -}}
{{- printf "%s-external-metrics" (include "blocksmith.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- /* Who scales builders: the value, or an HPA exactly when the chart serves its metric. */}}
{{- define "blocksmith.builderAutoscaler" -}}
{{- $scaler := .Values.builders.autoscaler | default (ternary "hpa" "fixed" .Values.externalMetrics.enabled) -}}
{{- if not (has $scaler (list "hpa" "fixed" "external")) -}}
{{- fail (printf "builders.autoscaler %q: use hpa, fixed or external" $scaler) -}}
{{- end -}}
{{- if and (eq $scaler "hpa") (not .Values.externalMetrics.enabled) -}}
{{- fail "builders.autoscaler=hpa needs externalMetrics.enabled: the HPA would target a metric nobody serves (use fixed, or external with an autoscaler of your own)" -}}
{{- end -}}
{{- $scaler -}}
{{- end }}

{{- define "blocksmith.externalMetrics.secretName" -}}
{{- .Values.externalMetrics.certificate.secretName | default (printf "%s-tls" (include "blocksmith.externalMetrics.fullname" .)) }}
{{- end }}

{{- /* The names the API server verifies the external metrics certificate against. */}}
{{- define "blocksmith.externalMetrics.dnsNames" -}}
{{- $svc := include "blocksmith.externalMetrics.fullname" . -}}
{{- list $svc (printf "%s.%s" $svc .Release.Namespace) (printf "%s.%s.svc" $svc .Release.Namespace) | toJson }}
{{- end }}

{{- define "blocksmith.operator.serviceAccountName" -}}
{{- required "operator.serviceAccount.name is required" .Values.operator.serviceAccount.name }}
{{- end }}

{{- define "blocksmith.builder.serviceAccountName" -}}
{{- required "builders.serviceAccount.name is required" .Values.builders.serviceAccount.name }}
{{- end }}

{{- define "blocksmith.leaseName" -}}
{{- default (include "blocksmith.operator.fullname" .) .Values.operator.leaseName }}
{{- end }}

{{/*
The image reference.
*/}}
{{- define "blocksmith.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
PromQL label matchers picking the operator's series in the PrometheusRule.
*/}}
{{- define "blocksmith.prometheusRule.selector" -}}
{{- .Values.prometheusRule.selector | default (printf "job=%q" (include "blocksmith.metrics.fullname" .)) }}
{{- end }}
