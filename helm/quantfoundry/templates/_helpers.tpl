{{/* Names: "<release>-quantfoundry", or the release name alone when it already says so. */}}
{{- define "quantfoundry.name" -}}
{{- .Values.nameOverride | default .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "quantfoundry.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "quantfoundry.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "quantfoundry.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "quantfoundry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: quantfoundry
{{- end -}}

{{/* Selector labels of one component: call with (dict "root" $ "component" "api"). */}}
{{- define "quantfoundry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "quantfoundry.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels of a component's objects and pods: (dict "root" $ "component" "api"). */}}
{{- define "quantfoundry.componentLabels" -}}
{{ include "quantfoundry.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels of one worker queue's objects and pods: (dict "root" $ "key" "gpu-default"). */}}
{{- define "quantfoundry.workerLabels" -}}
{{ include "quantfoundry.componentLabels" (dict "root" .root "component" "worker") }}
quantfoundry.dev/worker: {{ .key }}
{{- end -}}

{{/* A worker queue's selector labels: (dict "root" $ "key" "gpu-default"). */}}
{{- define "quantfoundry.workerSelectorLabels" -}}
{{ include "quantfoundry.selectorLabels" (dict "root" .root "component" "worker") }}
quantfoundry.dev/worker: {{ .key }}
{{- end -}}

{{- define "quantfoundry.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "quantfoundry.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/* image reference: (dict "root" $ "image" .Values.image.api). A digest wins over a tag. */}}
{{- define "quantfoundry.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .root.Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* secretKeyRef of one entry of .Values.secrets: (dict "root" $ "entry" "databaseUrl"). */}}
{{- define "quantfoundry.secretRef" -}}
{{- $s := index .root.Values.secrets .entry -}}
secretKeyRef:
  name: {{ $s.existingSecret | default .root.Values.secrets.existingSecret }}
  key: {{ $s.key }}
{{- if hasKey $s "optional" }}
  optional: {{ $s.optional }}
{{- end }}
{{- end -}}

{{/* Pod-level settings shared by every pod of the chart. */}}
{{- define "quantfoundry.podCommon" -}}
# No pod of the chart talks to the Kubernetes API.
automountServiceAccountToken: false
enableServiceLinks: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Environment every process gets: the database, and where a read-only root keeps HOME. */}}
{{- define "quantfoundry.baseEnv" -}}
- name: QF_DATABASE_URL
  valueFrom:
    {{- include "quantfoundry.secretRef" (dict "root" . "entry" "databaseUrl") | nindent 4 }}
- name: HOME
  value: /tmp
{{- end -}}

{{- define "quantfoundry.brokerEnv" -}}
- name: QF_BROKER_URL
  valueFrom:
    {{- include "quantfoundry.secretRef" (dict "root" . "entry" "brokerUrl") | nindent 4 }}
{{- end -}}

{{/* Checksum of the ConfigMap's data, so that a settings change rolls the pods. */}}
{{- define "quantfoundry.configChecksum" -}}
{{- include (print .Template.BasePath "/configmap.yaml") . | sha256sum -}}
{{- end -}}

{{/* The egress every component needs: DNS, and the given rules of .Values.networkPolicy.egress. */}}
{{- define "quantfoundry.egressRules" -}}
{{- $np := .root.Values.networkPolicy -}}
- ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
{{- range .targets }}
{{- $rule := index $np.egress . }}
- ports:
  {{- range $rule.ports }}
    - {port: {{ . }}, protocol: TCP}
  {{- end }}
  {{- with $rule.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- with $np.extraEgress }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
A worker entry over .Values.workerDefaults, as YAML: (dict "root" $ "key" $key "entry" $entry).
Maps and scalars merge key by key; nodeSelector, tolerations, affinity and extraEnv set in an
entry replace the defaults' whole (a CPU queue can drop the GPU node selector), and `queue`
defaults to the entry's key.
*/}}
{{- define "quantfoundry.workerConfig" -}}
{{- $entry := .entry | default dict -}}
{{- $w := mergeOverwrite (deepCopy .root.Values.workerDefaults) (deepCopy $entry) -}}
{{- range $field := list "nodeSelector" "tolerations" "affinity" "extraEnv" -}}
{{- if hasKey $entry $field -}}
{{- $_ := set $w $field (index $entry $field) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $w "queue" ($w.queue | default .key) -}}
{{- toYaml $w -}}
{{- end -}}
