{{/* Chart name, possibly overridden. */}}
{{- define "kubeforge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Resource name prefix: <release>-kubeforge, or the release name when it already says kubeforge. */}}
{{- define "kubeforge.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kubeforge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubeforge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubeforge.labels" -}}
{{ include "kubeforge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubeforge
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "kubeforge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubeforge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kubeforge.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Contradictory values fail the render with the value to change. */}}
{{- define "kubeforge.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.peering.enabled) -}}
{{- fail "replicaCount > 1 needs peering.enabled=true (otherwise every operator pod acts on every object): set peering.enabled=true or replicaCount=1" -}}
{{- end -}}
{{- if and (not .Values.serviceAccount.create) (not .Values.serviceAccount.name) -}}
{{- fail "serviceAccount.create=false needs serviceAccount.name: name the existing ServiceAccount the operator runs as" -}}
{{- end -}}
{{- if and .Values.config.podMlflowTrackingUri (not .Values.config.mlflowTrackingUri) -}}
{{- fail "config.podMlflowTrackingUri is set but config.mlflowTrackingUri is empty: set config.mlflowTrackingUri (the operator registers models there)" -}}
{{- end -}}
{{- if and .Values.config.mlflowUiUrl (not .Values.config.mlflowTrackingUri) -}}
{{- fail "config.mlflowUiUrl is set but config.mlflowTrackingUri is empty: set config.mlflowTrackingUri" -}}
{{- end -}}
{{- if and .Values.registry.enabled (not .Values.config.mlflowTrackingUri) -}}
{{- fail "registry.enabled=true needs config.mlflowTrackingUri: the registry reads models, versions and metrics from MLflow" -}}
{{- end -}}
{{- range .Values.extraEnv -}}
{{- if hasPrefix "KUBEFORGE_" .name -}}
{{- fail (printf "extraEnv sets %s, which the chart sets from config: use the config.* value instead" .name) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kubeforge.registryImage" -}}
{{- if .Values.registry.image.repository -}}
{{- printf "%s:%s" .Values.registry.image.repository (default .Chart.AppVersion .Values.registry.image.tag) -}}
{{- else -}}
{{- include "kubeforge.image" . -}}
{{- end -}}
{{- end -}}
