{{/* The chart name, or nameOverride. */}}
{{- define "vmkeep.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The base name of every object: fullnameOverride, else the release name when it already
contains the chart name, else "<release>-<chart>".
*/}}
{{- define "vmkeep.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "vmkeep.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Selector labels: the operator Pod must never carry app.kubernetes.io/managed-by=vmkeep, the
label of the objects vmkeep itself creates and watches.
*/}}
{{- define "vmkeep.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vmkeep.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "vmkeep.labels" -}}
{{ include "vmkeep.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: vmkeep
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vmkeep.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vmkeep.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image: repository@digest, or repository:tag (tag defaults to appVersion). */}}
{{- define "vmkeep.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The launcher image: repository@digest, or repository:tag (tag defaults to appVersion). */}}
{{- define "vmkeep.launcherImage" -}}
{{- with .Values.launcher.image }}
{{- if .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- printf "%s:%s" .repository (default $.Chart.AppVersion .tag) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The webhook's Service, Secret (self-managed or cert-manager's) and cert-manager Certificate. */}}
{{- define "vmkeep.webhookService" -}}
{{- printf "%s-webhook" (include "vmkeep.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vmkeep.webhookSecret" -}}
{{- printf "%s-webhook-tls" (include "vmkeep.fullname" .) }}
{{- end }}

{{/* Whether vmkeep manages its own webhook certificate (and needs the RBAC for it). */}}
{{- define "vmkeep.webhookSelfManaged" -}}
{{- if and .Values.webhook.enabled (not .Values.webhook.certManager.enabled) }}true{{- end }}
{{- end }}
