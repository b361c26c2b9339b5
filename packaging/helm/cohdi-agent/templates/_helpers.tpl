{{/* Every object's name prefix: the release name when it already says cohdi-agent, else
<release>-cohdi-agent (fullnameOverride wins). agent/manifests/rbac.py calls it `name`. */}}
{{- define "cohdi-agent.fullname" -}}
{{- $name := include "cohdi-agent.fullnameRaw" . -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) -}}
{{- fail (printf "the objects' name prefix %q (from the release name) is not a DNS-1035 label (a lowercase letter first, then letters, digits, '-'; no '.'), which a Service's name must be: set fullnameOverride" $name) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{- define "cohdi-agent.fullnameRaw" -}}
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

{{/* KUBERNETES_SERVICE_HOST/PORT when apiServer.host is set: the address the agent's in-cluster
client dials instead of the `kubernetes` Service's (clusters without kube-proxy). */}}
{{- define "cohdi-agent.apiServerEnv" -}}
{{- with .Values.apiServer.host }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ . | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ $.Values.apiServer.port | quote }}
{{- end }}
{{- end -}}

{{/* The ServiceAccount token, CA and namespace where the in-cluster client reads them: the
volume the ServiceAccount admission plugin would add, written out (the pods set
automountServiceAccountToken: false), so the pods get a bound token also where that plugin is
off. The kubelet requests and rotates the token (TokenRequest, bound to the pod and its node). */}}
{{- define "cohdi-agent.tokenVolume" -}}
- name: kube-api-access
  projected:
    sources:
    - serviceAccountToken: {path: token, expirationSeconds: 3607}
    - configMap:
        name: kube-root-ca.crt
        items: [{key: ca.crt, path: ca.crt}]
    - downwardAPI:
        items:
        - path: namespace
          fieldRef: {apiVersion: v1, fieldPath: metadata.namespace}
{{- end -}}

{{- define "cohdi-agent.tokenMount" -}}
- {name: kube-api-access, mountPath: /var/run/secrets/kubernetes.io/serviceaccount, readOnly: true}
{{- end -}}
