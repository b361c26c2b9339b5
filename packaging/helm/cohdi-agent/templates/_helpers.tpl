{{/* Every object's name prefix: the release name when it already says cohdi-agent, else
<release>-cohdi-agent (fullnameOverride wins). agent/manifests/rbac.py calls it `name`. */}}
{{- define "cohdi-agent.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "cohdi-agent.leaseName" -}}
{{- .Values.leaderElection.leaseName | default (include "cohdi-agent.fullname" .) -}}
{{- end -}}

{{- define "cohdi-agent.deviceClass" -}}
{{- if hasPrefix "gpu." .Values.driver -}}{{ .Values.driver }}{{- else -}}gpu.{{ .Values.driver }}{{- end -}}
{{- end -}}

{{- define "cohdi-agent.fabricSecret" -}}
{{- .Values.fabric.existingSecret | default (printf "%s-fabric" (include "cohdi-agent.fullname" .)) -}}
{{- end -}}

{{- define "cohdi-agent.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "cohdi-agent.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cohdi-agent.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
